"""The dense feed-forward block, the activation it shares with the experts, and the norms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samoe.config import fc1_width


def activate(h: Tensor, activation: str) -> Tensor:
    """gelu(h), or for swiglu with h = [u_gate | u_up] ([..., 2f]): silu(u_gate) · u_up."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + ε) · g, computed in fp32 and cast back (as LLaMA, Mixtral, Qwen)."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(kind: str, d_model: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """LayerNorm (with a bias unless bias = False) or RMSNorm over the last dimension d."""
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps)
    return nn.LayerNorm(d_model, eps=eps, bias=bias)


class FeedForward(nn.Module):
    """y = act(x·W1 + b1)·W2 + b2, d -> f -> d (W1 is d -> 2f for swiglu; no b1, b2 when bias = False)."""

    def __init__(self, d_model: int, hidden: int, activation: str, n_layers: int, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(d_model, fc1_width(activation, hidden), bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=0.02 / math.sqrt(2 * n_layers))
        if bias:
            nn.init.zeros_(self.fc1.bias)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(activate(self.fc1(x), self.activation)))
