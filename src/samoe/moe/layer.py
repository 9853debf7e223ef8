"""The MoE feed-forward layer: route -> dispatch -> experts -> combine.

    y[t] = Σ_{slots j kept} gate[t, j] · expert_{e[t, j]}(x[t])

Dispatch sorts the kept (token, expert) pairs by expert, runs each expert once on its
contiguous slice (moe/grouped.py), then adds the gated outputs back with index_add; no
[T, E, C] one-hot tensors. Capacity and dropless routing share this path (they differ only
in `keep`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from samoe.model.ffn import FeedForward
from samoe.moe.expert_parallel import ExpertParallel, dispatch_ep
from samoe.moe.experts import ExpertTensors
from samoe.moe.grouped import ExpertSource, gated_sum, grouped_expert_ffn
from samoe.moe.routers import Routing


def dispatch(x: Tensor, routing: Routing, source: ExpertSource | ExpertTensors, activation: str) -> Tensor:
    """Run the routed experts: x [T, d] -> y [T, d] (zero rows for tokens dropped everywhere).

    `source` is an ExpertSource (a stack, or a SaMoE pool with its coefficients) or a plain
    (W1, b1, W2, b2) stack.
    """
    if not isinstance(source, ExpertSource):
        source = ExpertSource(*source)
    token, expert, gate = routing.kept_slots()
    order = torch.argsort(expert, stable=True)
    token, gate = token[order], gate[order]
    counts = torch.bincount(expert, minlength=source.w1.shape[-3]).tolist()
    return gated_sum(x, token, gate, grouped_expert_ffn(x[token], counts, source, activation))


class MoEFeedForward(nn.Module):
    """An MoE FFN block: a router plus an expert provider (private experts, a SaMoE pool
    mixture or the shared bank), optionally mixed with a dense branch (PR-MoE residual):

        y = p0 · moe(x) + p1 · ffn(x),   (p0, p1) = softmax(x · W_c + b_c)      residual_gate "softmax"
        y = moe(x) + σ(x · w_c + b_c) · ffn(x)                                  residual_gate "sigmoid"

    ("sigmoid" is Qwen2-MoE's gated shared expert; no b_c when bias = False.)
    """

    def __init__(self, router: nn.Module, experts: nn.Module, activation: str, residual: FeedForward | None = None,
                 ep: ExpertParallel | None = None, residual_gate: str = "softmax", bias: bool = True):
        super().__init__()
        self.router = router
        self.experts = experts
        self.activation = activation
        self.residual = residual
        self.residual_gate = residual_gate
        outputs = 2 if residual_gate == "softmax" else 1
        self.residual_coef = nn.Linear(residual.fc1.in_features, outputs, bias=bias) if residual is not None else None
        self.last_stats: dict[str, Tensor] = {}
        self.ep = ep  # experts spread over the processes of an expert-parallel group
        self.a2a_bytes = 0  # bytes sent to other processes by forwards since the last reset

    def forward(self, x: Tensor, token_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B, S, d], token_ids [B, S] -> (y [B, S, d], auxiliary losses)."""
        B, S, d = x.shape
        flat = x.reshape(B * S, d)
        routing: Routing = self.router(flat, token_ids.reshape(-1))
        if self.ep is None:
            y = dispatch(flat, routing, self.experts.source(), self.activation)
        else:
            y, sent = dispatch_ep(flat, routing, self.experts.source(), self.activation, self.router.num_experts,
                                  self.ep)
            self.a2a_bytes += sent
        y = y.view(B, S, d)
        self.last_stats = routing.stats()
        if self.residual is not None and self.residual_gate == "sigmoid":
            y = y + torch.sigmoid(self.residual_coef(x)) * self.residual(x)
        elif self.residual is not None:
            p = self.residual_coef(x).softmax(dim=-1)
            y = y * p[..., :1] + self.residual(x) * p[..., 1:]
        return y, routing.aux
