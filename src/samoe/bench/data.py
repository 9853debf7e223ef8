"""(g) Data-layer benchmarks: near-duplicate removal and tokenisation throughput, each beside a
baseline from the same run, and training memory as the prepared dataset grows.

- near dedup (MinHash LSH) against exact dedup of the same short documents;
- BPE encoding against the byte tokenizer on the same text;
- peak RSS of `samoe train --preset tiny` on a prepared (memory-mapped) dataset and on the same
  text read into memory, at 1x and 10x the size.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from samoe.data.dedup import exact_dedup, near_dedup
from samoe.data.tokenizer import BPETokenizer, ByteTokenizer

# VmHWM of the child's own image (ru_maxrss would carry the parent's peak across fork + exec)
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


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def dedup_throughput(n: int) -> dict[str, float]:
    """Documents/s of exact and near dedup on n documents of 40 words (10% planted near copies)."""
    docs = synthetic_docs(n, 40)
    _, t_exact = _timed(exact_dedup, docs)
    kept, t_near = _timed(near_dedup, docs)
    return {"dedup_docs": n, "exact_dedup_docs_per_s": n / t_exact, "near_dedup_docs_per_s": n / t_near,
            "near_dedup_removed": n - len(kept), "near_dedup_planted": n // 10}


def tokenize_throughput(n: int) -> dict[str, float]:
    """Tokens/s of the byte tokenizer and of a 2048-token BPE on n documents of 200 words."""
    docs = synthetic_docs(n, 200, seed=1)
    out = {"tokenize_docs": n}
    for name, tok in [("byte", ByteTokenizer()), ("bpe2048", BPETokenizer.train(docs[:5000], 2048))]:
        ids, t = _timed(tok.encode_batch, docs)
        out[f"{name}_tokens_per_s"] = sum(map(len, ids)) / t
    return out


def _peak_rss_mib(argv: list[str]) -> int:
    out = subprocess.run([sys.executable, "-c", RSS_SNIPPET, *argv], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def training_rss(base_mb: float = 2.0) -> dict[str, float]:
    """Peak RSS (MiB) of 30 tiny training steps on a prepared dataset and on the same text file,
    at 1x and 10x base_mb of text."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for scale in (1, 10):
            text = tmp / f"x{scale}.txt"
            text.write_text("\n\n".join(synthetic_docs(int(base_mb * 1e6 * scale / 250), 40, seed=scale)))
            prep = tmp / f"prep{scale}"
            subprocess.run([sys.executable, "-m", "samoe.cli", "data", "prepare", str(text), "--out", str(prep),
                            "--tokenizer", "byte", "--no-near-dedup", "--quiet"], check=True, capture_output=True)
            train = ["train", "--preset", "tiny", "--max-steps", "30", "--quiet", "data.tokenizer=byte"]
            out[f"rss_prepared_x{scale}_mib"] = _peak_rss_mib([*train, "--data", str(prep),
                                                                 "--out", str(tmp / f"p{scale}")])
            out[f"rss_text_x{scale}_mib"] = _peak_rss_mib([*train, "--data", str(text),
                                                             "--out", str(tmp / f"t{scale}")])
            out[f"text_x{scale}_mb"] = text.stat().st_size / 1e6
    return out
