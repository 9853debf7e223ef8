"""The MoE feed-forward layer: route -> dispatch -> experts -> combine.

    y[t] = Σ_{slots j kept} gate[t, j] · expert_{e[t, j]}(x[t])

The layer's dispatcher (moe/dispatch.py: local, or expert-parallel), chosen when the model is
built, sorts the kept (token, expert) pairs by expert, runs each expert once on its
contiguous slice (moe/grouped.py), then adds the gated outputs back with index_add; no
[T, E, C] one-hot tensors. Capacity and dropless routing share this path (they differ only
in `keep`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from samoe.ffn import FeedForward
from samoe.moe.dispatch import Dispatcher, LocalDispatcher
from samoe.moe.routers import Routing


class MoEFeedForward(nn.Module):
    """An MoE FFN block: a router plus an expert provider (private experts, a SaMoE pool
    mixture or the shared bank), optionally mixed with a dense branch (PR-MoE residual):

        y = p0 · moe(x) + p1 · ffn(x),   (p0, p1) = softmax(x · W_c + b_c)      residual_gate "softmax"
        y = moe(x) + σ(x · w_c + b_c) · ffn(x)                                  residual_gate "sigmoid"

    ("sigmoid" is Qwen2-MoE's gated shared expert; no b_c when bias = False.)

    With `depth_embedding_dim` = d the routed experts read x + e_l, e_l [d] this layer's learned vector
    (zeros at start), while the router and the dense branch read x (MoRE's depth embedding: the
    layers sharing a pool tell its experts which of them is calling).
    """

    def __init__(self, router: nn.Module, experts: nn.Module, activation: str, residual: FeedForward | None = None,
                 dispatcher: Dispatcher | None = None, residual_gate: str = "softmax", bias: bool = True,
                 depth_embedding_dim: int = 0):
        super().__init__()
        self.router = router
        self.experts = experts
        self.activation = activation
        self.residual = residual
        self.residual_gate = residual_gate
        outputs = 2 if residual_gate == "softmax" else 1
        self.residual_coef = nn.Linear(residual.fc1.in_features, outputs, bias=bias) if residual is not None else None
        self.last_routing: Routing | None = None
        self.dispatcher = dispatcher or LocalDispatcher()
        self.depth_embedding = nn.Parameter(torch.zeros(depth_embedding_dim)) if depth_embedding_dim else None

    @property
    def a2a_bytes(self) -> int:
        """Bytes this layer's forwards sent to other processes since the dispatcher's reset
        (0 unless its experts are spread over an expert-parallel group)."""
        return self.dispatcher.sent_bytes

    def routing_stats(self) -> dict[str, Tensor]:
        """Routing.stats() of this layer's last forward ({} before the first)."""
        return {} if self.last_routing is None else self.last_routing.stats()

    def forward(self, x: Tensor, token_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B, S, d], token_ids [B, S] -> (y [B, S, d], auxiliary losses)."""
        B, S, d = x.shape
        flat = x.reshape(B * S, d)
        routing: Routing = self.router(flat, token_ids.reshape(-1))
        expert_in = flat if self.depth_embedding is None else flat + self.depth_embedding
        y = self.dispatcher(expert_in, routing, self.experts.source(), self.activation).view(B, S, d)
        # Kept detached (its graph is not held past the step) and summarised only when asked:
        # the trainer reads the statistics every log_every steps, and computing them every step
        # cost 0.2-0.5 ms a layer at the default preset's shape (under 1% of its step).
        probs = None if routing.probs is None else routing.probs.detach()
        self.last_routing = dataclasses.replace(routing, gate=routing.gate.detach(), probs=probs, aux={})
        if self.residual is not None and self.residual_gate == "sigmoid":
            y = y + torch.sigmoid(self.residual_coef(x)) * self.residual(x)
        elif self.residual is not None:
            p = self.residual_coef(x).softmax(dim=-1)
            y = y * p[..., :1] + self.residual(x) * p[..., 1:]
        return y, routing.aux
