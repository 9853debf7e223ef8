"""Token dispatchers: how an MoE layer's routed tokens reach its experts and come back.

A dispatcher takes the layer's input x [T, d], its Routing and the expert weights
(ExpertSource) and returns y [T, d] with

    y[t] = Σ_{slots j of token t kept} gate[t, j] · expert_{e[t, j]}(x[t])      (0 if none kept)

Which dispatcher a layer uses is chosen once, when the model is built (model/gpt.py):
LocalDispatcher when every expert lives on this process, ExpertParallelDispatcher
(moe/expert_parallel.py) when the experts are spread over an expert-parallel group. The layer
only calls it. Analysis watches the routing through the same seam: `record_moe(model)` wraps
every layer's dispatcher in a RecordingDispatcher for the duration of a block, whichever
dispatcher that is, and restores them after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from samoe.moe.grouped import ExpertSource, gated_sum, grouped_expert_ffn
from samoe.moe.routers import Routing


class Dispatcher:
    """Runs the routed experts of one MoE layer (see the module docstring). `sent_bytes`: the
    bytes its forwards sent to other processes since `reset()` (none for a local one)."""

    sent_bytes = 0

    def __call__(self, x: Tensor, routing: Routing, source: ExpertSource, activation: str) -> Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Zero the byte counter."""


def dispatch(x: Tensor, routing: Routing, source: ExpertSource | tuple[Tensor, ...], activation: str) -> Tensor:
    """Every expert on this process: x [T, d] -> y [T, d] (zero rows for tokens dropped everywhere).

    `source` is an ExpertSource (a stack, or a SaMoE pool with its coefficients) or a plain
    (W1, b1, W2, b2) stack.
    """
    if not isinstance(source, ExpertSource):
        source = ExpertSource(*source)
    # The kept slots come token-major (t0's choices, then t1's, ...). A *stable* sort by expert
    # id makes each expert's rows one contiguous run [o_e, o_e + n_e) with n_e = bincount[e],
    # so the grouped FFN runs each expert once on a slice, without padding to a capacity; and
    # stability keeps tokens in their original order within a run, so the result does not
    # depend on how the sort breaks ties (bitwise equal runs, deterministic gradients).
    # Only the (token, gate) pairs are permuted: x[token] gathers the rows in expert order and
    # gated_sum's index_add scatters the outputs back to their tokens, so no inverse permutation
    # is needed. minlength = E keeps a zero count for experts that got no token.
    token, expert, gate = routing.kept_slots()
    order = torch.argsort(expert, stable=True)
    token, gate = token[order], gate[order]
    counts = torch.bincount(expert, minlength=source.w1.shape[-3]).tolist()
    # index_select, not x[token]: its backward is an index_add, where advanced indexing's is an
    # accumulating index_put (several times slower on CPU).
    y = grouped_expert_ffn(x.index_select(0, token), counts, source, activation)
    return gated_sum(x, token, gate, y)


class LocalDispatcher(Dispatcher):
    """Every expert on this process (single-process and pure data-parallel training)."""

    def __call__(self, x: Tensor, routing: Routing, source: ExpertSource, activation: str) -> Tensor:
        return dispatch(x, routing, source, activation)


# --------------------------------------------------------------------------- recording


class MoERecord:
    """What the recorded forward passes routed: per MoE layer call, in order,
    (routing, effective weights [W1, b1, W2, b2] or None, the layer's expert count E)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def clear(self) -> None:
        self.calls.clear()


def effective_weights(source: ExpertSource) -> list[Tensor]:
    """The expert stacks (W1, b1, W2, b2), [E, ...], this dispatcher call uses: combined from
    the pool when the source carries coefficients (W[e] = Σ_k c[e,k]·P[k,e]), else a view of
    the stacks. Either way a non-leaf tensor whose gradient is this layer's own contribution
    (also for a bank shared by several layers)."""
    if source.coef is None:
        return [t.view_as(t) for t in source.tensors()]
    spec = "k" if source.coef.dim() == 1 else "ek"
    return [torch.einsum(f"{spec},ke...->e...", source.coef.to(p.dtype), p) for p in source.tensors()]


class RecordingDispatcher(Dispatcher):
    """Wraps a layer's dispatcher: appends each call's routing (and, with effective=True, the
    effective expert weights, which it then hands to the inner dispatcher as non-leaf tensors so
    that their gradients can be taken) to a MoERecord. Under expert parallelism the weights are
    this process's shard (E/P experts) and E is the layer's whole count."""

    def __init__(self, inner: Dispatcher, record: MoERecord, num_experts: int, effective: bool):
        self.inner, self.record, self.num_experts, self.effective = inner, record, num_experts, effective

    def __call__(self, x: Tensor, routing: Routing, source: ExpertSource, activation: str) -> Tensor:
        if not isinstance(source, ExpertSource):
            source = ExpertSource(*source)
        weights = None
        if self.effective:
            weights = effective_weights(source)
            source = ExpertSource(*weights)
        self.record.calls.append((routing, weights, self.num_experts))
        return self.inner(x, routing, source, activation)

    @property
    def sent_bytes(self) -> int:
        return self.inner.sent_bytes

    def reset(self) -> None:
        self.inner.reset()


@contextmanager
def record_moe(model: nn.Module, effective: bool = True):
    """Within the block, every MoE layer of `model` (anything with `moe_layers()`) records its
    calls in the yielded MoERecord (see RecordingDispatcher). The model's computation is
    unchanged; with effective=False its weights are not touched either (routing only)."""
    record = MoERecord()
    layers = model.moe_layers()
    originals = [layer.dispatcher for layer in layers]
    for layer, inner in zip(layers, originals):
        layer.dispatcher = RecordingDispatcher(inner, record, layer.router.num_experts, effective)
    try:
        yield record
    finally:
        for layer, inner in zip(layers, originals):
            layer.dispatcher = inner
