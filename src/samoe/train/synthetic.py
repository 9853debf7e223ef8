"""The trainer's own optimiser step on a fresh model and random tokens: what the benchmarks
(samoe.bench) and a study's per-second comparison (samoe.study.grid.measure_speed) time, so that
they time what training runs (the schedule, clipping to the global norm, the router-bias update
and the metrics row included), not a copy of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from samoe.config import Config
from samoe.data.dataset import TokenStream
from samoe.model.gpt import GPT
from samoe.train.loop import new_trainer, train_step

WINDOWS = 64  # batches of windows the random stream holds (data.sampling=epochs reads it without repeating)


def synthetic_step(cfg: Config, batch_size: int | None = None) -> Callable[[], dict]:
    """A closure taking one train_step of a fresh model (seed 0) on uniformly random tokens;
    `batch_size` overrides train.batch_size (sequences per step)."""
    if batch_size is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size,
                                                                 micro_batch_size=None))
    torch.manual_seed(0)
    tr = new_trainer(cfg, GPT(cfg.model), synthetic_stream(cfg))
    return lambda: train_step(tr)


def synthetic_stream(cfg: Config) -> TokenStream:
    """Uniformly random tokens (seed 0), WINDOWS batches of cfg's windows."""
    n = WINDOWS * cfg.train.batch_size * (cfg.model.block_size + 1)
    return TokenStream(np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=n, dtype=np.int32),
                       "random tokens")
