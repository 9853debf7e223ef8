"""What the depth study adds to the report: the share of the MoE's gain per second beside the
one per step, the frontier of share kept against parameters saved, and how SaMoE's layers use
their pool.

Per second: within each comparison group (samoe.study.headline), every run's val loss at t*, the
training time at which the group's first run finished (linear between evaluations,
report.loss_at_seconds), then share_of_gain on those losses as on the final ones, and the MoE's
gain over dense there with Welch's interval (L̄_d - L̄_m ± t(0.975, df) · sqrt(s_d²/n_d + s_m²/n_m),
df by Welch-Satterthwaite).

The frontier (frontier.png): each arm at x = P_moe / P_arm (the factor of total parameters saved)
and y = its share of the MoE's gain, with its 95% interval as an error bar; SaMoE's pool sizes at
one depth joined by a line, SaMoE K = 2 at every depth joined by another, the rest as points.
Dense sits at share 0 and the MoE at (1, 1).

Pool use, from the coefficients each SaMoE run's summary.json keeps (c_l [K] or [E, K]):

    H_l = -Σ_k c_lk ln c_lk    (mean over experts for [E, K]; 0: one pool layer, ln K: uniform)
    load_k = (1 / L) Σ_l c_lk  (mean over experts too): how much of the model pool layer k serves

each the mean over the arm's seeds.

The decision rule (is SaMoE K = 2 better than the alternatives at its parameters?): within each
group, every arm whose total parameters are within EQUAL_PARAMS of SaMoE K = 2's, paired with it
by seed (a seed gives every arm the same batches and evaluation set):

    d_s = L_rival,s - L_samoe-k2,s      d̄ ± t(0.975, n - 1) · s_d / √n      over the n shared seeds

d̄ > 0: SaMoE K = 2 is ahead. In shares of the MoE's gain, the rival's share minus SaMoE's is
-d̄ / B with B = L̄_dense - L̄_moe taken at its point estimate.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable

from scipy.stats import t as student_t

from samoe.plots import pyplot, save_png
from samoe.study.headline import comparison_groups
from samoe.study.runs_table import Arm, RunRecord, final_losses, mean_std
from samoe.study.share import LEVEL, format_interval, share_of_gain

REFERENCE = "samoe-k2"
EQUAL_PARAMS = 0.03  # the issue's "within 3% of SaMoE K = 2's total parameters"


def welch_interval(x: list[float], y: list[float], level: float = LEVEL) -> tuple[float, float]:
    """The interval of mean(x) - mean(y) by Welch's t (nan with fewer than 2 values in either)."""
    (mx, sx), (my, sy) = mean_std(x), mean_std(y)
    if min(len(x), len(y)) < 2:
        return math.nan, math.nan
    vx, vy = sx ** 2 / len(x), sy ** 2 / len(y)
    if vx + vy == 0:
        return mx - my, mx - my
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = student_t.ppf(0.5 + level / 2, df) * math.sqrt(vx + vy)
    return mx - my - half, mx - my + half


def per_second_rows(arms: list[Arm], loss_at: Callable[[RunRecord, float], float]) -> list[dict]:
    """Each arm's share of the MoE's gain at its group's t*, with the interval, and the MoE's
    gain over dense there with its Welch interval."""
    rows = []
    for _, _, group in comparison_groups(arms):
        t = min(r.curve[-1][2] for a in group.values() for r in a.runs if r.curve)
        losses = {m: [loss_at(r, t) for r in a.runs] for m, a in group.items()}
        moe_low, moe_high = welch_interval(losses["dense"], losses["moe"])
        for method, a in group.items():
            if method in ("dense", "moe"):
                continue
            share = share_of_gain(losses["dense"], losses["moe"], losses[method])
            rows.append({"arm": a.name, "seconds": t, "keeps": share["keeps"], "low": share["low"],
                         "high": share["high"], "gain": share["gain"], "moe_gain": share["moe_gain"],
                         "moe_gain_low": moe_low, "moe_gain_high": moe_high})
    return rows


def format_per_second(rows: list[dict]) -> str:
    lines = ["| arm | at training second | gain over dense | the MoE's gain (95% Welch interval) | share kept "
             "| interval |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if math.isnan(r["keeps"]):
            share, interval = "n/a", "the MoE does not beat dense at this time"
        elif r["moe_gain_low"] <= 0 <= r["moe_gain_high"]:  # a share of a gain not told from zero is noise
            share, interval = "n/a", "the MoE's own gain over dense holds zero at this time"
        else:
            share, interval = f"{100 * r['keeps']:.0f}%", format_interval(r)
        moe = f"{r['moe_gain']:+.4f}" + ("" if math.isnan(r["moe_gain_low"]) else
                                         f" ({r['moe_gain_low']:+.4f} to {r['moe_gain_high']:+.4f})")
        lines.append(f"| {r['arm']} | {r['seconds']:,.0f} | {r['gain']:+.4f} | {moe} | {share} | {interval} |")
    return "\n".join(lines)


def equal_params_rows(arms: list[Arm]) -> list[dict]:
    """Per group with a samoe-k2 arm: each arm within EQUAL_PARAMS of its total parameters
    against it, paired by seed (final val losses as the headline reads them)."""
    rows = []
    for _, _, group in comparison_groups(arms):
        ref = group.get(REFERENCE)
        if ref is None:
            continue
        for method, a in group.items():
            if method in ("dense", "moe", REFERENCE) or \
                    abs(a.params["total"] / ref.params["total"] - 1) > EQUAL_PARAMS:
                continue
            (dense, moe, rival_losses, ref_losses), source = final_losses(group["dense"], group["moe"], a, ref)
            moe_gain = mean_std(dense)[0] - mean_std(moe)[0]
            rival_by_seed = dict(zip((r.seed for r in a.runs), rival_losses))
            ref_by_seed = dict(zip((r.seed for r in ref.runs), ref_losses))
            d = [rival_by_seed[s] - ref_by_seed[s] for s in sorted(rival_by_seed.keys() & ref_by_seed.keys())]
            mean, sd = mean_std(d) if d else (math.nan, math.nan)
            half = student_t.ppf(0.5 + LEVEL / 2, len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else math.nan
            rows.append({"arm": a.name, "reference": ref.name, "seeds": len(d), "loss_source": source,
                         "params_ratio": a.params["total"] / ref.params["total"], "diff": mean,
                         "low": mean - half, "high": mean + half, "moe_gain": moe_gain,
                         "share_diff": -mean / moe_gain if moe_gain > 0 else math.nan})
    return rows


def _verdict(r: dict) -> str:
    if math.isnan(r["low"]):
        return "one paired seed: no interval"
    if r["low"] > 0:
        return f"{r['reference']} ahead"
    if r["high"] < 0:
        return f"{r['arm']} ahead"
    return "not distinguishable (the interval holds zero)"


def format_equal_params(rows: list[dict]) -> str:
    lines = ["| arm | against | its params / reference's | paired seeds | val loss minus reference's | 95% interval "
             "| share of the MoE's gain, minus reference's | verdict |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        interval = "" if math.isnan(r["low"]) else f"{r['low']:+.4f} to {r['high']:+.4f}"
        share = "" if math.isnan(r["share_diff"]) else f"{100 * r['share_diff']:+.0f} points"
        lines.append(f"| {r['arm']} | {r['reference']} | {r['params_ratio']:.3f} | {r['seeds']} | {r['diff']:+.4f} "
                     f"| {interval} | {share} | {_verdict(r)} |")
    return "\n".join(lines)


def pool_use_rows(arms: list[Arm]) -> list[dict]:
    """Per SaMoE arm (runs whose summary keeps pool_coefficients): H_l per layer and load_k."""
    rows = []
    for a in arms:
        coefs = [r.summary["pool_coefficients"] for r in a.runs if "pool_coefficients" in r.summary]
        if not coefs:
            continue
        entropies, loads = [], []
        for layers in coefs:
            per_layer = [c if isinstance(c[0], list) else [c] for c in layers]  # [E][K] for every layer
            entropies.append([statistics.mean(-sum(p * math.log(p) for p in row if p > 0) for row in c)
                              for c in per_layer])
            K = len(per_layer[0][0])
            loads.append([statistics.mean(row[k] for c in per_layer for row in c) for k in range(K)])
        rows.append({"arm": a.name, "seeds": len(coefs), "pool_size": len(loads[0]),
                     "entropy": [statistics.mean(v) for v in zip(*entropies)],
                     "pool_load": [statistics.mean(v) for v in zip(*loads)]})
    return rows


def format_pool_use(rows: list[dict]) -> str:
    lines = ["| arm | seeds | K | coefficient entropy of each layer (nats; ln K uniform) | load of each pool layer |",
             "| --- | ---: | ---: | --- | --- |"]
    for r in rows:
        entropy, load = (" ".join(f"{v:.2f}" for v in r[key]) for key in ("entropy", "pool_load"))
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['pool_size']} (ln K = {math.log(r['pool_size']):.2f}) "
                     f"| {entropy} | {load} |")
    return "\n".join(lines)


def _dodged(rows: list[dict], within: float = 0.03, step: float = 0.012) -> dict[str, float]:
    """Each arm's x on the frontier: its parameters saved, with arms within `within` (relative) of
    one another spread sideways by `step` in log space so that their error bars do not overlap."""
    clusters: list[list[dict]] = []
    for r in sorted(rows, key=lambda r: r["moe_params_ratio"]):
        if clusters and r["moe_params_ratio"] <= clusters[-1][0]["moe_params_ratio"] * (1 + within):
            clusters[-1].append(r)
        else:
            clusters.append([r])
    x = {}
    for c in clusters:
        centre = math.log(statistics.mean(r["moe_params_ratio"] for r in c))
        for i, r in enumerate(c):
            x[r["arm"]] = r["moe_params_ratio"] if len(c) == 1 else math.exp(centre + (i - (len(c) - 1) / 2) * step)
    return x


def plot_frontier(rows: list[dict], out_dir: Path) -> Path | None:
    """frontier.png from headline rows (share kept with its interval, parameters saved)."""
    rows = [r for r in rows if not math.isnan(r["keeps_moe_gain"])]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.5", lw=0.8, ls=":")
    ax.annotate("the standard MoE", (0.01, 1.0), xycoords=("axes fraction", "data"), fontsize=7, xytext=(0, 3),
                textcoords="offset points", color="0.4")
    ax.annotate("FLOPs-matched dense", (0.01, 0.0), xycoords=("axes fraction", "data"), fontsize=7, xytext=(0, 3),
                textcoords="offset points", color="0.4")

    x = _dodged(rows)

    def point(r, **kw):
        err = None if math.isnan(r["keeps_low"]) else [[r["keeps_moe_gain"] - r["keeps_low"]],
                                                       [r["keeps_high"] - r["keeps_moe_gain"]]]
        ax.errorbar([x[r["arm"]]], [r["keeps_moe_gain"]], yerr=err, capsize=3, **kw)

    samoe = [r for r in rows if r["method"].startswith("samoe-k")]
    for group in sorted({r["group"] for r in samoe}, key=str):
        line = sorted((r for r in samoe if r["group"] == group), key=lambda r: r["moe_params_ratio"])
        if len(line) > 1:
            ax.plot([x[r["arm"]] for r in line], [r["keeps_moe_gain"] for r in line], "-", color="C0",
                    alpha=0.5)
    k2 = sorted((r for r in samoe if r["method"] == "samoe-k2"), key=lambda r: r["moe_params_ratio"])
    if len(k2) > 1:
        ax.plot([x[r["arm"]] for r in k2], [r["keeps_moe_gain"] for r in k2], "--", color="C3",
                label="SaMoE K = 2 by depth")
    others = iter(f"C{i}" for i in range(4, 40))
    for r in rows:
        if r["method"].startswith("samoe-k"):  # SaMoE's pool sizes: on the lines, named beside the point
            point(r, fmt="s" if r["method"] == "samoe-k2" else "o", color="C3" if r["method"] == "samoe-k2" else "C0")
            ax.annotate(r["arm"], (x[r["arm"]], r["keeps_moe_gain"]), fontsize=7, xytext=(4, -9),
                        textcoords="offset points")
        else:  # the alternatives crowd SaMoE K = 2's parameters: named in the legend
            point(r, fmt="o", color=next(others), label=r["arm"])
    ax.set_xscale("log")
    xs = list(x.values()) + [1.0]
    ticks = [t for t in (0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 6, 8) if min(xs) / 1.1 <= t <= max(xs) * 1.1]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("total parameters saved: the standard MoE's / the arm's (log; arms within 3% spread sideways)")
    ax.set_ylabel("share of the MoE's val-loss gain over dense kept (95% interval)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out_dir / "frontier.png"
    fig.dpi = 110
    save_png(fig, path)
    plt.close(fig)
    return path
