"""From a data config to tokenised train and validation streams (and the tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass

from samoe.config import DataConfig
from samoe.data.corpus import load_corpus, read_documents, split_documents
from samoe.data.dataset import TokenStream, encode_documents
from samoe.data.tokenizer import build_tokenizer


@dataclass
class Splits:
    tokenizer: object  # BPETokenizer | ByteTokenizer
    train: TokenStream
    val: TokenStream


def load_splits(cfg: DataConfig, vocab_size: int, tokenizer=None) -> Splits:
    """Read the corpus, split it by document, train a tokenizer on the training split (unless
    one is given, as when resuming or evaluating a run) and encode both splits."""
    train_docs, val_docs = split_documents(load_corpus(cfg.path), cfg.val_fraction)
    tok = tokenizer or build_tokenizer(cfg.tokenizer, train_docs, vocab_size)
    return Splits(tok, TokenStream(encode_documents(tok, train_docs), "training split"),
                  TokenStream(encode_documents(tok, val_docs), "validation split"))


def load_eval_stream(path: str, tokenizer) -> TokenStream:
    """All documents of a user data path, encoded for evaluation (no split)."""
    return TokenStream(encode_documents(tokenizer, read_documents(path)), f"data '{path}'")
