"""`samoe study report DIR`: a study directory's runs as one Markdown report with plots.

Runs are found by their summary.json anywhere under DIR; a run at DIR/[corpus/]arm/seed{s} belongs
to arm `[corpus/]arm`. Per arm, over its seeds:

- val loss / ppl / bpb: mean ± sample standard deviation (n - 1) of training's final
  evaluations; beside them the whole validation split's val loss where every seed of the arm
  has been scored on it (`samoe study eval`, RUN/eval-full.json);
- tokens/s: the median over logged steps of each run (evaluation excluded), then the mean
  over seeds;
- training time of a run: Σ over logged rows of (steps since the previous row) × tokens per
  step / that row's tokens/s, so the wall-clock axis is the run's own measured speed and
  excludes evaluation and checkpointing;
- curves: val loss at each evaluation step, mean over seeds with a ± std band;
- at equal training time: each arm's val loss when the first arm finished training.

The plots: val loss vs tokens, val loss vs training seconds, and final val loss vs total
parameters (each arm one point with its std as an error bar: the efficiency frontier).

Runs still training (or stopped before their end: no summary.json yet, but evaluations in
metrics.jsonl) get a section of their own: every run's val loss at each evaluation step so far,
its mean training loss over each window of steps, and loss-steps-unfinished.png, so a study that
takes several sessions can be read while it runs. Runs of one seed read the same batches in the
same order and is scored on each batch before it learns from it, so the windowed training loss
is a paired comparison over far more tokens than the in-training validation; it is held out for
text no earlier batch held: all of it within a run's first epoch with `data.sampling=epochs`
(the presets'), and with random offsets (`data.sampling=random`) all but about
1 - (1 - e^-r) / r of the tokens of a run that reads a fraction r of its corpus (a quarter at
r = 0.65).

Where the study (or a corpus of it) has an arm named `dense`, every other arm against it seed by
seed: Δ, the seeds it wins, the margin in seed standard deviations and Welch's t
(samoe.study.against_dense); where it also has `moe`, each other arm's headline sentence: the
share of the MoE's gain over dense it keeps, at how many total parameters (samoe.study.headline).
Both use the whole split's losses where every compared run has one. With tasks (`--task`), the
zero-shot scores of the best arms (samoe.study.zeroshot); for a study with corpora, SaMoE's gap
to the standard MoE against corpus diversity (samoe.study.diversity).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Callable

from samoe.fileio import write_text_atomic
from samoe.plots import pyplot, save_png
from samoe.runs import METRICS_FILE, SUMMARY_FILE, read_json, read_metrics
from samoe.study.against_dense import against_dense_rows, format_against_dense, format_gap_by_tokens, gap_by_tokens
from samoe.study.depth import (
    EQUAL_PARAMS,
    equal_params_rows,
    format_equal_params,
    format_per_second,
    format_pool_use,
    per_second_rows,
    plot_frontier,
    pool_use_rows,
)
from samoe.study.diversity import format_poolsize, plot_gap_diversity, poolsize_rows
from samoe.study.headline import format_headline, headline_rows
from samoe.study.runs_table import WHOLE_SPLIT, Arm, RunRecord, corpus_of, final_losses, finished_run_dirs, mean_std
from samoe.study.speeds import apply_speed, chosen_speeds, speed_note
from samoe.study.whole_split import full_eval
from samoe.study.zeroshot import ZEROSHOT_BEST, ZEROSHOT_MAX_ARMS, format_zeroshot, parse_tasks, zeroshot_rows


def read_run(path: Path) -> RunRecord:
    summary = read_json(path / SUMMARY_FILE)
    rows = read_metrics(path)
    tokens_per_step = summary["tokens"] // max(summary["steps"], 1)
    curve, seconds, prev = [], 0.0, 0
    for row in rows:
        seconds += (row["step"] - prev) * tokens_per_step / row["tokens_per_s"]
        prev = row["step"]
        if "val_loss" in row:
            curve.append((row["step"], row["tokens"], seconds, row["val_loss"]))
    speed = statistics.median(r["tokens_per_s"] for r in rows) if rows else float("nan")
    return RunRecord(path, summary, curve, speed, full_eval(path, summary["steps"]))


def collect(study_dir: str | Path, allow_empty: bool = False) -> list[Arm]:
    """The arms of a study directory's finished runs, in sorted order of their names."""
    root = Path(study_dir)
    arms: dict[str, Arm] = {}
    for run_dir in finished_run_dirs(root, allow_empty):
        rel = run_dir.relative_to(root).parts
        name = "/".join(rel[:-1]) if len(rel) > 1 and rel[-1].startswith("seed") else "/".join(rel)
        arms.setdefault(name, Arm(name)).runs.append(read_run(run_dir))
    return [arms[k] for k in sorted(arms)]


TRAIN_WINDOW = 1000  # steps per window of the unfinished runs' mean training loss


def unfinished_curves(root: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """Runs under root without a summary.json (still training, or stopped), by their path
    below root: [(step, val loss)] of their evaluations so far (runs with none are left out),
    and [(window end, mean training loss)] over the complete windows of TRAIN_WINDOW steps."""
    evals, train = {}, {}
    for metrics in sorted(root.rglob(METRICS_FILE)):
        run_dir = metrics.parent
        if (run_dir / SUMMARY_FILE).exists():
            continue
        rows = read_metrics(run_dir)
        curve = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if not curve:
            continue
        name = str(run_dir.relative_to(root))
        evals[name] = curve
        last = max(r["step"] for r in rows) // TRAIN_WINDOW * TRAIN_WINDOW
        windows: dict[int, list[float]] = {}
        for r in rows:
            end = -(-r["step"] // TRAIN_WINDOW) * TRAIN_WINDOW  # the window (end - W, end] holding the step
            if "loss" in r and end <= last:
                windows.setdefault(end, []).append(r["loss"])
        train[name] = [(end, statistics.mean(v)) for end, v in sorted(windows.items())]
    return evals, train


def format_unfinished(curves: dict[str, list[tuple[int, float]]]) -> str:
    """Loss by step, one column per unfinished run (blank where not reached)."""
    names = list(curves)
    by_step = {name: dict(c) for name, c in curves.items()}
    steps = sorted({s for c in curves.values() for s, _ in c})
    lines = ["| step | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
    for s in steps:
        cells = [f"{by_step[n][s]:.4f}" if s in by_step[n] else "" for n in names]
        lines.append(f"| {s:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_unfinished(curves: dict[str, list[tuple[int, float]]], out_dir: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        ax.plot([s for s, _ in c], [v for _, v in c], marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    _zoom(ax, [v for c in curves.values() for _, v in c])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "loss-steps-unfinished.png"
    save_png(fig, path)
    return path


def arm_rows(arms: list[Arm]) -> list[dict]:
    """One dict per arm: the numbers of the report's table (and of --json)."""
    out = []
    for a in arms:
        loss, loss_sd = a.stat("val_loss")
        ppl, ppl_sd = a.stat("val_ppl")
        bpb, bpb_sd = a.stat("val_bpb")
        s = a.runs[0].summary
        (whole,), source = final_losses(a)
        full = mean_std(whole) if source == WHOLE_SPLIT else (math.nan, math.nan)
        out.append({"arm": a.name, "seeds": len(a.runs), "total_params": a.params["total"],
                    "active_params": a.params["active"], "steps": s["steps"], "tokens": s["tokens"],
                    "train_flops": s["train_flops"], "pf_days": s["pf_days"],
                    "tokens_per_s": statistics.mean(r.tokens_per_s for r in a.runs),
                    "train_s": statistics.mean(r.curve[-1][2] if r.curve else math.nan for r in a.runs),
                    "val_loss": loss, "val_loss_std": loss_sd, "val_ppl": ppl, "val_ppl_std": ppl_sd,
                    "val_bpb": bpb, "val_bpb_std": bpb_sd,
                    "val_loss_whole_split": full[0], "val_loss_whole_split_std": full[1]})
    return out


def loss_at_seconds(run: RunRecord, seconds: float) -> float:
    """The run's val loss at `seconds` of training, linear between its evaluations (nan
    before the first or after the last)."""
    pts = [(c[2], c[3]) for c in run.curve]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / (t1 - t0)
    return pts[-1][1] if pts and abs(pts[-1][0] - seconds) < 1e-9 else math.nan


def equal_time_rows(arms: list[Arm]) -> tuple[float, list[dict]]:
    """Every arm's val loss (mean ± std over seeds) at the training time at which the first arm
    to finish finished: the per-second comparison beside the per-step one."""
    t = min(r.curve[-1][2] for a in arms for r in a.runs if r.curve)
    rows = []
    for a in arms:
        m, sd = mean_std([loss_at_seconds(r, t) for r in a.runs])
        rows.append({"arm": a.name, "seconds": t, "val_loss": m, "val_loss_std": sd})
    return t, rows


def format_table(rows: list[dict]) -> str:
    head = ("| arm | seeds | total params | active params | train FLOPs | PF-days | tokens/s | train s "
            "| val loss | val ppl | val bpb | val loss, whole split |\n| --- |" + " ---: |" * 11)
    lines = [head]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['total_params']:,} | {r['active_params']:,} "
                     f"| {r['train_flops']:.3g} | {r['pf_days']:.3g} | {r['tokens_per_s']:,.0f} | {r['train_s']:,.0f} "
                     f"| {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {r['val_ppl']:.2f} ± {r['val_ppl_std']:.2f} "
                     f"| {r['val_bpb']:.4f} ± {r['val_bpb_std']:.4f} | "
                     + ("" if math.isnan(r["val_loss_whole_split"]) else
                        f"{r['val_loss_whole_split']:.4f} ± {r['val_loss_whole_split_std']:.4f}") + " |")
    return "\n".join(lines)


def plot(arms: list[Arm], out_dir: Path, prefix: str = "") -> list[Path]:
    """loss-tokens.png, loss-seconds.png and loss-params.png in out_dir; returns their paths."""
    plt = pyplot()
    paths = []
    axes = (("tokens", 0, "training tokens"), ("seconds", 1, "training seconds (measured tokens/s)"))
    for x_name, index, label in axes:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for a in arms:
            c = a.curve()
            if not c:
                continue
            xs, ys, sd = [p[index] for p in c], [p[2] for p in c], [p[3] for p in c]
            line, = ax.plot(xs, ys, label=f"{a.name} (n={len(a.runs)})")
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                            color=line.get_color(), alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        _zoom(ax, [p[2] for a in arms for p in a.curve()])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{prefix}loss-{x_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in arms:
        m, sd = a.stat("val_loss")
        ax.errorbar([a.params["total"]], [m], yerr=[sd], fmt="o", capsize=3, label=a.name)
        ax.annotate(a.name, (a.params["total"], m), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("total parameters")
    ax.set_ylabel("final validation loss (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{prefix}loss-params.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [*paths, path]


def _zoom(ax, values: list[float]) -> None:
    """Leave out the first steep evaluations so the differences at the end are visible."""
    if values:
        finals = sorted(values)
        low, high = finals[0], finals[min(len(finals) - 1, int(0.8 * len(finals)))]
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))


def _finished_sections(root: Path, arms: list[Arm], names: list[str], limit: int | None,
                       log: Callable[[str], None], text: list[str], speed: str | None = None
                       ) -> tuple[list[dict], list[Path]]:
    """The finished runs' sections, appended to text: table, equal-time table, zero-shot and
    pool size against diversity. Returns the table rows and the images written."""
    rows = arm_rows(arms)
    zeroshot = zeroshot_rows(arms, names, limit, log) if names else []
    gaps, corpora, notes = poolsize_rows(root, arms)
    per_arm, used = chosen_speeds(root, [a.name for a in arms], speed)
    missing = apply_speed(arms, per_arm)
    rows = arm_rows(arms)
    note = speed_note(used, missing)
    images = plot(arms, root)
    text += ["Generated by `samoe study report`. Final validation metrics are mean ± std over seeds (val loss, "
             "ppl and bpb from training's last evaluation; the whole split's from `samoe study eval`, where "
             "every seed has one); "
             + note, "", format_table(rows), ""]
    t, timed = equal_time_rows(arms)
    text += [f"At equal training time ({t:,.0f} s, when the first arm finished; val loss interpolated between "
             "evaluations):", "", "| arm | val loss at equal time |", "| --- | ---: |"]
    text += [f"| {r['arm']} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} |" for r in timed]
    versus = against_dense_rows(arms)
    if versus:
        text += ["", "## Against dense, seed by seed", "",
                 "Per step (equal tokens): each arm's final val loss against the `dense` arm's.", "",
                 format_against_dense(versus), "",
                 "In-training validation at each evaluation every seed made (mean over seeds): dense's val loss "
                 "and each arm's difference from it, by training tokens.", "",
                 format_gap_by_tokens(gap_by_tokens(arms))]
        by_arm = {r["arm"]: r for r in rows}
        for v in versus:
            by_arm[v["arm"]].update(vs_dense={k: x for k, x in v.items() if k not in ("arm", "seeds")})
    headline = headline_rows(arms)
    if headline:
        text += ["", "## Against dense and the standard MoE", "",
                 "Per step (equal tokens), final val loss: each arm's share of the gain of its group's `moe` over "
                 "its `dense` (a group: the arms named with one prefix, such as `L12-`), its 95% interval by the "
                 "delta method (three independent means, Student's t at Welch-Satterthwaite degrees of freedom), "
                 "and its total parameters against `moe`'s.", "", format_headline(headline)]
        by_arm = {r["arm"]: r for r in rows}
        for h in headline:
            by_arm[h["arm"]].update({k: v for k, v in h.items() if k not in ("arm", "seeds")})
        per_second = per_second_rows(arms, loss_at_seconds)
        text += ["", "Per second: each arm's share of the MoE's gain at the training time when the first run of its "
                 "group finished (val loss linear between evaluations; delta-method interval as above).", "",
                 format_per_second(per_second)]
        for r in per_second:
            by_arm[r["arm"]]["per_second"] = {k: v for k, v in r.items() if k != "arm"}
        rivals = equal_params_rows(arms)
        if rivals:
            text += ["", "## SaMoE K = 2 against the alternatives at its parameters", "",
                     f"Every arm of a group within {100 * EQUAL_PARAMS:.0f}% of its `samoe-k2`'s total parameters, "
                     "paired with it by seed (a seed gives every arm the same batches): the mean difference of "
                     "final val losses (positive: SaMoE K = 2 lower) with its 95% interval (Student's t on the "
                     "paired differences, n - 1 degrees of freedom), and the same in shares of the MoE's gain "
                     "over dense.", "", format_equal_params(rivals)]
            for r in rivals:
                by_arm[r["arm"]]["against_reference"] = {k: v for k, v in r.items() if k != "arm"}
        frontier = plot_frontier(headline, root)
        images += [frontier] if frontier else []
    pool_use = pool_use_rows(arms)
    if pool_use:
        text += ["", "## How SaMoE's layers use the pool", "",
                 "The coefficients at the end of training (summary.json), mean over seeds: each layer's entropy "
                 "and each pool layer's share of the model's layers.", "", format_pool_use(pool_use)]
    if zeroshot:
        items = f"the first {limit:,} items of each task" if limit is not None else "every item of each task"
        text += ["", "## Zero-shot scores of the best arms", "",
                 f"The {ZEROSHOT_BEST} arms with the lowest val loss and the dense arms (at most {ZEROSHOT_MAX_ARMS}), "
                 f"every seed scored by samoe's zero-shot scorer (dropless, as `samoe eval --task`) on {items}; "
                 "mean ± std over seeds.", "", format_zeroshot(zeroshot)]
        by_arm = {r["arm"]: r for r in rows}
        for z in zeroshot:
            by_arm[z["arm"]].setdefault("zeroshot", {})[z["task"]] = {k: v for k, v in z.items()
                                                                     if k not in ("arm", "task")}
    if gaps:
        text += ["", "## Pool size against data diversity", "", format_poolsize(gaps, corpora, notes)]
        by_arm = {r["arm"]: r for r in rows}
        for g in gaps:
            by_arm[g["arm"]].update(gap_to_moe=g["gap_to_moe"], gap_to_moe_se=g["gap_to_moe_se"])
        for r in rows:
            corpus = corpus_of(r["arm"])
            if corpus in corpora:
                r["corpus"] = corpus
                r["diversity"] = corpora[corpus]["diversity"]
        gap_plot = plot_gap_diversity(gaps, corpora, root)
        images += [gap_plot] if gap_plot else []
    return rows, images


def write_report(study_dir: str | Path, tasks: str | list[str] | None = None, limit: int | None = None,
                 log: Callable[[str], None] = lambda m: None, speed: str | None = None) -> tuple[Path, list[dict]]:
    """DIR/report.md, DIR/report.json and the PNGs; returns the report's path and the table rows
    (report.json's content). With `tasks`, the best arms' zero-shot scores (on the first `limit`
    items of each task) are added; a study with corpora gets the pool-size-against-diversity
    section and gap-diversity.png."""
    root = Path(study_dir)
    names = parse_tasks(tasks, limit)  # a bad task or limit fails before anything is read or scored
    unfinished, train_windows = unfinished_curves(root) if root.is_dir() else ({}, {})
    arms = collect(root, allow_empty=bool(unfinished))
    text = [f"# Study report: {root.name}", ""]
    rows, images = [], []
    if arms:
        rows, images = _finished_sections(root, arms, names, limit, log, text, speed)
    else:
        text.append("Generated by `samoe study report`. No run has finished yet.")
    if unfinished:
        text += ["", "## Runs in progress", "",
                 f"{len(unfinished)} run(s) without a {SUMMARY_FILE} yet: val loss at each evaluation so far "
                 "(each run's in-training evaluation).", "", format_unfinished(unfinished), "",
                 f"Mean training loss over each window of {TRAIN_WINDOW:,} steps, by the window's last step (runs of "
                 "one seed read the same batches, each scored before the model learns from it; held out for text "
                 "that no earlier batch held: all of a first epoch with data.sampling=epochs, not all with random "
                 "offsets):", "",
                 format_unfinished(train_windows)]
        images.append(plot_unfinished(unfinished, root))
    text += [""] + [f"![{p.stem}]({p.name})" for p in images]
    path = root / "report.md"
    write_text_atomic(path, "\n".join(text) + "\n")
    write_text_atomic(root / "report.json", json.dumps(rows, indent=1) + "\n")
    return path, rows
