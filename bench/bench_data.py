"""Data-layer benchmarks: near-dup throughput, tokenisation throughput, training RSS vs dataset size.

    python bench/bench_data.py [--docs 100000] [--base-mb 2] [--skip-rss]

Each speed is reported beside a baseline measured in the same run (the machines are shared and
noisy): near dedup against exact dedup of the same documents, BPE encoding against the byte
tokenizer. Memory: peak RSS of `samoe train --preset tiny --max-steps 30` on a prepared dataset
(memmapped shards) and on the same text read into memory, at 1x and 10x the size.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from samoe.data.dedup import exact_dedup, near_dedup
from samoe.data.tokenizer import BPETokenizer, ByteTokenizer

# VmHWM (peak RSS of this process image), not ru_maxrss: Linux carries ru_maxrss across
# fork+exec, so it would report the benchmark's own peak.
RSS_SNIPPET = ("import re, sys; from samoe.cli import main; rc = main(sys.argv[1:]); "
               "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024); "
               "sys.exit(rc)")


def synthetic_docs(n: int, words: int, seed: int = 0) -> list[str]:
    """n documents of `words` Zipf-distributed words; every 10th is a copy of an earlier one with
    one word appended (a near duplicate: Jaccard (words-4)/(words-3) of 5-word shingles)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    docs = []
    for i in range(n):
        if i % 10 == 9:
            docs.append(docs[rng.randrange(i)] + " appended")
        else:
            docs.append(" ".join(rng.choices(vocab, weights, k=words)))
    return docs


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_dedup(n: int) -> None:
    docs = synthetic_docs(n, 40)
    kept_exact, t_exact = timed(exact_dedup, docs)
    kept_near, t_near = timed(near_dedup, docs)
    print(f"dedup on {n:,} short documents (40 words, 10% near copies, 1 word appended):")
    print(f"  exact dedup  {n / t_exact:>12,.0f} docs/s  (baseline)")
    print(f"  near dedup   {n / t_near:>12,.0f} docs/s  ({t_exact / t_near:.3f}x exact); "
          f"removed {n - len(kept_near):,} of {n // 10:,} planted")


def bench_tokenize(docs: list[str]) -> None:
    bpe = BPETokenizer.train(docs[:5000], 2048)
    for name, tok in [("byte", ByteTokenizer()), ("bpe 2048", bpe)]:
        ids, t = timed(tok.encode_batch, docs)
        rate = sum(map(len, ids)) / t
        if name == "byte":
            base = rate
        print(f"  {name:<10} {rate:>14,.0f} tokens/s  {len(''.join(docs).encode()) / t / 1e6:8.1f} MB/s"
              f"  ({rate / base:.3f}x byte)")


def peak_rss_mb(argv: list[str]) -> int:
    out = subprocess.run([sys.executable, "-c", RSS_SNIPPET, *argv], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def bench_rss(base_mb: float, tmp: Path) -> None:
    print("peak RSS of `samoe train --preset tiny --max-steps 30` (byte tokenizer):")
    for scale in (1, 10):
        n = int(base_mb * 1e6 * scale / 250)  # documents of about 250 bytes
        text = tmp / f"x{scale}.txt"
        text.write_text("\n\n".join(synthetic_docs(n, 40, seed=scale)))
        prep = tmp / f"prep{scale}"
        subprocess.run([sys.executable, "-m", "samoe.cli", "data", "prepare", str(text), "--out", str(prep),
                        "--tokenizer", "byte", "--no-near-dedup", "--quiet"], check=True, capture_output=True)
        train = ["train", "--preset", "tiny", "--max-steps", "30", "--quiet", "data.tokenizer=byte"]
        mem = peak_rss_mb([*train, "--data", str(prep), "--out", str(tmp / f"run-p{scale}")])
        txt = peak_rss_mb([*train, "--data", str(text), "--out", str(tmp / f"run-t{scale}")])
        size = text.stat().st_size / 1e6
        print(f"  {scale:>2}x ({size:6.1f} MB text): prepared dir {mem:6,} MB   text file in memory {txt:6,} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--base-mb", type=float, default=2.0, help="text size of the 1x dataset for the RSS check")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--only-rss", action="store_true")
    args = ap.parse_args()
    print("$ python " + " ".join(sys.argv))
    if not args.only_rss:
        bench_dedup(args.docs)
        print(f"tokenisation of {args.docs // 5:,} documents of 200 words:")
        bench_tokenize(synthetic_docs(args.docs // 5, 200, seed=1))
    if not args.skip_rss:
        with tempfile.TemporaryDirectory() as tmp:
            bench_rss(args.base_mb, Path(tmp))


if __name__ == "__main__":
    main()
