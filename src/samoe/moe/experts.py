"""Where a layer's expert weights come from: its own (`private`), SaMoE's global pool
(`pool`), or one bank every layer routes into (`shared`).

Expert e is the FFN  y = act(x·W1[e] + b1[e])·W2[e] + b2[e]  with

    W1 [E, d, h]   b1 [E, h]   W2 [E, f, d]   b2 [E, d]

where h = f for gelu and h = 2f for swiglu (gate and up projections side by side:
act(u) = silu(u[:, :f]) · u[:, f:]). A provider's forward() returns these four tensors
(without biases, `model.bias = false`, b1 and b2 are constant zero buffers, not saved).

SaMoE (docs/design.md): the pool holds P1 [K, E, d, h] (likewise P2, b1, b2); layer l mixes it

    c_l = softmax(a_l / τ) over K,     W1_l[e] = Σ_k c_l[e, k] · P1[k, e]

with a_l [K] (granularity "layer") or [E, K] (granularity "expert"), once per forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from samoe.config import PoolConfig, fc1_width
from samoe.moe.grouped import ExpertSource

ExpertTensors = tuple[Tensor, Tensor, Tensor, Tensor]


class ExpertWeights(nn.Module):
    """A stack of expert FFN weights with leading dims `lead` (() for one layer, (K,) for a pool).

    forward() returns (W1, b1, W2, b2) for a stack without leading dims. The model is built whole
    on every process; expert parallelism then keeps each process's experts (train/distributed.py,
    parallelize), so processes draw the same weights as a single one.
    """

    def __init__(self, lead: tuple[int, ...], num_experts: int, d_model: int, hidden: int,
                 activation: str, n_layers: int, bias: bool = True):
        super().__init__()
        h = fc1_width(activation, hidden)
        self.expert_axis = len(lead)
        self.w1 = nn.Parameter(nn.init.normal_(torch.empty(*lead, num_experts, d_model, h), std=0.02))
        if bias:
            self.b1 = nn.Parameter(torch.zeros(*lead, num_experts, h))
        else:
            self.register_buffer("b1", torch.zeros(*lead, num_experts, h), persistent=False)
        self.w2 = nn.Parameter(nn.init.normal_(torch.empty(*lead, num_experts, hidden, d_model),
                                               std=0.02 / math.sqrt(2 * n_layers)))  # GPT-2 residual scaling
        if bias:
            self.b2 = nn.Parameter(torch.zeros(*lead, num_experts, d_model))
        else:
            self.register_buffer("b2", torch.zeros(*lead, num_experts, d_model), persistent=False)

    def forward(self) -> ExpertTensors:
        return self.w1, self.b1, self.w2, self.b2

    def source(self) -> ExpertSource:
        return ExpertSource(*self())


def initial_coefficient_logits(cfg: PoolConfig, shape: tuple[int, ...], layer: int, n_moe_layers: int) -> Tensor:
    """a_l at initialisation, shape [K] or [E, K].

    uniform: zeros. noisy: N(0, init_noise). cycle: one-hot at k = l mod K. sequence: one-hot
    at k = floor(l · K / L_moe) (consecutive layers share). One-hot means logits 0 / -inf when
    frozen (an exact one-hot mixture, hard layer sharing) and 0 / -4 when trainable.
    """
    K = cfg.size
    if cfg.init == "uniform":
        return torch.zeros(shape)
    if cfg.init == "noisy":
        return torch.randn(shape) * cfg.init_noise
    k = layer % K if cfg.init == "cycle" else layer * K // n_moe_layers
    off = float("-inf") if cfg.freeze else -4.0
    logits = torch.full(shape, off)
    logits[..., k] = 0.0
    return logits


class PoolMixture(nn.Module):
    """Layer l's experts as a soft combination of the global pool (SaMoE).

    The pool belongs to the model (it is shared across layers), so it is held here by
    reference, not registered as a submodule. Layers with fewer experts than the pool
    ("pyramid") use the pool's first E experts.
    """

    def __init__(self, pool: ExpertWeights, num_experts: int, cfg: PoolConfig, layer: int, n_moe_layers: int):
        super().__init__()
        self._pool = (pool,)
        self.num_experts = num_experts
        self.shard = (0, 1)  # (p, P): this process holds experts p, p + P, ... (set by parallelize)
        self.temperature = cfg.temperature
        shape = (cfg.size,) if cfg.granularity == "layer" else (num_experts, cfg.size)
        logits = initial_coefficient_logits(cfg, shape, layer, n_moe_layers)
        if cfg.freeze:
            self.register_buffer("coef_logits", logits)
        else:
            self.coef_logits = nn.Parameter(logits)

    def coefficients(self) -> Tensor:
        """c_l = softmax(a_l / τ): [K] or [E, K]."""
        return torch.softmax(self.coef_logits / self.temperature, dim=-1)

    def forward(self) -> ExpertTensors:
        """The combined experts (W1_l, b1_l, W2_l, b2_l), materialised: for analysis and tests."""
        c = self.coefficients()
        E = self.num_experts
        spec = "k" if c.dim() == 1 else "ek"
        return tuple(torch.einsum(f"{spec},ke...->e...", c.to(p.dtype), p[:, :E]) for p in self._pool[0]())

    def source(self) -> ExpertSource:
        """The pool and c_l, for the fast path to combine one matrix of the layer at a time.

        Under expert parallelism (`shard` = (p, P)) the pool holds experts p, p + P, ... and so
        do the returned coefficients."""
        p, P = self.shard
        E = self.num_experts // P  # slice only for pyramid layers: a full slice would cost a gradient copy
        c = self.coefficients()
        if c.dim() == 2 and P > 1:
            c = c[p::P]
        return ExpertSource(*(w if w.shape[1] == E else w[:, :E] for w in self._pool[0]()), coef=c)


class SharedBank(nn.Module):
    """UniPool-style sharing: every layer's router routes into the model's one bank of M experts."""

    def __init__(self, bank: ExpertWeights):
        super().__init__()
        self._bank = (bank,)

    def forward(self) -> ExpertTensors:
        return self._bank[0]()

    def source(self) -> ExpertSource:
        return self._bank[0].source()
