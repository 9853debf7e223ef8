"""`samoe study report DIR`: a study directory's runs as one Markdown report with plots.

Runs are found by their summary.json anywhere under DIR; a run at DIR/[corpus/]arm/seed{s} belongs
to arm `[corpus/]arm`. Per arm, over its seeds:

- val loss / ppl / bpb: mean ± sample standard deviation (n - 1) of the final evaluations;
- tokens/s: the median over logged steps of each run (evaluation excluded), then the mean
  over seeds;
- training time of a run: Σ over logged rows of (steps since the previous row) × tokens per
  step / that row's tokens/s, so the wall-clock axis is the run's own measured speed and
  excludes evaluation and checkpointing;
- curves: val loss at each evaluation step, mean over seeds with a ± std band;
- at equal training time: each arm's val loss when the first arm finished training.

The plots: val loss vs tokens, val loss vs training seconds, and final val loss vs total
parameters (each arm one point with its std as an error bar: the efficiency frontier).

With tasks (`--task`): the zero-shot scores of the best arms (`best_arms`: the 3 lowest mean val
losses, then the arms named dense*, at most 5), every seed scored by samoe's own scorer
(samoe.eval.zeroshot, dropless, as `samoe eval --task`) and reported as mean ± std over seeds.
Each run's scores are cached in RUN/zeroshot-<task>-<limit>.json and reused while the run's
step count and the task's items are unchanged.

Pool size against diversity, for a study with corpora (DIR/<corpus>/<arm>/seed{s}) holding an
arm `moe` and arms `samoe-k*`: per corpus, each SaMoE arm's gap = its mean val loss - the moe
arm's (standard error sqrt(sd_a^2/n_a + sd_moe^2/n_moe)), against the diversity measures of
samoe.data.stats on the corpus's training split (the documents the runs trained on, read from
their config.yaml's data.*; cached in DIR/<corpus>/diversity.json).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from samoe.data.corpus import load_corpus, split_documents
from samoe.data.options import SAMPLE_WORDS
from samoe.data.shards import is_prepared, load_prepared, read_meta
from samoe.data.stats import corpus_stats
from samoe.errors import DataError, UserError
from samoe.eval import tasks as tasklib
from samoe.eval.zeroshot import Scorer, evaluate_task, load_scorer
from samoe.fileio import write_text_atomic
from samoe.runs import CONFIG_FILE, SUMMARY_FILE, read_json, read_metrics
from samoe.study.grid import SPEED_FILE


@dataclass
class Run:
    path: Path
    summary: dict
    curve: list[tuple[int, int, float, float]]  # (step, tokens, seconds, val_loss)
    tokens_per_s: float


@dataclass
class Arm:
    name: str
    runs: list[Run] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float]:
        return mean_std([r.summary[key] for r in self.runs])

    @property
    def params(self) -> dict:
        return self.runs[0].summary["params"]

    def curve(self) -> list[tuple[int, float, float, float, float]]:
        """(tokens, mean seconds, mean val loss, std, n) at the steps every seed evaluated."""
        steps = set.intersection(*({c[0] for c in r.curve} for r in self.runs))
        out = []
        for s in sorted(steps):
            rows = [next(c for c in r.curve if c[0] == s) for r in self.runs]
            m, sd = mean_std([c[3] for c in rows])
            out.append((rows[0][1], statistics.mean(c[2] for c in rows), m, sd, len(rows)))
        return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; nan if any value is nan)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def read_run(path: Path) -> Run:
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
    return Run(path, summary, curve, speed)


def apply_speed(arms: list[Arm], speed: dict) -> list[str]:
    """Put each arm's training time on the tokens/s of `speed` (samoe study speed's speed.json):
    a run's seconds at an evaluation become its tokens / that speed. Returns the arms that had
    no measured speed (they keep their logged tokens/s)."""
    missing = []
    for a in arms:
        tps = speed["tokens_per_s"].get(a.name)
        if tps is None:
            missing.append(a.name)
            continue
        for r in a.runs:
            r.curve = [(step, tokens, tokens / tps, loss) for step, tokens, _, loss in r.curve]
            r.tokens_per_s = tps
    return missing


def collect(study_dir: str | Path) -> list[Arm]:
    """The arms of a study directory, in sorted order of their names."""
    root = Path(study_dir)
    if not root.is_dir():
        raise UserError(f"study directory '{root}' does not exist")
    arms: dict[str, Arm] = {}
    for summary in sorted(root.rglob(SUMMARY_FILE)):
        run_dir = summary.parent
        rel = run_dir.relative_to(root).parts
        name = "/".join(rel[:-1]) if len(rel) > 1 and rel[-1].startswith("seed") else "/".join(rel)
        arms.setdefault(name, Arm(name)).runs.append(read_run(run_dir))
    if not arms:
        raise UserError(f"'{root}' holds no finished runs (no {SUMMARY_FILE} below it)")
    return [arms[k] for k in sorted(arms)]


def arm_rows(arms: list[Arm]) -> list[dict]:
    """One dict per arm: the numbers of the report's table (and of --json)."""
    out = []
    for a in arms:
        loss, loss_sd = a.stat("val_loss")
        ppl, ppl_sd = a.stat("val_ppl")
        bpb, bpb_sd = a.stat("val_bpb")
        s = a.runs[0].summary
        out.append({"arm": a.name, "seeds": len(a.runs), "total_params": a.params["total"],
                    "active_params": a.params["active"], "steps": s["steps"], "tokens": s["tokens"],
                    "train_flops": s["train_flops"], "pf_days": s["pf_days"],
                    "tokens_per_s": statistics.mean(r.tokens_per_s for r in a.runs),
                    "train_s": statistics.mean(r.curve[-1][2] if r.curve else math.nan for r in a.runs),
                    "val_loss": loss, "val_loss_std": loss_sd, "val_ppl": ppl, "val_ppl_std": ppl_sd,
                    "val_bpb": bpb, "val_bpb_std": bpb_sd})
    return out


def loss_at_seconds(run: Run, seconds: float) -> float:
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
            "| val loss | val ppl | val bpb |\n| --- |" + " ---: |" * 10)
    lines = [head]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['total_params']:,} | {r['active_params']:,} "
                     f"| {r['train_flops']:.3g} | {r['pf_days']:.3g} | {r['tokens_per_s']:,.0f} | {r['train_s']:,.0f} "
                     f"| {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {r['val_ppl']:.2f} ± {r['val_ppl_std']:.2f} "
                     f"| {r['val_bpb']:.4f} ± {r['val_bpb_std']:.4f} |")
    return "\n".join(lines)


def plot(arms: list[Arm], out_dir: Path, prefix: str = "") -> list[Path]:
    """loss-tokens.png, loss-seconds.png and loss-params.png in out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# --------------------------------------------------------------------------- zero-shot scores

ZEROSHOT_BEST, ZEROSHOT_MAX_ARMS = 3, 5
ZEROSHOT_METRICS = ("acc", "acc_norm", "ppl")


def base_name(arm: str) -> str:
    """The arm's own name, without its corpus."""
    return arm.rsplit("/", 1)[-1]


def _loss_order(arm: Arm) -> tuple[bool, float]:
    m = arm.stat("val_loss")[0]
    return (math.isnan(m), m)


def best_arms(arms: list[Arm]) -> list[Arm]:
    """The arms to score zero-shot: the ZEROSHOT_BEST with the lowest mean val loss, then every
    arm named dense* (best first), at most ZEROSHOT_MAX_ARMS; in order of mean val loss."""
    ordered = sorted(arms, key=_loss_order)
    best = ordered[:ZEROSHOT_BEST]
    dense = [a for a in ordered if base_name(a.name).startswith("dense") and a not in best]
    chosen = (best + dense)[:ZEROSHOT_MAX_ARMS]
    return sorted(chosen, key=_loss_order)


def parse_tasks(text: str | list[str] | None, limit: int | None) -> list[str]:
    """The task names of --task (comma-separated), checked before anything is scored."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text or []) if n.strip()]
    if text is not None and not names:
        raise UserError("--task needs at least one task name or .jsonl path")
    if limit is not None and not names:
        raise UserError("--limit limits the items of the zero-shot tasks; it goes with --task")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} is invalid; expected an integer >= 1")
    tasklib.check_names(names)
    return names


def task_digest(task: tasklib.Task) -> str:
    """sha256 of a task's items: a cached score belongs to exactly these items."""
    items = [tasklib.item_json(i, task.kind) for i in task.items]
    return hashlib.sha256(json.dumps([task.kind, items], ensure_ascii=False).encode()).hexdigest()


def zeroshot_cache(run_dir: Path, name: str, limit: int | None) -> Path:
    """RUN/zeroshot-<task>-<limit>.json (a task file by its stem; limit 'all' without one)."""
    slug = name if name in tasklib.BUILTIN else Path(name).stem
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", slug) or "task"
    return run_dir / f"zeroshot-{slug}-{limit if limit is not None else 'all'}.json"


def score_run(run: Run, loaded: dict[str, tasklib.Task], limit: int | None, log: Callable[[str], None],
              label: str) -> dict[str, dict]:
    """Each task's metrics for one run: from its cache when the run's steps and the task's items
    are those it was scored with, else scored (the model loaded once, dropless) and cached."""
    out: dict[str, dict] = {}
    scorer: Scorer | None = None
    for name, task in loaded.items():
        cache, digest = zeroshot_cache(run.path, name, limit), task_digest(task)
        if cache.is_file():
            try:
                cached = json.loads(cache.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cached = {}
            if (cached.get("steps") == run.summary["steps"] and cached.get("task_sha256") == digest
                    and isinstance(cached.get("metrics"), dict)):
                out[name] = cached["metrics"]
                continue
        if scorer is None:
            scorer = load_scorer(run.path)
        metrics = evaluate_task(scorer, task)
        write_text_atomic(cache, json.dumps({"task": name, "limit": limit, "steps": run.summary["steps"],
                                             "task_sha256": digest, "metrics": metrics}, indent=1) + "\n")
        log(f"zero-shot {label} on {name}: acc {metrics['acc']:.4f}")
        out[name] = metrics
    return out


def zeroshot_rows(arms: list[Arm], names: list[str], limit: int | None,
                  log: Callable[[str], None] = lambda m: None) -> list[dict]:
    """One dict per (best arm, task): seeds, items, and acc / acc_norm / ppl (where the task has
    it) as mean and sample std over the arm's seeds, and chance."""
    loaded = {n: tasklib.load_task(n, limit) for n in names}  # every task read before any scoring
    rows = []
    for a in best_arms(arms):
        per_run = [score_run(r, loaded, limit, log, f"{a.name}/{r.path.name}") for r in a.runs]
        for name in names:
            scores = [s[name] for s in per_run]
            row = {"arm": a.name, "task": name, "seeds": len(scores), "n": scores[0]["n"]}
            for key in ZEROSHOT_METRICS:
                if all(key in s for s in scores):
                    row[key], row[f"{key}_std"] = mean_std([s[key] for s in scores])
            if "chance" in scores[0]:
                row["chance"] = scores[0]["chance"]
            rows.append(row)
    return rows


def format_zeroshot(rows: list[dict]) -> str:
    def pm(r: dict, key: str, digits: int = 4) -> str:
        return f"{r[key]:.{digits}f} ± {r[key + '_std']:.{digits}f}" if key in r else "-"

    lines = ["| arm | task | seeds | items | acc | acc_norm | chance |", "| --- | --- |" + " ---: |" * 5]
    for r in rows:
        chance = f"{r['chance']:.4f}" if "chance" in r else "-"
        acc = pm(r, "acc") + (f" (ppl {pm(r, 'ppl', 2)})" if "ppl" in r else "")
        lines.append(f"| {r['arm']} | {r['task']} | {r['seeds']} | {r['n']:,} | {acc} | {pm(r, 'acc_norm')} "
                     f"| {chance} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pool size against diversity

DIVERSITY_FILE = "diversity.json"
MEASURES = {"unigram_entropy": "unigram entropy (bits/word)", "distinct_1": "distinct-1",
            "distinct_2": "distinct-2", "distinct_3": "distinct-3", "distinct_4": "distinct-4",
            "mattr": "MATTR", "compression_ratio": "compression ratio", "duplicate_rate": "duplicate rate"}


def corpus_of(arm: str) -> str | None:
    return arm.rsplit("/", 1)[0] if "/" in arm else None


def training_documents(data: dict) -> list[str]:
    """The training split of a run's data (its config's data.*): a prepared directory's training
    shard decoded into documents, else the training side of the split `samoe train` makes."""
    path = data.get("path")
    if is_prepared(path):
        tok, train, _ = load_prepared(path)
        ends = [-1, *(train.tokens == tok.eot_id).nonzero()[0].tolist()]
        return [tok.decode(train.tokens[a + 1:b].tolist()) for a, b in zip(ends, ends[1:])]
    docs = load_corpus(path, data.get("corpus", "stdlib"))
    return split_documents(docs, data.get("val_fraction", 0.05))[0]


def _run_data(run: Run) -> dict:
    """The data.* section of a run's config.yaml (read as YAML, not validated)."""
    try:
        cfg = yaml.safe_load((run.path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return cfg.get("data") or {} if isinstance(cfg, dict) else {}


def corpus_diversity(root: Path, corpus: str, runs: list[Run]) -> tuple[dict | None, str]:
    """(samoe.data.stats of the corpus's training split, a description of the data) or (None, why
    not). Cached in DIR/<corpus>/diversity.json, recomputed when the data it names changes."""
    data = _run_data(runs[0])
    path = data.get("path")
    if not data:
        return None, f"'{runs[0].path / CONFIG_FILE}' is missing or unreadable"
    if path is not None and not Path(path).exists():
        return None, f"its data path '{path}' does not exist (relative paths are read from the current directory)"
    if len({json.dumps(_run_data(r), sort_keys=True) for r in runs}) > 1:
        note = f"runs differ in their data; measured on {runs[0].path.relative_to(root)}'s"
    else:
        note = ""
    key = {"path": str(Path(path).resolve()) if path is not None else None,
           "corpus": None if path is not None else data.get("corpus", "stdlib"),
           "val_fraction": None if is_prepared(path) else data.get("val_fraction", 0.05),
           "sample_words": SAMPLE_WORDS}
    described = path if path is not None else f"built-in {key['corpus']}"
    try:
        if is_prepared(path):
            key["train"] = read_meta(path)["splits"]["train"]
        cache = root / corpus / DIVERSITY_FILE
        if cache.is_file():
            try:
                cached = json.loads(cache.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cached = {}
            if cached.get("key") == key and isinstance(cached.get("stats"), dict):
                return cached["stats"], described + (f" ({note})" if note else "")
        stats = corpus_stats(training_documents(data))
    except DataError as e:
        return None, f"its data cannot be read ({e})"
    write_text_atomic(cache, json.dumps({"data": described, "split": "train", "key": key, "stats": stats},
                                        indent=1) + "\n")
    return stats, described + (f" ({note})" if note else "")


def poolsize_rows(root: Path, arms: list[Arm]) -> tuple[list[dict], dict[str, dict], list[str]]:
    """(per SaMoE arm of each corpus: its gap to the corpus's moe arm; per corpus: its data and
    diversity; notes on what is left out). Empty when the study has no corpus with an arm `moe`
    and arms `samoe-k*`."""
    by_corpus: dict[str, dict[str, Arm]] = {}
    for a in arms:
        if corpus_of(a.name) is not None:
            by_corpus.setdefault(corpus_of(a.name), {})[base_name(a.name)] = a
    gaps, corpora, notes = [], {}, []
    for corpus, named in by_corpus.items():
        samoe = [a for n, a in sorted(named.items()) if n.startswith("samoe-k")]
        if not samoe:
            continue
        if "moe" not in named:
            notes.append(f"corpus {corpus}: no `moe` arm, so no gap to the standard MoE")
            continue
        moe, moe_sd = named["moe"].stat("val_loss")
        n_moe = len(named["moe"].runs)
        for a in samoe:
            m, sd = a.stat("val_loss")
            gaps.append({"corpus": corpus, "arm": a.name, "seeds": len(a.runs), "val_loss": m, "val_loss_std": sd,
                         "moe_val_loss": moe, "gap_to_moe": m - moe,
                         "gap_to_moe_se": math.sqrt(sd ** 2 / len(a.runs) + moe_sd ** 2 / n_moe)})
        stats, described = corpus_diversity(root, corpus, [r for a in named.values() for r in a.runs])
        corpora[corpus] = {"data": described if stats is not None else None, "diversity": stats}
        if stats is None:
            notes.append(f"corpus {corpus}: no diversity, its points are left out of gap-diversity.png: {described}")
    return gaps, corpora, notes


def format_poolsize(gaps: list[dict], corpora: dict[str, dict], notes: list[str]) -> str:
    lines = ["Diversity of each corpus: the measures of `samoe data stats` on the documents of the training split "
             "its runs read (cached in DIR/<corpus>/diversity.json):", "",
             "| corpus | data | documents | " + " | ".join(MEASURES.values()) + " |",
             "| --- | --- | ---: |" + " ---: |" * len(MEASURES)]
    for corpus, c in corpora.items():
        d = c["diversity"]
        cells = [c["data"], f"{d['documents']:,}", *(f"{d[k]:.4f}" for k in MEASURES)] if d else \
            ["-"] * (2 + len(MEASURES))
        lines.append(f"| {corpus} | " + " | ".join(cells) + " |")
    lines += ["", "Gap to the standard MoE of the same corpus (mean val loss of the arm - that of `moe`; "
              "positive: SaMoE is worse; ± its standard error):", "",
              "| corpus | arm | seeds | val loss | moe val loss | gap to moe |", "| --- | --- |" + " ---: |" * 4]
    lines += [f"| {g['corpus']} | {g['arm']} | {g['seeds']} | {g['val_loss']:.4f} ± {g['val_loss_std']:.4f} "
              f"| {g['moe_val_loss']:.4f} | {g['gap_to_moe']:+.4f} ± {g['gap_to_moe_se']:.4f} |" for g in gaps]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def plot_gap_diversity(gaps: list[dict], corpora: dict[str, dict], out_dir: Path) -> Path | None:
    """gap-diversity.png: each SaMoE arm's gap to moe against each diversity measure of its
    corpus (one subplot per measure); None when no corpus has a diversity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [g for g in gaps if corpora[g["corpus"]]["diversity"] is not None]
    if not points:
        return None
    series: dict[str, list[dict]] = {}
    for g in points:
        series.setdefault(base_name(g["arm"]), []).append(g)
    cols = 4
    rows = math.ceil(len(MEASURES) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, MEASURES.items()):
        for name, gs in series.items():
            gs = sorted(gs, key=lambda g: corpora[g["corpus"]]["diversity"][key])
            xs = [corpora[g["corpus"]]["diversity"][key] for g in gs]
            ax.errorbar(xs, [g["gap_to_moe"] for g in gs], yerr=[g["gap_to_moe_se"] for g in gs], fmt="o-",
                        capsize=3, label=name)
        for corpus in dict.fromkeys(g["corpus"] for g in points):
            x = corpora[corpus]["diversity"][key]
            y = max(g["gap_to_moe"] for g in points if g["corpus"] == corpus)
            ax.annotate(corpus, (x, y), fontsize=7, xytext=(3, 5), textcoords="offset points")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("val loss gap to MoE")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(MEASURES):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("SaMoE's gap to the standard MoE against corpus diversity (mean over seeds ± s.e.)")
    fig.tight_layout()
    path = out_dir / "gap-diversity.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(study_dir: str | Path, tasks: str | list[str] | None = None, limit: int | None = None,
                 log: Callable[[str], None] = lambda m: None) -> tuple[Path, list[dict]]:
    """DIR/report.md, DIR/report.json and the PNGs; returns the report's path and the table rows
    (report.json's content). With `tasks`, the best arms' zero-shot scores (on the first `limit`
    items of each task) are added; a study with corpora gets the pool-size-against-diversity
    section and gap-diversity.png."""
    root = Path(study_dir)
    names = parse_tasks(tasks, limit)  # a bad task or limit fails before anything is read or scored
    arms = collect(root)
    rows = arm_rows(arms)
    zeroshot = zeroshot_rows(arms, names, limit, log) if names else []
    gaps, corpora, notes = poolsize_rows(root, arms)
    speed_note = ("tokens/s is each run's median over logged steps; train s excludes evaluation.")
    if (root / SPEED_FILE).is_file():
        speed = read_json(root / SPEED_FILE)
        missing = apply_speed(arms, speed)
        rows = arm_rows(arms)
        speed_note = (f"tokens/s and train s come from `samoe study speed` ({SPEED_FILE}: every arm's optimiser "
                      f"step timed round-robin on random tokens, {speed['threads']} thread(s), median of "
                      f"{speed['repeats']}, {speed['measured']}), not from the runs, which may have shared the "
                      "machine" + (f"; arms without a measured speed keep their logged one: {', '.join(missing)}."
                                   if missing else "."))
    images = plot(arms, root)
    text = [f"# Study report: {root.name}", "",
            "Generated by `samoe study report`. Final validation metrics are mean ± std over seeds; "
            + speed_note, "", format_table(rows), ""]
    t, timed = equal_time_rows(arms)
    text += [f"At equal training time ({t:,.0f} s, when the first arm finished; val loss interpolated between "
             "evaluations):", "", "| arm | val loss at equal time |", "| --- | ---: |"]
    text += [f"| {r['arm']} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} |" for r in timed]
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
    text += [""] + [f"![{p.stem}]({p.name})" for p in images]
    path = root / "report.md"
    write_text_atomic(path, "\n".join(text) + "\n")
    write_text_atomic(root / "report.json", json.dumps(rows, indent=1) + "\n")
    return path, rows
