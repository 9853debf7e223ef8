"""Settings of `samoe data`, in a module light enough for the CLI to import at parser build time."""

from __future__ import annotations

from dataclasses import dataclass

from samoe.config import ModelConfig

SAMPLE_WORDS = 100_000  # words in the fixed-size sample of data/stats.py


@dataclass
class PrepareOptions:
    text_field: str = "text"  # JSONL field holding the text
    skip_bad_lines: bool = False  # skip (and count) malformed JSONL lines instead of failing
    min_chars: int = 1  # cleaned documents shorter than this are dropped
    near_dedup: bool = True
    threshold: float = 0.8  # MinHash LSH Jaccard threshold
    shingle: int = 5  # words per shingle
    num_perm: int = 128  # MinHash permutations
    val_fraction: float = 0.05
    tokenizer: str = "bpe"  # bpe | byte | path to a tokenizer.json
    vocab_size: int = ModelConfig.vocab_size
    overwrite: bool = False
    progress: bool = True
