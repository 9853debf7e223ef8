"""From a data config to tokenised train and validation streams (and the tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass

from samoe.config import DataConfig
from samoe.data.corpus import load_corpus, read_documents, split_documents
from samoe.data.dataset import TokenStream, encode_documents
from samoe.data.shards import is_prepared, load_prepared
from samoe.data.tokenizer import build_tokenizer


@dataclass
class Splits:
    tokenizer: object  # BPETokenizer | ByteTokenizer
    train: TokenStream
    val: TokenStream


def load_splits(cfg: DataConfig, vocab_size: int, tokenizer=None) -> Splits:
    """Read the corpus, split it by document, train a tokenizer on the training split (unless
    one is given, as when resuming or evaluating a run) and encode both splits.

    When cfg.path is a directory written by `samoe data prepare` (it holds meta.json), its
    memmapped shards and tokenizer are used instead: vocab_size, cfg.tokenizer and
    cfg.val_fraction are then ignored (they were fixed when the data was prepared), and a given
    tokenizer must match the prepared one's vocab_size."""
    if is_prepared(cfg.path):
        return Splits(*load_prepared(cfg.path, tokenizer))
    train_docs, val_docs = split_documents(load_corpus(cfg.path, cfg.corpus), cfg.val_fraction)
    tok = tokenizer or build_tokenizer(cfg.tokenizer, train_docs, vocab_size)
    return Splits(tok, TokenStream(encode_documents(tok, train_docs), "training split"),
                  TokenStream(encode_documents(tok, val_docs), "validation split"))


def load_eval_stream(path: str, tokenizer) -> TokenStream:
    """All documents of a user data path, encoded for evaluation (no split); for a prepared
    directory, its validation shard (which must use the run's vocabulary)."""
    if is_prepared(path):
        return load_prepared(path, tokenizer)[2]
    return TokenStream(encode_documents(tokenizer, read_documents(path)), f"data '{path}'")
