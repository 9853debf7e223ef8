"""Pool size against data diversity for `samoe study report`, for a study with corpora.

For a study at DIR/<corpus>/<arm>/seed{s} holding an arm `moe` and arms `samoe-k*`: per corpus,
each SaMoE arm's gap = its mean val loss - the moe arm's, with standard error
sqrt(sd_a^2/n_a + sd_moe^2/n_moe), against the diversity measures of samoe.data.stats on the
corpus's training split (the documents the runs trained on, read from their config.yaml's data.*;
cached in DIR/<corpus>/diversity.json). gap-diversity.png plots the gaps against each measure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from samoe.data.corpus import load_corpus, split_documents
from samoe.data.options import SAMPLE_WORDS
from samoe.data.shards import is_prepared, load_prepared, read_meta
from samoe.data.stats import corpus_stats
from samoe.errors import DataError
from samoe.fileio import read_cache, write_text_atomic
from samoe.plots import pyplot
from samoe.runs import CONFIG_FILE
from samoe.study.runs_table import Arm, RunRecord, base_name, by_corpus

DIVERSITY_FILE = "diversity.json"
MEASURES = {"unigram_entropy": "unigram entropy (bits/word)", "distinct_1": "distinct-1",
            "distinct_2": "distinct-2", "distinct_3": "distinct-3", "distinct_4": "distinct-4",
            "mattr": "MATTR", "compression_ratio": "compression ratio", "duplicate_rate": "duplicate rate"}


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


def _run_data(run: RunRecord) -> dict:
    """The data.* section of a run's config.yaml (read as YAML, not validated)."""
    try:
        cfg = yaml.safe_load((run.path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return cfg.get("data") or {} if isinstance(cfg, dict) else {}


def corpus_diversity(root: Path, corpus: str, runs: list[RunRecord]) -> tuple[dict | None, str]:
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
        cached = read_cache(cache)
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
    gaps, corpora, notes = [], {}, []
    for corpus, named in by_corpus(arms).items():
        if corpus is None:
            continue
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
    plt = pyplot()
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

