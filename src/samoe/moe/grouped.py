"""Grouped expert FFN over expert-sorted tokens, with a hand-written backward.

Tokens arrive sorted by expert: rows [o_e, o_e + n_e) of x [N, d] belong to expert e. Each
expert's matrices run once on its rows, in two passes over the experts:

    pass 1:  h[rows_e] = x[rows_e]·W1[e] + b1[e]          (all experts)
             a = act(h)                                    (one call over all rows)
    pass 2:  y[rows_e] = a[rows_e]·W2[e] + b2[e]           (all experts)

How the GEMMs of a pass run (row_layout, from the counts each step): on the CPU in fp32 the
experts spread over the threads, each GEMM whole on one thread (moe/expert_gemm.py, where its
kernel builds); else one grouped GEMM (`torch._grouped_mm` with the experts' row offsets) where
that runs (the CPU in fp32 and bf16, every operand's rows 16-byte multiples; it loops over the
experts inside, each GEMM split over the threads); else a loop of torch.mm. (A padded layout,
several experts sharing one torch.bmm, gained nothing end to end on trained routing and was
removed; its measurements are in docs/notes/fast-moe-history.md.)

Why this shape:
- the activation (and its backward) runs once over [N, h], not once per expert: elementwise
  calls on an expert's few rows cost more in call overhead than in arithmetic;
- a custom autograd Function rather than autograd through the GEMMs: only x and h are saved,
  a = act(h) is recomputed in backward (keeping it was no faster within the noise, and cost
  SaMoE's memory ratio 0.004), and a pool's gradient is formed in place (below);
- biases: with the expert kernel, each expert's bias is the starting value of its output rows and
  its gradient is summed from the rows the weight gradient reads, by the same thread (the gathers
  of [N, ·] bias rows, their adds and the segment sums this replaces took 1.4 ms of a 31 ms layer
  at the default preset's shape, under torch.profiler); otherwise they are added group by group,
  in place, and their gradients are one segment sum each (index_add over the rows' expert ids);
- SaMoE: the weights may be given as a pool P [K, E, ...] with mixing coefficients c ([K],
  or [E, K] per expert). The layer's experts W = Σ_k c[.., k] · P[k] are combined just before
  use, one matrix at a time (W1 for pass 1, W2 for pass 2), in forward and again in backward:
  none are kept between forward and backward. One combination per matrix and layer is a few
  large memory-bound passes; combining expert by expert was 4E small ones, and at the default
  preset's size (E = 16, 128 x 256 experts) their call overhead made SaMoE's step 12% slower.
  The backward computes the stack's gradient ∂L/∂W as for private experts, then
  ∂L/∂P[k] = c[.., k] · ∂L/∂W and ∂L/∂c[.., k] = <P[k], ∂L/∂W>.
Under autocast the matmuls run in the autocast dtype; gradients return in the inputs' dtypes.

Names in GroupedExpertFFN carry their shapes as suffixes: N rows (the expert-sorted slots), D the
model width d, H the first projection's width h (f, or 2f for swiglu), F the expert's hidden width
f, E experts; `grad_` marks a gradient (grad_w1_EDH = ∂L/∂W1).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from samoe.ffn import activate
from samoe.moe.expert_gemm import rows_times_experts, weight_grads


@dataclass
class ExpertSource:
    """Expert weights as the fast path takes them: stacks w1 [E, d, h], b1 [E, h],
    w2 [E, f, d], b2 [E, d] when coef is None; else a pool with a leading K axis and the
    mixing coefficients coef [K] (one mixture per layer) or [E, K] (one per expert), each
    mixture summing to 1 (a softmax, as PoolMixture's). For K = 2 the combination reads only
    c[.., 1] (W = P0 + c1·(P1 - P0)); the gradient returned for coef is that of Σ_k c_k P_k,
    which differs from it only along (1, 1), the direction a softmax's backward discards."""

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    coef: Tensor | None = None

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.w1, self.b1, self.w2, self.b2


def activation_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """∂L/∂h from ∂L/∂a for a = act(h) (gelu, or swiglu on h = [u_gate | u_up])."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        return torch.cat([grad * up * sig * (1 + gate * (1 - sig)), grad * silu], dim=-1)
    return torch.ops.aten.gelu_backward(grad, h)


def _coef_k(coef: Tensor, k: int, w: Tensor) -> Tensor:
    """c[k] (one mixture per layer) or c[:, k] shaped to broadcast over an [E, ...] stack."""
    c = coef.to(w.dtype)
    return c[k] if c.dim() == 1 else c[:, k].view(-1, *[1] * (w.dim() - 2))


def _combine(w: Tensor, coef: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The experts' stack [E, ...] in the compute dtype: w itself, or Σ_k c[.., k] · P[k] for a
    pool w = P [K, E, ...] (elementwise, memory-bound: a mul and K - 1 fused multiply-adds; for
    K = 2, whose coefficients sum to 1, one torch.lerp, which reads the two slices and writes
    the stack once: 1.65 ms against 2.31 for a 16 x 256 x 1024 stack)."""
    if coef is None:
        return w.to(dtype)
    if w.shape[0] == 2:  # c0 = 1 - c1: W = P0 + c1·(P1 - P0) in one pass (mul and addcmul make two)
        return torch.lerp(w[0], w[1], _coef_k(coef, 1, w)).to(dtype)
    out = w[0] * _coef_k(coef, 0, w)
    for k in range(1, w.shape[0]):
        out.addcmul_(w[k], _coef_k(coef, k, w))
    return out.to(dtype)


def _source_grad(w: Tensor, coef: Tensor | None, gcoef: Tensor | None, g: Tensor,
                 out: Tensor | None = None) -> Tensor:
    """∂L/∂w from the stack's gradient g [E, ...]: g itself, or for a pool
    ∂L/∂P[k] = c[.., k] · g, adding ∂L/∂c[.., k] = <P[k], g> (per expert for [E, K]) into gcoef.
    `out`, the pool's gradient buffer, may hold g in its slice 0 (scaled last, in place)."""
    g = g.to(w.dtype)
    if coef is None:
        return g
    if coef.dim() == 1:
        gcoef += (w.reshape(w.shape[0], -1) @ g.reshape(-1)).to(coef.dtype)
    else:
        gcoef += torch.einsum("ke...,e...->ek", w, g).to(coef.dtype)
    gp = torch.empty_like(w) if out is None else out
    for k in reversed(range(w.shape[0])):  # slice 0 last: it may be g itself
        torch.mul(g, _coef_k(coef, k, w), out=gp[k])
    return gp


# Where the FFN's GEMMs go through torch._grouped_mm: device type -> compute dtypes. CUDA (bf16
# only, Hopper and later) is left out until a GPU session has checked it: scripts/gpu_check.py
# adds it for its own checks and times it against the loop.
GROUPED_GEMM = {"cpu": (torch.float32, torch.bfloat16)}


@dataclass
class RowLayout:
    """Where each expert's rows sit for the FFN's GEMMs: sorted by expert, counts[e] rows of
    expert e from row starts[e]. `offs`: torch._grouped_mm's offsets where it (or the expert
    kernel) runs the GEMMs, else None (a loop of torch.mm, one per expert)."""

    counts: list[int]
    starts: list[int]
    row_expert: Tensor  # [N] the expert of each row: the biases' gather and their gradients' segment sum
    offs: Tensor | None = None


def row_layout(x: Tensor, counts: list[int], *widths: int) -> RowLayout:
    """The layout of N = Σ counts expert-sorted rows of x's width, dtype and device feeding
    experts of inner widths `widths` (h, f)."""
    dev = x.device
    # the GEMMs run in the autocast dtype where autocast is on (GroupedExpertFFN.forward)
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
    c = torch.tensor(counts, device=dev)
    row_expert = torch.repeat_interleave(torch.arange(len(counts), device=dev), c, output_size=sum(counts))
    return RowLayout(counts, [0, *accumulate(counts)][:-1], row_expert,
                     grouped_gemm_offsets(x, c, *widths, dtype=dtype))


def grouped_gemm_offsets(x: Tensor, counts: list[int] | Tensor, *widths: int,
                         dtype: torch.dtype | None = None) -> Tensor | None:
    """The experts' row offsets (int32 cumulative counts; `counts` a list, or a tensor on x's
    device) when torch._grouped_mm can run the FFN's GEMMs on x's rows in `dtype` (default x's):
    a device and dtype of GROUPED_GEMM, every width (d, h, and x's own) a 16-byte multiple.
    None: the loop over experts runs them."""
    dtype = dtype or x.dtype
    if dtype not in GROUPED_GEMM.get(x.device.type, ()) or not hasattr(torch, "_grouped_mm"):
        return None
    if any(w * dtype.itemsize % 16 for w in (x.shape[1], *widths)):
        return None
    return torch.as_tensor(counts, device=x.device).cumsum(0).to(torch.int32)


def _row_matmul(a: Tensor, w: Tensor, layout: RowLayout, transpose: bool = False, bias: Tensor | None = None) -> Tensor:
    """[N, ·]: the rows of each expert times its w[e] (w[e]ᵀ with `transpose`), plus its bias[e]
    when given, for w [E, ·, ·] and bias [E, ·]."""
    w = w.transpose(1, 2) if transpose else w
    if layout.offs is not None:
        y = rows_times_experts(a, w, layout.counts, bias)  # the experts over the threads, where it runs
        if y is not None:
            return y
        out = torch._grouped_mm(a, w, offs=layout.offs)
    else:
        out = a.new_empty(a.shape[0], w.shape[-1])
        for e, (n, r0) in enumerate(zip(layout.counts, layout.starts)):
            if n:
                torch.mm(a[r0:r0 + n], w[e], out=out[r0:r0 + n])
    return out if bias is None else _add_bias(out, bias, layout)


# From this many experts the biases are gathered to the rows and added in one call (below: one add per expert).
BIAS_GATHER_EXPERTS = 8


def _add_bias(y: Tensor, b: Tensor, layout: RowLayout) -> Tensor:
    """y [N, ·] with b[e] added to the rows of expert e, in place: with many experts (an add of a
    few rows a call) the rows' biases gathered and added in two calls (at the default preset's
    shape, 64 experts: 0.2-0.3 ms against about 1 ms), else one add per expert."""
    if len(layout.counts) > BIAS_GATHER_EXPERTS:
        return y.add_(b.index_select(0, layout.row_expert))
    for e, (n, r0) in enumerate(zip(layout.counts, layout.starts)):
        if n:
            y[r0:r0 + n].add_(b[e])
    return y


# A weight gradient stack above this size is formed a quarter of the experts at a time (_weight_grad).
CHUNK_BYTES = 4 << 20


def _weight_grad(a: Tensor, g: Tensor, layout: RowLayout, out: Tensor | None,
                 bias: bool = False) -> tuple[Tensor, Tensor | None]:
    """([E, ·, ·]: Σ over the rows of expert e of a[rows]ᵀ · g[rows] (zero for an expert without
    rows), and with `bias` the gradient of a bias added to those rows, [E, ·]: Σ over the rows of
    expert e of g[rows]). The weight gradient is written into
    `out` when given (then with torch._grouped_mm, which has no `out=`, a quarter of the experts at
    a time where the stack exceeds CHUNK_BYTES: a whole stack-sized temporary raised SaMoE's peak
    memory by 2%; below, the three calls a chunk makes cost more than the temporary)."""
    offs, counts = layout.offs, layout.counts
    if offs is not None:  # the experts over the threads, both gradients in one pass (moe/expert_gemm.py)
        gb = g.new_empty(len(counts), g.shape[1]) if bias else None
        if (native := weight_grads(a, g, counts, out, gb)) is not None:
            return native, gb
    # the bias's gradient: one segment sum over the rows' expert ids
    gb = g.new_zeros(len(counts), g.shape[1]).index_add_(0, layout.row_expert, g) if bias else None
    if offs is not None and out is not None and out.numel() * out.element_size() <= CHUNK_BYTES:
        return out.copy_(torch._grouped_mm(a.t(), g, offs=offs)), gb
    if offs is not None and out is None:
        return torch._grouped_mm(a.t(), g, offs=offs), gb
    if offs is not None:
        starts, step = [0, *accumulate(counts)], max(1, len(counts) // 4)
        for s in range(0, len(counts), step):
            r0, r1 = starts[s], starts[min(len(counts), s + step)]
            out[s:s + step].copy_(torch._grouped_mm(a[r0:r1].t(), g[r0:r1], offs=offs[s:s + step] - r0))
        return out, gb
    out = a.new_empty(len(counts), a.shape[1], g.shape[1]) if out is None else out
    for e, (n, r0) in enumerate(zip(counts, layout.starts)):
        if n:
            torch.mm(a[r0:r0 + n].t(), g[r0:r0 + n], out=out[e])
        else:
            out[e].zero_()
    return out, gb


class GroupedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, activation, coef, w1, b1, w2, b2):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            x_ND = x.to(dtype)
            layout = row_layout(x_ND, counts, w1.shape[-1], w2.shape[-2])
            w1_EDH, b1_EH = (_combine(w, coef, dtype) for w in (w1, b1))
            h_NH = _row_matmul(x_ND, w1_EDH, layout, bias=b1_EH)
            del w1_EDH
            a_NF = activate(h_NH, activation)
            w2_EFD, b2_ED = (_combine(w, coef, dtype) for w in (w2, b2))
            y_ND = _row_matmul(a_NF, w2_EFD, layout, bias=b2_ED)
        ctx.save_for_backward(x_ND, h_NH, coef, w1, b1, w2, b2)
        ctx.layout, ctx.activation, ctx.x_dtype = layout, activation, x.dtype
        return y_ND

    @staticmethod
    def backward(ctx, grad_y_ND):
        x_ND, h_NH, coef, w1, b1, w2, b2 = ctx.saved_tensors
        layout = ctx.layout
        dtype = x_ND.dtype
        grad_y_ND = grad_y_ND.to(dtype).contiguous()  # the grouped GEMM needs real strides (a sum's is expanded)
        grad_coef = torch.zeros_like(coef) if coef is not None else None

        def pool_grad(w: Tensor) -> Tensor | None:
            """A pool of the compute dtype: its gradient buffer, whose slice 0 takes the experts'
            gradient ∂L/∂W first, so no other stack-sized buffer is needed (_source_grad then
            scales it in place). Else None: ∂L/∂W gets a buffer of its own."""
            return torch.empty_like(w) if coef is not None and w.dtype == dtype else None

        with torch.autocast(x_ND.device.type, enabled=False):
            # pass 2 backwards: ∂L/∂a and W2's gradients, then the activation over all rows at once
            a_NF = activate(h_NH, ctx.activation)
            w2_EFD, out2 = _combine(w2, coef, dtype), pool_grad(w2)
            grad_a_NF = _row_matmul(grad_y_ND, w2_EFD, layout, transpose=True)
            # the biases' gradients are skipped for the constant zero biases of `bias: false` (which
            # add nothing to ∂L/∂c either)
            grad_w2_EFD, grad_b2_ED = _weight_grad(a_NF, grad_y_ND, layout, None if out2 is None else out2[0],
                                                   ctx.needs_input_grad[7])
            del w2_EFD, a_NF
            grad_h_NH = activation_backward(grad_a_NF, h_NH, ctx.activation)
            del grad_a_NF
            grad_w2 = _source_grad(w2, coef, grad_coef, grad_w2_EFD, out2)
            del grad_w2_EFD, out2
            # pass 1 backwards: ∂L/∂x and W1's gradients
            w1_EDH, out1 = _combine(w1, coef, dtype), pool_grad(w1)
            grad_x_ND = _row_matmul(grad_h_NH, w1_EDH, layout, transpose=True)  # every row belongs to some expert
            grad_w1_EDH, grad_b1_EH = _weight_grad(x_ND, grad_h_NH, layout, None if out1 is None else out1[0],
                                                   ctx.needs_input_grad[5])
            del w1_EDH
            grad_w1 = _source_grad(w1, coef, grad_coef, grad_w1_EDH, out1)
            del grad_w1_EDH, out1
            grad_b1, grad_b2 = (None if g is None else _source_grad(b, coef, grad_coef, g)
                                for b, g in ((b1, grad_b1_EH), (b2, grad_b2_ED)))
        return grad_x_ND.to(ctx.x_dtype), None, None, grad_coef, grad_w1, grad_b1, grad_w2, grad_b2


def grouped_expert_ffn(x: Tensor, counts: list[int], source: ExpertSource, activation: str) -> Tensor:
    """y [N, d] for expert-sorted x [N, d] with counts[e] rows for expert e (row_layout chooses
    how the GEMMs run)."""
    return GroupedExpertFFN.apply(x, counts, activation, source.coef, *source.tensors())


def gated_sum(x: Tensor, token: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """out [T, d] with out[t] = Σ_{rows i of token t} gate[i] · y[i]: expert outputs y [N, d] of
    slots (token [N], gate [N]) added back onto x's [T, d] rows (zero where no slot), in x's dtype."""
    y = y * gate.unsqueeze(1).to(y.dtype)
    return torch.zeros(x.shape[0], x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, token, y).to(x.dtype)
