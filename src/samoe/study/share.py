"""The share of the standard MoE's gain over dense that an arm keeps, with a 95% interval.

From the final val losses over seeds of the FLOPs-matched dense arm (d), the standard MoE (m) and
an arm (a), with means L̄, sample variances s² and seed counts n:

    A = L̄_d - L̄_a,   B = L̄_d - L̄_m,   R = A / B                   (the share kept)

The interval is the delta method's: R linearised in the three independent means,

    R ≈ R + [(1 - R)(L̄_d - μ_d) - (L̄_a - μ_a) + R (L̄_m - μ_m)] / B
    se² = [(1 - R)² v_d + v_a + R² v_m] / B²,       v = s² / n

with Student's t at the Welch-Satterthwaite degrees of freedom of that sum,

    df = (Σ w_i)² / Σ (w_i² / (n_i - 1)),           w = ((1 - R)² v_d, v_a, R² v_m)

and R ± t(0.975, df) · se. The three arms are treated as independent; a seed gives every arm the
same batches, so pairing by seed would give a narrower interval, and this one is the cautious one.
With one seed in any arm there is no spread to measure and the interval is nan. R is nan when
the MoE does not beat dense (B <= 0).
"""

from __future__ import annotations

import math

from scipy.stats import t as student_t

from samoe.study.runs_table import mean_std

LEVEL = 0.95


def share_of_gain(dense: list[float], moe: list[float], arm: list[float], level: float = LEVEL) -> dict:
    """{keeps, se, df, low, high, gain, moe_gain} from the final losses of each arm's seeds."""
    (d, sd_d), (m, sd_m), (a, sd_a) = mean_std(dense), mean_std(moe), mean_std(arm)
    gain, moe_gain = d - a, d - m
    out = {"keeps": math.nan, "se": math.nan, "df": math.nan, "low": math.nan, "high": math.nan,
           "gain": gain, "moe_gain": moe_gain}
    if not moe_gain > 0:
        return out
    r = gain / moe_gain
    out["keeps"] = r
    if min(len(dense), len(moe), len(arm)) < 2:
        return out
    parts = [((1 - r) ** 2 * sd_d ** 2 / len(dense), len(dense)), (sd_a ** 2 / len(arm), len(arm)),
             (r ** 2 * sd_m ** 2 / len(moe), len(moe))]
    total = sum(w for w, _ in parts)
    se = math.sqrt(total) / moe_gain
    df = total ** 2 / sum(w ** 2 / (n - 1) for w, n in parts) if total > 0 else math.inf
    half = student_t.ppf(0.5 + level / 2, df) * se if total > 0 else 0.0
    out.update(se=se, df=df, low=float(r - half), high=float(r + half))
    return out


def format_interval(s: dict) -> str:
    """'95% interval 64 to 93%' of a share_of_gain answer, saying so when it holds zero."""
    if math.isnan(s["low"]):
        return "no interval (an arm with one seed)"
    text = f"{100 * LEVEL:.0f}% interval {100 * s['low']:.0f} to {100 * s['high']:.0f}%"
    return text + (", which holds zero: not distinguishable from dense" if s["low"] <= 0 <= s["high"] else "")
