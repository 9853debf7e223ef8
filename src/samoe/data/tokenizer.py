"""Tokenizers: byte-level BPE (HuggingFace `tokenizers`) and raw bytes, behind one interface.

Both provide encode(text) -> list[int], encode_batch(texts) -> list[list[int]],
decode(ids) -> str, vocab_size, eot_id (end-of-text, appended after every document),
token_bytes() -> int64 array [vocab_size] of UTF-8 bytes per token (0 for eot), and
save(path), which writes one JSON file (conventionally tokenizer.json) read back by
load_tokenizer(path).
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from samoe.errors import ConfigError, DataError
from samoe.fileio import write_text_atomic

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class BPETokenizer:
    """Byte-level BPE; its file is the tokenizers-native tokenizer.json, readable by other tools.

    The literal text "<|endoftext|>" inside a document is encoded as ordinary text, so eot only
    ever comes from document boundaries.
    """

    def __init__(self, tk: Tokenizer):
        eot_id = tk.token_to_id(EOT)
        if eot_id is None:
            raise DataError(f"BPE tokenizer has no {EOT} token")
        tk.encode_special_tokens = True  # runtime-only setting: treat "<|endoftext|>" in text as text
        self.tk = tk
        self.eot_id = eot_id
        self.vocab_size = tk.get_vocab_size()

    @classmethod
    def train(cls, docs, vocab_size: int, progress: bool = False) -> "BPETokenizer":
        """Train on an iterable of documents; vocab_size counts the 256 byte tokens and eot.
        The result may be smaller than vocab_size when the corpus runs out of merges.
        progress: show the tokenizers library's own progress bars."""
        if vocab_size < 258:
            raise ConfigError(f"BPE vocab_size must be at least 258 (256 bytes + eot + 1), got {vocab_size}")
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        tk.train_from_iterator(docs, trainer=trainer)
        return cls(tk)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Byte-level tokens use one character per byte, so bytes = len(token string)."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.tk.get_vocab().items():
            out[i] = 0 if token == EOT else len(token)
        return out

    def save(self, path) -> None:
        write_text_atomic(path, self.tk.to_str(pretty=True))


class ByteTokenizer:
    """Token ids 0..255 are UTF-8 bytes, 256 is eot (vocab_size 257)."""

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Bytes decoded with errors="replace"; eot is rendered as "<|endoftext|>"."""
        parts = [bytearray()]
        for i in ids:
            if i == self.eot_id:
                parts.append(bytearray())
            else:
                parts[-1].append(i)
        return EOT.join(p.decode("utf-8", errors="replace") for p in parts)

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[self.eot_id] = 0
        return out

    def save(self, path) -> None:
        write_text_atomic(path, json.dumps({"samoe_byte_tokenizer": 1}) + "\n")


def build_tokenizer(kind: str, train_docs, vocab_size: int, progress: bool = False):
    """A new tokenizer: "bpe" trained on train_docs to vocab_size, or "byte" (ignores both)."""
    if kind == "bpe":
        return BPETokenizer.train(train_docs, vocab_size, progress)
    if kind == "byte":
        return ByteTokenizer()
    raise ConfigError(f"unknown tokenizer kind {kind!r}; expected 'bpe' or 'byte'")


def load_tokenizer(path):
    """The tokenizer saved at path (a BPETokenizer or ByteTokenizer, detected from the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if json.loads(text).get("samoe_byte_tokenizer") == 1:
            return ByteTokenizer()
        return BPETokenizer(Tokenizer.from_str(text))
    except DataError as e:
        raise DataError(f"'{path}': {e}") from None
    except Exception as e:  # undecodable, not JSON, or not a tokenizers file
        raise DataError(f"'{path}' is not a samoe tokenizer file ({type(e).__name__}: {e})") from None
