"""Every arm against the dense arm of its group, seed by seed: does it win, by how many of the
seed spread's standard deviations, on how many seeds.

Within each group of arms (the study's, or one corpus's) that holds an arm named `dense`, every
other arm A gets, from the final val losses L (runs_table.final_losses: the whole validation
split where every run of the two arms has been scored on it):

    Δ       = mean(L_A) - mean(L_dense)                 negative: A beats dense
    Δ_s     = L_A(seed s) - L_dense(seed s)             per seed both arms ran; a seed gives
                                                        both arms the same batches, so Δ_s is paired
    margin  = -Δ / max(sd_A, sd_dense)                  in standard deviations of the larger of
                                                        the two seed spreads (the quality bar: > 2)
    t       = -Δ / sqrt(sd_A² / n_A + sd_dense² / n_dense)   Welch's t

with sd the sample standard deviation over seeds (n - 1); margin and t are nan where either arm
has one seed.
"""

from __future__ import annotations

import math

from samoe.study.runs_table import Arm, by_corpus, final_losses, mean_std


def against_dense_rows(arms: list[Arm]) -> list[dict]:
    """One row per arm other than `dense`, in each group that has a `dense` arm."""
    rows = []
    for named in by_corpus(arms).values():
        if "dense" not in named:
            continue
        dense = named["dense"]
        for name, a in named.items():
            if name == "dense":
                continue
            (ld, la), source = final_losses(dense, a)
            (md, sd_d), (ma, sd_a) = mean_std(ld), mean_std(la)
            by_seed_d = {r.seed: v for r, v in zip(dense.runs, ld)}
            deltas = {r.seed: v - by_seed_d[r.seed] for r, v in zip(a.runs, la) if r.seed in by_seed_d}
            several = len(la) > 1 and len(ld) > 1  # one seed has no spread to measure against
            spread = max(sd_a, sd_d) if several else math.nan
            se = math.sqrt(sd_a ** 2 / len(la) + sd_d ** 2 / len(ld)) if several else math.nan
            rows.append({"arm": a.name, "seeds": len(la), "dense_seeds": len(ld), "loss_source": source,
                         "val_loss": ma, "val_loss_std": sd_a, "dense_val_loss": md, "dense_val_loss_std": sd_d,
                         "delta": ma - md, "delta_by_seed": deltas,
                         "wins": sum(d < 0 for d in deltas.values()),
                         "margin_in_sd": (md - ma) / spread if spread > 0 else math.nan,
                         "welch_t": (md - ma) / se if se > 0 else math.nan})
    return rows


def format_against_dense(rows: list[dict]) -> str:
    lines = ["| arm | seeds | val loss | dense | Δ vs dense | Δ by seed | wins | margin / larger sd | Welch t |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        by_seed = ", ".join(f"{s.removeprefix('seed')}: {d:+.3f}" for s, d in r["delta_by_seed"].items())
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} "
                     f"| {r['dense_val_loss']:.4f} ± {r['dense_val_loss_std']:.4f} | {r['delta']:+.4f} | {by_seed} "
                     f"| {r['wins']} of {len(r['delta_by_seed'])} | {r['margin_in_sd']:.2f} | {r['welch_t']:.2f} |")
    sources = sorted({r["loss_source"] for r in rows})
    lines += ["", f"Final val loss from: {' and '.join(sources)} (mean ± std over seeds). A seed gives both arms the "
              "same batches, so Δ by seed is paired; margin is the mean gain over dense in standard deviations of "
              "the larger of the two arms' seed spreads (the quality bar: more than 2)."]
    return "\n".join(lines)


def gap_by_tokens(arms: list[Arm]) -> list[tuple[str | None, list[str], list[tuple[int, float, list[float]]]]]:
    """Per group with a `dense` arm: the other arms' names, and at every token count where dense
    and at least one of them evaluated (every seed: Arm.curve), (tokens, dense's mean val loss,
    [each arm's mean minus dense's, nan where it has none]): whether the gap grows with tokens."""
    out = []
    for corpus, named in by_corpus(arms).items():
        if "dense" not in named:
            continue
        others = [n for n in named if n != "dense"]
        dense = {t: m for t, _, m, _, _ in named["dense"].curve()}
        curves = {n: {t: m for t, _, m, _, _ in named[n].curve()} for n in others}
        rows = [(t, dense[t], [curves[n][t] - dense[t] if t in curves[n] else math.nan for n in others])
                for t in sorted(dense) if any(t in curves[n] for n in others)]
        if rows:
            out.append((corpus, others, rows))
    return out


def format_gap_by_tokens(groups) -> str:
    parts = []
    for corpus, others, rows in groups:
        title = [f"Corpus `{corpus}`:", ""] if corpus else []
        lines = ["| tokens | dense | " + " | ".join(f"{n} − dense" for n in others) + " |",
                 "| ---: | ---: |" + " ---: |" * len(others)]
        for t, d, gaps in rows:
            tokens = f"{t / 1e6:.2f}M" if t >= 1e6 else f"{t:,}"
            cells = ["" if math.isnan(g) else f"{g:+.4f}" for g in gaps]
            lines.append(f"| {tokens} | {d:.4f} | " + " | ".join(cells) + " |")
        parts.append("\n".join(title + lines))
    return "\n\n".join(parts)
