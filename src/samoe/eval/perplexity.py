"""Validation loss, perplexity and bits per byte over deterministic windows of a token stream."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from samoe.data.dataset import TokenStream, bits_per_byte, unigram_perplexity
from samoe.model.gpt import GPT


@torch.no_grad()
def evaluate(model: GPT, stream: TokenStream, token_bytes: np.ndarray, batch_size: int,
             max_tokens: int | None = None, autocast=nullcontext) -> dict[str, float]:
    """Score every target of stream.eval_batches once (non-overlapping windows of the
    model's block size): mean NLL in nats (val_loss), exp of it (val_ppl), bits per UTF-8 byte
    (val_bpb), and the unigram perplexity of the same targets (the bar to beat)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq_len = model.cfg.block_size
    nll, n_tokens, n_bytes, targets = 0.0, 0, 0, []
    for x, y in stream.eval_batches(batch_size, seq_len, max_tokens):
        with autocast():
            logits = model(x.to(device)).logits
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        nll += float(losses)
        n_tokens += y.numel()
        n_bytes += int(token_bytes[y.numpy()].sum())
        targets.append(y.numpy().ravel())
    model.train(was_training)
    loss = nll / n_tokens
    return {
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": bits_per_byte(nll, max(n_bytes, 1)),
        "unigram_ppl": unigram_perplexity(np.concatenate(targets), model.cfg.vocab_size),
        "val_tokens": n_tokens,
    }
