"""Tokenizers: byte-level BPE (HuggingFace `tokenizers`) and raw bytes, behind one interface.

Both provide encode(text) -> list[int], encode_batch(texts) -> list[list[int]],
decode(ids) -> str, vocab_size, eot_id (end-of-text, appended after every document),
token_bytes() -> int64 array [vocab_size] of UTF-8 bytes per token (0 for eot), and
save(path), which writes one JSON file (conventionally tokenizer.json) read back by
load_tokenizer(path).

A BPE tokenizer's end-of-text token is <|endoftext|>, unless a tokenizer_config.json beside
its tokenizer.json (Hugging Face's layout) names another `eos_token`: a tokenizer taken from a
Hugging Face checkpoint (`samoe train --init-from`, e.g. Llama's </s> or <|end_of_text|>)
keeps its own, and save() writes that tokenizer_config.json too.
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from samoe.errors import ConfigError, DataError
from samoe.fileio import write_text_atomic

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # beside tokenizer.json: names a foreign eot token


class BPETokenizer:
    """BPE; its file is the tokenizers-native tokenizer.json, readable by other tools. samoe
    trains byte-level BPE; one taken from a Hugging Face checkpoint may be any `tokenizers` model
    (SentencePiece-style with byte fallback, ...), with its own end-of-text token `eot`.

    Special tokens written inside a document ("<|endoftext|>") are encoded as ordinary text, so
    eot only ever comes from document boundaries, and the tokenizer's post-processor (a BOS that
    a Llama tokenizer adds) is not applied: documents are their tokens, then eot.
    """

    def __init__(self, tk: Tokenizer, eot: str = EOT):
        eot_id = tk.token_to_id(eot)
        if eot_id is None:
            hint = f" (a Hugging Face tokenizer needs a {HF_TOKENIZER_CONFIG} beside it naming its eos_token)"
            raise DataError(f"BPE tokenizer has no {eot} token" + (hint if eot == EOT else ""))
        tk.encode_special_tokens = True  # runtime-only setting: treat "<|endoftext|>" in text as text
        self.tk = tk
        self.eot = eot
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
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Byte-level tokens use one character per byte, so bytes = len(token string). Other
        tokenizers (SentencePiece style): a byte-fallback token <0xNN> is one byte, "▁" a space,
        any other character its UTF-8 length. Special tokens are 0."""
        byte_level = isinstance(self.tk.decoder, decoders.ByteLevel)
        special = {t.content for t in self.tk.get_added_tokens_decoder().values() if t.special}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.tk.get_vocab().items():
            if token == self.eot or token in special:
                out[i] = 0
            elif byte_level:
                out[i] = len(token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                out[i] = 1
            else:
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return out

    def save(self, path) -> None:
        """path (tokenizer.json); with a foreign eot also tokenizer_config.json beside it."""
        if self.eot != EOT:
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eot}
            write_text_atomic(Path(path).with_name(HF_TOKENIZER_CONFIG), json.dumps(config, indent=2) + "\n")
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
        tk = Tokenizer.from_str(text)
        return BPETokenizer(tk, hf_eos_token(path.with_name(HF_TOKENIZER_CONFIG), tk) or EOT)
    except DataError as e:
        raise DataError(f"'{path}': {e}") from None
    except Exception as e:  # undecodable, not JSON, or not a tokenizers file
        raise DataError(f"'{path}' is not a samoe tokenizer file ({type(e).__name__}: {e})") from None


def hf_eos_token(config_path, tk: Tokenizer) -> str | None:
    """The `eos_token` that a Hugging Face tokenizer_config.json (or special_tokens_map.json) names,
    when the file exists and tk has that token; else None."""
    config_path = Path(config_path)
    if not config_path.is_file():
        return None
    try:
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return eos if isinstance(eos, str) and tk.token_to_id(eos) is not None else None
