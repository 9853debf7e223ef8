"""The `samoe data` verbs: `prepare` (sources -> prepared dataset) and `stats` (diversity metrics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from samoe.data.options import SAMPLE_WORDS, PrepareOptions
from samoe.data.pipeline import format_report, prepare_dataset
from samoe.data.shards import is_prepared, load_prepared
from samoe.data.sources import clean_document, mix, parse_source, read_source
from samoe.data.stats import corpus_stats, format_stats
from samoe.errors import ConfigError
from samoe.verbs import Verb

SOURCES_HELP = ("a text file, a .jsonl file, a directory of them, builtin:stdlib, builtin:stdlib-docs, or debian:NAME "
                "(bible-kjv-text, python3-doc, dict-gcide); append @WEIGHT for a weighted mixture")


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help="JSONL field that holds the text (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed JSONL lines (and count them) instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_prepare(args) -> int:
    opts = PrepareOptions(
        text_field=args.text_field, skip_bad_lines=args.skip_bad_lines, min_chars=args.min_chars,
        near_dedup=not args.no_near_dedup, threshold=args.threshold, shingle=args.shingle,
        num_perm=args.num_perm, val_fraction=args.val_fraction, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, overwrite=args.overwrite, progress=not args.quiet,
    )
    report = prepare_dataset(args.sources, args.out, opts)
    print(format_report(report), end="")
    print(f"prepared dataset in {args.out} (train with: samoe train --data {args.out})")
    return 0


def _target_documents(target: str, args) -> list[str]:
    """Documents of one stats target: a prepared directory (its shards decoded), or sources
    joined by '+' (a mixture, weights as in prepare), cleaned as prepare cleans them."""
    if is_prepared(target):
        tok, train, val = load_prepared(target)
        docs = []
        for stream in (train, val):
            ends = [-1, *(stream.tokens == tok.eot_id).nonzero()[0].tolist()]
            docs += [tok.decode(stream.tokens[a + 1 : b].tolist()) for a, b in zip(ends, ends[1:])]
        return docs
    parts = [target] if Path(target).exists() else target.split("+")
    sources = [parse_source(p) for p in parts]
    bad = [] if args.skip_bad_lines else None
    groups = [[c for c in map(clean_document, read_source(s.spec, args.text_field, bad, not args.quiet)) if c]
              for s in sources]
    return [d for g in mix(groups, [s.weight for s in sources]) for d in g]


def _label(target: str, i: int) -> str:
    short = target.removeprefix("debian:")
    return short if len(short) <= 20 else f"corpus {i}"


def cmd_stats(args) -> int:
    if args.sample_words < 1:
        raise ConfigError(f"--sample-words must be at least 1, got {args.sample_words}")
    results = {t: corpus_stats(_target_documents(t, args), args.sample_words, not args.quiet) for t in args.targets}
    if args.json:
        print(json.dumps(results[args.targets[0]] if len(args.targets) == 1 else results, indent=2))
        return 0
    labels = {t: _label(t, i) for i, t in enumerate(args.targets, 1)}
    print(format_stats({labels[t]: r for t, r in results.items()}), end="")
    for t, label in labels.items():
        if label != t.removeprefix("debian:"):
            print(f"{label} = {t}")
    return 0


def prepare_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Read, clean, exact- and near-deduplicate, mix, split by document, tokenise and write memmap "
                     "token shards + tokenizer.json + meta.json + report.json/report.txt into --out (train on it "
                     "with samoe train --data DIR).")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--out", required=True, help="output directory (must be new or empty, see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a previously prepared dataset in --out")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents for validation")
    p.add_argument("--tokenizer", default="bpe", help="bpe (trained on the training split), byte, or a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=PrepareOptions.vocab_size, help="BPE vocabulary size")
    p.add_argument("--threshold", type=float, default=PrepareOptions.threshold,
                   help="near-duplicate Jaccard threshold (MinHash LSH)")
    p.add_argument("--shingle", type=int, default=PrepareOptions.shingle, help="words per shingle")
    p.add_argument("--num-perm", type=int, default=PrepareOptions.num_perm, help="MinHash permutations")
    p.add_argument("--no-near-dedup", action="store_true", help="only remove exact duplicates")
    p.add_argument("--min-chars", type=int, default=PrepareOptions.min_chars,
                   help="drop cleaned documents shorter than this")
    _source_args(p)


def stats_args(p: argparse.ArgumentParser) -> None:
    p.description = ("One column per TARGET: a prepared dataset directory, or SOURCE[+SOURCE...] (a weighted "
                     "mixture with SOURCE@WEIGHT). Sources: " + SOURCES_HELP)
    p.add_argument("targets", nargs="+", metavar="TARGET")
    p.add_argument("--sample-words", type=int, default=SAMPLE_WORDS,
                   help="words in the fixed-size sample for entropy, distinct-n, MATTR and compression")
    p.add_argument("--json", action="store_true", help="a JSON object (keyed by target when there are several)")
    _source_args(p)


DATA_VERBS = (
    Verb("prepare", "sources -> cleaned, deduplicated, split, tokenised shards in --out", prepare_args, cmd_prepare),
    Verb("stats", "diversity metrics: entropy, distinct-n, MATTR, compression, duplicates", stats_args, cmd_stats),
)
