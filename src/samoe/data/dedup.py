"""Exact and near-duplicate removal; both keep the first occurrence and return kept indices.

Exact: two documents are duplicates when their normalised texts are equal, where
normalise(text) = NFKC, lowercased, every run of whitespace replaced by one space.

Near: a document is the set S of its word n-gram shingles (words: \\w+ runs of the normalised
text; n = `shingle`; a document of fewer than n words is one shingle). The Jaccard similarity
J(A, B) = |S_A ∩ S_B| / |S_A ∪ S_B| is estimated by MinHash with `num_perm` permutations (the
fraction of equal minimum hashes); MinHash LSH (datasketch) with threshold t proposes
candidates among the documents kept so far, and a document is a near duplicate when a
candidate's estimated J >= t. The LSH bands are tuned for recall (datasketch weights: false
positives 0.1, false negatives 0.9: with t = 0.8 and 128 permutations a pair with J = 0.9 is a
candidate with probability 0.999), since the check of the estimate removes false positives.
Changing k words of an N-word document touches at most k*n of its N-n+1 shingles, so
J >= (N-n+1-k*n) / (N-n+1+k*n): with n = 5, 3 words changed in 300 leave J >= 0.90.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from datasketch import LeanMinHash, MinHash, MinHashLSH
from tqdm import tqdm

from samoe.errors import ConfigError

_WORD = re.compile(r"\w+")
CHUNK = 2048  # documents hashed per MinHash.bulk call
LSH_WEIGHTS = (0.1, 0.9)  # datasketch's (false positive, false negative) weights


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_dedup(docs: list[str], progress: bool = False) -> list[int]:
    """Indices of the first document of every normalised text, in order."""
    seen, kept = set(), []
    for i, doc in enumerate(tqdm(docs, desc="exact dedup", unit="doc", disable=not progress, leave=False)):
        key = hashlib.sha1(normalise(doc).encode()).digest()
        if key not in seen:
            seen.add(key)
            kept.append(i)
    return kept


def shingles(text: str, n: int) -> set[bytes]:
    """The word n-grams of normalise(text), as UTF-8 bytes (one shingle if fewer than n words)."""
    words = _WORD.findall(normalise(text))
    return {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}


def near_dedup(docs: list[str], threshold: float = 0.8, shingle: int = 5, num_perm: int = 128,
               seed: int = 1, progress: bool = False) -> list[int]:
    """Indices of the documents that have no near duplicate earlier in docs (module docstring)."""
    if not 0 < threshold < 1:
        raise ConfigError(f"near-duplicate threshold must be in (0, 1), got {threshold}")
    if shingle < 1 or num_perm < 2:
        raise ConfigError(f"shingle size must be >= 1 and num_perm >= 2, got {shingle} and {num_perm}")
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    kept: dict[int, LeanMinHash] = {}
    bar = tqdm(total=len(docs), desc="near dedup", unit="doc", disable=not progress, leave=False)
    for start in range(0, len(docs), CHUNK):
        chunk = docs[start : start + CHUNK]
        hashes = MinHash.bulk([shingles(d, shingle) for d in chunk], num_perm=num_perm, seed=seed)
        for i, m in enumerate(hashes, start):
            if not any(kept[j].jaccard(m) >= threshold for j in lsh.query(m)):
                kept[i] = LeanMinHash(m)
                lsh.insert(i, kept[i], check_duplication=False)
        bar.update(len(chunk))
    bar.close()
    return list(kept)
