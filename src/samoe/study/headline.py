"""The study's headline sentences: how much of the standard MoE's gain over dense each arm keeps,
and at how many total parameters.

Within each group of arms (the study's arms, or one corpus's) that holds an arm named `dense`
(the FLOPs-matched dense model) and one named `moe` (the standard MoE), every other arm A gets

    keeps = (L_dense - L_A) / (L_dense - L_moe)          share of the MoE's gain, per step
    fewer = P_moe / P_A                                  the MoE's total parameters over A's

with L the mean final val loss over seeds (on the whole validation split where every run of the
three arms has been scored on it, else training's last evaluation: runs_table.final_losses) and P
the total parameters. The gains come with their
standard errors, sqrt(sd_dense² / n_dense + sd_A² / n_A), so the reader sees whether a share of
80% is 0.05 ± 0.01 nats or 0.005 ± 0.02. The share is undefined (nan) when the MoE does not beat
dense.
"""

from __future__ import annotations

import math

from samoe.study.runs_table import Arm, by_corpus, final_losses, mean_std


def _gain(dense: list[float], arm: list[float]) -> tuple[float, float]:
    """(L_dense - L_arm, its standard error) from the seeds' means and sample stds."""
    (d, d_sd), (a, a_sd) = mean_std(dense), mean_std(arm)
    return d - a, math.sqrt(d_sd ** 2 / len(dense) + a_sd ** 2 / len(arm))


def headline_rows(arms: list[Arm]) -> list[dict]:
    """One row per arm other than `dense` and `moe`, in each group that has both."""
    rows = []
    for named in by_corpus(arms).values():
        if "dense" not in named or "moe" not in named:
            continue
        for name, a in named.items():
            if name in ("dense", "moe"):
                continue
            (dense, moe, arm), source = final_losses(named["dense"], named["moe"], a)
            moe_gain, moe_se = _gain(dense, moe)
            gain, se = _gain(dense, arm)
            rows.append({"arm": a.name, "seeds": len(a.runs), "loss_source": source,
                         "gain_over_dense": gain, "gain_over_dense_se": se,
                         "moe_gain_over_dense": moe_gain, "moe_gain_over_dense_se": moe_se,
                         "keeps_moe_gain": gain / moe_gain if moe_gain > 0 else math.nan,
                         "moe_params_ratio": named["moe"].params["total"] / a.params["total"]})
    return rows


def format_headline(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        ratio = r["moe_params_ratio"]
        params = (f"{ratio:.2f}x fewer total parameters than the MoE" if ratio > 1.005 else
                  f"{1 / ratio:.2f}x the MoE's total parameters" if ratio < 0.995 else "the MoE's total parameters")
        gains = (f"(gain over dense {r['gain_over_dense']:.4f} ± {r['gain_over_dense_se']:.4f} nats, the MoE's "
                 f"{r['moe_gain_over_dense']:.4f} ± {r['moe_gain_over_dense_se']:.4f}; ± one standard error; "
                 f"{r['seeds']} seed(s); {r['loss_source']})")
        if math.isnan(r["keeps_moe_gain"]):
            lines.append(f"- **{r['arm']}**: the standard MoE does not beat dense here, so no share of its gain; "
                         f"{params} {gains}.")
        else:
            lines.append(f"- **{r['arm']}** keeps {100 * r['keeps_moe_gain']:.0f}% of the standard MoE's val-loss "
                         f"gain over dense with {params} {gains}.")
    return "\n".join(lines)
