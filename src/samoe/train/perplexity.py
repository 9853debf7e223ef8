"""Validation loss, perplexity and bits per byte over deterministic windows of a token stream."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from samoe.data.dataset import TokenStream, bits_per_byte, unigram_perplexity
from samoe.model.gpt import GPT


@torch.no_grad()
def evaluate(model: GPT, stream: TokenStream, token_bytes: np.ndarray, batch_size: int,
             max_tokens: int | None = None, autocast=nullcontext, shard: tuple[int, int] = (0, 1),
             all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
             spread: bool = False) -> dict[str, float]:
    """Score every target of stream.eval_batches once (non-overlapping windows of the
    model's block size; the first max_tokens of the stream, or with `spread` as many spaced
    evenly over all of it): mean NLL in nats (val_loss), exp of it (val_ppl), bits per UTF-8 byte
    (val_bpb), and the unigram perplexity of the same targets (the bar to beat).

    Across W processes (shard = (r, W)) process r scores batches r, r + W, ... and `all_sum`
    adds the totals up. Every process runs the model equally often, as expert parallelism's
    all-to-alls need: one short of a batch scores the first batch again and counts it zero times."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq_len = model.cfg.block_size
    rank, world = shard
    n_batches = -(-stream.num_eval_windows(seq_len, max_tokens) // batch_size)
    rounds = -(-n_batches // world)
    totals = torch.zeros(3, dtype=torch.float64)  # nll, tokens, bytes
    batches, targets = stream.eval_batches(batch_size, seq_len, max_tokens, spread), []
    first = None
    for i in range(rounds * world):
        x, y = next(batches) if i < n_batches else first
        first = first or (x, y)
        if i < n_batches:
            targets.append(y.numpy().ravel())
        if i % world != rank:
            continue
        with autocast():
            logits = model(x.to(device)).logits
        if i < n_batches:
            nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                                    reduction="sum")
            totals += torch.tensor([float(nll), y.numel(), int(token_bytes[y.numpy()].sum())], dtype=torch.float64)
    if all_sum is not None:
        totals = all_sum(totals)
    model.train(was_training)
    nll, n_tokens, n_bytes = float(totals[0]), int(totals[1]), int(totals[2])
    loss = nll / n_tokens
    return {
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": bits_per_byte(nll, max(n_bytes, 1)),
        "unigram_ppl": unigram_perplexity(np.concatenate(targets), model.cfg.vocab_size),
        "val_tokens": n_tokens,
    }
