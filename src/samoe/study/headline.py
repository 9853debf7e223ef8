"""The study's headline sentences: how much of the standard MoE's gain over dense each arm keeps,
with its 95% interval, and at how many total parameters.

Arms are compared within a group: the arms of one corpus whose names share a prefix P such that
`Pdense` (the FLOPs-matched dense model) and `Pmoe` (the standard MoE) both exist. P is empty in
a study with arms `dense` and `moe`, and `L12-` for the depth study's `L12-dense`, `L12-moe`,
`L12-samoe-k2`, ...; an arm belongs to the longest such prefix it starts with. Every other arm A
of the group gets

    keeps = (L_dense - L_A) / (L_dense - L_moe)          share of the MoE's gain, per step
    fewer = P_moe / P_A                                  the MoE's total parameters over A's

with L the final val losses over seeds (on the whole validation split where every run of the
three arms has been scored on it, else training's last evaluation: runs_table.final_losses), the
share's 95% interval by the delta method (samoe.study.share), and P the total parameters.
"""

from __future__ import annotations

import math

from samoe.study.runs_table import Arm, by_corpus, final_losses, mean_std
from samoe.study.share import format_interval, share_of_gain


def comparison_groups(arms: list[Arm]) -> list[tuple[str | None, str, dict[str, Arm]]]:
    """(corpus, prefix, {method: arm}) for every prefix with a `dense` and a `moe` arm; the
    methods are the other arms' names without the prefix (dense and moe included)."""
    out = []
    for corpus, named in by_corpus(arms).items():
        prefixes = sorted((n[: -len("dense")] for n in named if n.endswith("dense") and n[: -len("dense")] + "moe"
                           in named), key=len, reverse=True)
        members: dict[str, dict[str, Arm]] = {p: {} for p in prefixes}
        for name, arm in named.items():
            p = next((p for p in prefixes if name.startswith(p)), None)
            if p is not None:
                members[p][name[len(p):]] = arm
        out += [(corpus, p, members[p]) for p in sorted(prefixes)]
    return out


def _se(dense: list[float], arm: list[float]) -> float:
    """The standard error of L̄_dense - L̄_arm: sqrt(s_d² / n_d + s_a² / n_a)."""
    (_, d_sd), (_, a_sd) = mean_std(dense), mean_std(arm)
    return math.sqrt(d_sd ** 2 / len(dense) + a_sd ** 2 / len(arm))


def headline_rows(arms: list[Arm]) -> list[dict]:
    """One row per arm other than dense and moe, in each comparison group."""
    rows = []
    for _, prefix, group in comparison_groups(arms):
        for method, a in group.items():
            if method in ("dense", "moe"):
                continue
            (dense, moe, arm), source = final_losses(group["dense"], group["moe"], a)
            share = share_of_gain(dense, moe, arm)
            rows.append({"arm": a.name, "group": prefix.rstrip("-") or None, "method": method, "seeds": len(a.runs),
                         "loss_source": source, "keeps_moe_gain": share["keeps"],
                         "keeps_low": share["low"], "keeps_high": share["high"], "keeps_df": share["df"],
                         "gain_over_dense": share["gain"], "gain_over_dense_se": _se(dense, arm),
                         "moe_gain_over_dense": share["moe_gain"], "moe_gain_over_dense_se": _se(dense, moe),
                         "moe_params_ratio": group["moe"].params["total"] / a.params["total"]})
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
        interval = format_interval({"low": r["keeps_low"], "high": r["keeps_high"]})
        if math.isnan(r["keeps_moe_gain"]):
            lines.append(f"- **{r['arm']}**: the standard MoE does not beat dense here, so no share of its gain; "
                         f"{params} {gains}.")
        else:
            lines.append(f"- **{r['arm']}** keeps {100 * r['keeps_moe_gain']:.0f}% of the standard MoE's val-loss "
                         f"gain over dense with {params}; {interval} {gains}.")
    return "\n".join(lines)
