"""The prepared-dataset directory written by `samoe data prepare` and read by training.

    DIR/meta.json       {"format": "samoe-prepared", "version": 1, "dtype", "vocab_size", "eot_id",
                         "splits": {"train": {"file", "tokens", "docs"}, "val": {...}}, "settings", "sources"}
    DIR/tokenizer.json  the tokenizer the shards were encoded with
    DIR/train.bin       token shard of the training split: raw little-endian uint16 (vocab_size
    DIR/val.bin         < 65536) or uint32, tokens(doc_0) eot tokens(doc_1) eot ..., read with np.memmap
    DIR/report.json     counts and per-stage times (see pipeline.py); report.txt the same as a table

Training reads random windows straight from the memmaps, so its memory does not grow with the
dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from samoe.data.dataset import TokenStream
from samoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from samoe.errors import DataError

META_FILE = "meta.json"
FORMAT = "samoe-prepared"
SPLIT_NAMES = {"train": "training split", "val": "validation split"}


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 2**16 else np.uint32


def is_prepared(path) -> bool:
    return path is not None and (Path(path) / META_FILE).is_file()


def write_shard(path: Path, tok, docs: list[str], desc: str, progress: bool = False, chunk: int = 1024) -> int:
    """Encode docs `chunk` at a time, appending tokens(doc) eot to path; return the token count."""
    dtype = token_dtype(tok.vocab_size)
    n = 0
    with open(path, "wb") as f, tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress,
                                     leave=False) as bar:
        for i in range(0, len(docs), chunk):
            batch = docs[i : i + chunk]
            ids = [t for doc_ids in tok.encode_batch(batch) for t in (*doc_ids, tok.eot_id)]
            f.write(np.asarray(ids, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
            n += len(ids)
            bar.update(len(batch))
    return n


def read_meta(path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"'{path / META_FILE}' is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"'{path / META_FILE}' is not a samoe prepared-dataset file (format '{FORMAT}')")
    return meta


def open_split(path, meta: dict, split: str) -> TokenStream:
    """A TokenStream over the memmapped shard of split ("train" or "val"), checked against meta."""
    info = meta["splits"][split]
    file = Path(path) / info["file"]
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = info["tokens"] * dtype.itemsize
    if not file.is_file() or file.stat().st_size != expected:
        raise DataError(f"prepared shard '{file}' is missing or not {expected} bytes; prepare the dataset again")
    return TokenStream(np.memmap(file, dtype=dtype, mode="r"), SPLIT_NAMES[split])


def load_prepared(path, tokenizer=None):
    """(tokenizer, train TokenStream, val TokenStream) of a prepared directory. A given tokenizer
    (a resumed run's) must have the prepared vocab_size; otherwise DIR/tokenizer.json is used."""
    meta = read_meta(path)
    if tokenizer is None:
        tokenizer = load_tokenizer(Path(path) / TOKENIZER_FILE)
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DataError(f"prepared dataset '{path}' was encoded with vocab_size {meta['vocab_size']}, "
                        f"but the run's tokenizer has {tokenizer.vocab_size}")
    return tokenizer, open_split(path, meta, "train"), open_split(path, meta, "val")
