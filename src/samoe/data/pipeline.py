"""`samoe data prepare`: sources -> prepared-dataset directory (format in data/shards.py).

Stages, in order: read -> clean -> exact dedup -> near dedup -> mix -> split -> tokenizer ->
encode. Deduplication runs over all sources together (earlier sources win) and before the
split, so no duplicate pair can straddle train and validation; the split is
corpus.split_documents (by a hash of each document's text). The output is built in a temporary
sibling directory and renamed into place, so DIR is either the old dataset or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from samoe.data.corpus import split_documents
from samoe.data.dedup import exact_dedup, near_dedup
from samoe.data.options import PrepareOptions
from samoe.data.shards import FORMAT, META_FILE, is_prepared, token_dtype, write_shard
from samoe.data.sources import clean_document, mix, parse_source, read_source
from samoe.data.tokenizer import TOKENIZER_FILE, build_tokenizer, load_tokenizer
from samoe.errors import ConfigError, DataError
from samoe.fileio import write_text_atomic


class _Stages:
    """Rows of the report table: stage, documents in and out, a note, seconds."""

    def __init__(self):
        self.rows: list[dict] = []

    @contextmanager
    def __call__(self, name: str, docs_in: int | None):
        row = {"stage": name, "docs_in": docs_in, "docs_out": None, "note": "", "seconds": 0.0}
        t0 = time.perf_counter()
        yield row
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.rows.append(row)


def format_report(report: dict) -> str:
    """The readable stage table of a report."""
    lines = [f"{'stage':<12} {'docs in':>10} {'removed':>9} {'docs out':>10} {'seconds':>8}  note"]
    for r in report["stages"]:
        removed = "" if r["docs_in"] is None else f"{r['docs_in'] - r['docs_out']:,}"
        docs_in = "" if r["docs_in"] is None else f"{r['docs_in']:,}"
        lines.append(f"{r['stage']:<12} {docs_in:>10} {removed:>9} {r['docs_out']:>10,} {r['seconds']:>8.2f}  "
                     f"{r['note']}")
    lines.append(f"{'total':<12} {'':>10} {'':>9} {report['docs_out']:>10,} {report['seconds']:>8.2f}  "
                 f"train {report['train_tokens']:,} tokens, val {report['val_tokens']:,} tokens")
    return "\n".join(lines) + "\n"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """DataError unless out is absent, empty, or (with overwrite) a previously prepared dataset."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    if any(out.iterdir()):
        if not overwrite:
            raise DataError(f"output directory '{out}' is not empty; pass --overwrite to replace it")
        if not is_prepared(out):
            raise DataError(f"--overwrite only replaces a prepared dataset and '{out}' has no {META_FILE}; "
                            "choose another --out")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "dataset")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def _check_options(opts: PrepareOptions) -> None:
    """ConfigError for a setting that would only fail after the slow stages."""
    for ok, message in [
        (0 < opts.val_fraction < 1, f"--val-fraction must be in (0, 1), got {opts.val_fraction}"),
        (0 < opts.threshold < 1, f"--threshold must be in (0, 1), got {opts.threshold}"),
        (opts.shingle >= 1, f"--shingle must be at least 1, got {opts.shingle}"),
        (opts.num_perm >= 2, f"--num-perm must be at least 2, got {opts.num_perm}"),
        (opts.tokenizer != "bpe" or opts.vocab_size >= 258,
         f"--vocab-size must be at least 258, got {opts.vocab_size}"),
    ]:
        if not ok:
            raise ConfigError(message)


def prepare_dataset(sources: list[str], out, opts: PrepareOptions | None = None) -> dict:
    """Prepare `sources` (specs as in data/sources.py) into directory out; return the report.
    `opts`: PrepareOptions() when None."""
    opts = opts if opts is not None else PrepareOptions()
    out = Path(out)
    check_output_dir(out, opts.overwrite)
    parsed = [parse_source(s) for s in sources]
    if not parsed:
        raise DataError("no sources given")
    _check_options(opts)
    given_tok = None
    if opts.tokenizer not in ("bpe", "byte"):
        given_tok = load_tokenizer(opts.tokenizer)
    stage, bad_lines, t_start = _Stages(), [] if opts.skip_bad_lines else None, time.perf_counter()

    with stage("read", None) as row:
        groups = [read_source(s.spec, opts.text_field, bad_lines, opts.progress)
                  for s in tqdm(parsed, desc="read", unit="source", disable=not opts.progress, leave=False)]
        row["docs_out"] = sum(map(len, groups))
        if bad_lines:
            row["note"] = f"{len(bad_lines):,} malformed JSONL lines skipped"
    docs_in = row["docs_out"]

    with stage("clean", docs_in) as row:
        cleaned = [[c for c in map(clean_document, g) if len(c) >= opts.min_chars] for g in groups]
        for s, g in zip(parsed, cleaned):
            if not g:
                raise DataError(f"source '{s.spec}' has no documents of at least {opts.min_chars} characters")
        docs = [d for g in cleaned for d in g]
        owner = [i for i, g in enumerate(cleaned) for _ in g]
        row["docs_out"] = len(docs)

    with stage("exact dedup", len(docs)) as row:
        kept = exact_dedup(docs, opts.progress)
        row["docs_out"] = len(kept)
    exact_duplicates = len(docs) - len(kept)

    with stage("near dedup", len(kept)) as row:
        if opts.near_dedup:
            kept = [kept[i] for i in near_dedup([docs[i] for i in kept], opts.threshold, opts.shingle,
                                                opts.num_perm, progress=opts.progress)]
            row["note"] = f"threshold {opts.threshold}, {opts.shingle}-word shingles, {opts.num_perm} perms"
        else:
            row["note"] = "skipped"
        row["docs_out"] = len(kept)
    near_duplicates = row["docs_in"] - len(kept)

    with stage("mix", len(kept)) as row:
        deduped = [[] for _ in parsed]
        for i in kept:
            deduped[owner[i]].append(docs[i])
        mixed = mix(deduped, [s.weight for s in parsed])
        final = [d for g in mixed for d in g]
        row["docs_out"] = len(final)
        if any(s.weight is not None for s in parsed):
            row["note"] = "weights " + ", ".join(f"{s.weight or 1:g}" for s in parsed)

    with stage("split", len(final)) as row:
        train_docs, val_docs = split_documents(final, opts.val_fraction)
        row["docs_out"] = len(final)
        row["note"] = f"train {len(train_docs):,} docs, val {len(val_docs):,} docs"

    with stage("tokenizer", len(final)) as row:
        tok = given_tok or build_tokenizer(opts.tokenizer, train_docs, opts.vocab_size, opts.progress)
        row["docs_out"] = len(final)
        row["note"] = f"{'given ' + opts.tokenizer if given_tok else opts.tokenizer}, vocab {tok.vocab_size:,}"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        with stage("encode", len(final)) as row:
            t0 = time.perf_counter()
            train_tokens = write_shard(tmp / "train.bin", tok, train_docs, "encode train", opts.progress)
            val_tokens = write_shard(tmp / "val.bin", tok, val_docs, "encode val", opts.progress)
            row["docs_out"] = len(final)
            row["note"] = f"{(train_tokens + val_tokens) / (time.perf_counter() - t0):,.0f} tokens/s"
        report = {
            "docs_in": docs_in,
            "bad_lines_skipped": len(bad_lines or []),
            "short_or_empty": docs_in - len(docs),
            "exact_duplicates": exact_duplicates,
            "near_duplicates": near_duplicates,
            "mixture_dropped": len(kept) - len(final),
            "docs_out": len(final),
            "train_docs": len(train_docs),
            "val_docs": len(val_docs),
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "sources": [{"source": s.spec, "weight": s.weight, "docs_read": len(g), "docs_out": len(m),
                         "chars_out": sum(map(len, m))} for s, g, m in zip(parsed, groups, mixed)],
            "stages": stage.rows,
            "seconds": round(time.perf_counter() - t_start, 3),
            "settings": {k: v for k, v in asdict(opts).items() if k not in ("overwrite", "progress")},
        }
        meta = {
            "format": FORMAT, "version": 1, "dtype": token_dtype(tok.vocab_size).__name__,
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "splits": {"train": {"file": "train.bin", "tokens": train_tokens, "docs": len(train_docs)},
                       "val": {"file": "val.bin", "tokens": val_tokens, "docs": len(val_docs)}},
            "sources": list(sources), "settings": report["settings"],
        }
        tok.save(tmp / TOKENIZER_FILE)
        write_text_atomic(tmp / "report.json", json.dumps(report, indent=2) + "\n")
        write_text_atomic(tmp / "report.txt", format_report(report))
        write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
