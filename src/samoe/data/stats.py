"""Diversity metrics of a corpus (`samoe data stats`).

Words are the \\w+ runs and single punctuation characters of the NFKC-normalised, lowercased
text. Metrics that depend on corpus size are computed on a fixed-size sample, so that corpora
of different sizes compare: documents in the order of sha256("sample:" + text), their words
taken until `sample_words` words (the last document cut short). On the sample:

    unigram_entropy    H = -sum_w p_w log2 p_w, p_w the frequency of word w (bits per word)
    distinct_n         |distinct n-grams| / |n-grams|, n-grams within documents, n = 1..4
    mattr              mean over every window of `window` consecutive words of types / window
                       (moving-average type-token ratio, Covington & McFall 2010)
    compression_ratio  bytes / zlib-compressed bytes (level 9) of the sample's words joined by
                       spaces; higher means more redundant text

On the whole corpus: documents, words, vocab_size (distinct words), document length in words
(mean, min, p10, p50, p90, max) and duplicate_rate = (exact + near duplicates) / documents,
with the defaults of data/dedup.py.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter

import numpy as np
from tqdm import tqdm

from samoe.data.dedup import exact_dedup, near_dedup
from samoe.data.options import SAMPLE_WORDS

_TOKEN = re.compile(r"\w+|[^\w\s]")
MATTR_WINDOW = 500


def words(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def sample(docs_words: list[list[str]], docs: list[str], size: int) -> list[list[str]]:
    """The word lists of the sample (module docstring), one per document used."""
    out, n = [], 0
    for i in sorted(range(len(docs)), key=lambda i: hashlib.sha256(b"sample:" + docs[i].encode()).digest()):
        if n >= size:
            break
        out.append(docs_words[i][: size - n])
        n += len(out[-1])
    return out


def distinct_n(docs_words: list[list[str]], n: int) -> float:
    grams = [tuple(w[i : i + n]) for w in docs_words for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unigram_entropy(flat: list[str]) -> float:
    counts = np.fromiter(Counter(flat).values(), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def mattr(flat: list[str], window: int = MATTR_WINDOW) -> float:
    """Moving-average type-token ratio; the plain type-token ratio if there are fewer words."""
    if len(flat) <= window:
        return len(set(flat)) / max(len(flat), 1)
    counts = Counter(flat[:window])
    total = len(counts)
    for i in range(window, len(flat)):
        old, new = flat[i - window], flat[i]
        counts[old] -= 1
        if counts[old] == 0:
            del counts[old]
        counts[new] += 1
        total += len(counts)
    return total / (len(flat) - window + 1) / window


def corpus_stats(docs: list[str], sample_words: int = SAMPLE_WORDS, progress: bool = False) -> dict:
    """All metrics of the module docstring for a list of documents."""
    docs_words = [words(d) for d in tqdm(docs, desc="words", unit="doc", disable=not progress, leave=False)]
    lengths = np.array([len(w) for w in docs_words])
    picked = sample(docs_words, docs, sample_words)
    flat = [w for ws in picked for w in ws]
    kept = exact_dedup(docs, progress)
    kept = near_dedup([docs[i] for i in kept], progress=progress)
    raw = " ".join(flat).encode()
    out = {
        "documents": len(docs),
        "words": int(lengths.sum()),
        "sample_words": len(flat),
        "unigram_entropy": unigram_entropy(flat) if flat else 0.0,
        **{f"distinct_{n}": distinct_n(picked, n) for n in range(1, 5)},
        "mattr": mattr(flat),
        "compression_ratio": len(raw) / len(zlib.compress(raw, 9)) if raw else 0.0,
        "duplicate_rate": (len(docs) - len(kept)) / len(docs) if docs else 0.0,
        "vocab_size": len({w for ws in docs_words for w in ws}),
        "doc_words_mean": float(lengths.mean()) if len(docs) else 0.0,
    }
    for name, q in [("min", 0), ("p10", 10), ("p50", 50), ("p90", 90), ("max", 100)]:
        out[f"doc_words_{name}"] = int(np.percentile(lengths, q, method="nearest")) if len(docs) else 0
    return out


def format_stats(rows: dict[str, dict]) -> str:
    """A table, one column per corpus, one row per metric."""
    names = list(rows)
    keys = list(next(iter(rows.values())))
    width = max(12, *(len(n) for n in names))
    lines = [f"{'metric':<20}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for k in keys:
        cells = [rows[n][k] for n in names]
        lines.append(f"{k:<20}" + "".join(
            f"{v:>{width + 2},}" if isinstance(v, int) else f"{v:>{width + 2}.4f}" for v in cells))
    return "\n".join(lines) + "\n"
