"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from samoe.config import TrainConfig

NO_DECAY = ("wte.", "wpe.", "lm_head.", ".router.", "coef_logits")


def decays(name: str, p: nn.Parameter) -> bool:
    is_bias = p.dim() < 2 or name.rsplit(".", 1)[-1] in ("b1", "b2")  # expert biases are [.., E, h]
    return not is_bias and not any(s in name for s in NO_DECAY)


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """Weight decay on weight matrices and expert weights; none on norms, biases, embeddings,
    router weights and SaMoE coefficient logits."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps.
    `step` counts optimiser steps already taken (0 for the first)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
