"""The dense feed-forward block and the activation it shares with the experts."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def activate(h: Tensor, activation: str) -> Tensor:
    """gelu(h), or for swiglu with h = [u_gate | u_up] ([..., 2f]): silu(u_gate) · u_up."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class FeedForward(nn.Module):
    """y = act(x·W1 + b1)·W2 + b2, d -> f -> d (W1 is d -> 2f for swiglu)."""

    def __init__(self, d_model: int, hidden: int, activation: str, n_layers: int, dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(d_model, 2 * hidden if activation == "swiglu" else hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=0.02 / math.sqrt(2 * n_layers))
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(activate(self.fc1(x), self.activation)))
