"""Grouped expert FFN over expert-sorted tokens, with a hand-written backward.

Tokens arrive sorted by expert: rows [o_e, o_e + n_e) of x [N, d] belong to expert e. Each
expert's matrices run once on its contiguous slice, in two passes over the experts:

    pass 1:  h[rows_e] = x[rows_e]·W1[e] + b1[e]          (all experts)
             a = act(h)                                    (one call over all N rows)
    pass 2:  y[rows_e] = a[rows_e]·W2[e] + b2[e]           (all experts)

Each pass is one grouped GEMM (`torch._grouped_mm` with the experts' row offsets) where it
runs: on the CPU in fp32 and bf16 when every operand's rows are 16-byte multiples. At the
default preset's shapes it took 20-25% less time than a loop of per-expert GEMMs for the whole
FFN forward and backward. Elsewhere (float64, odd widths, CUDA until a GPU has checked it) a
loop over the experts runs the same GEMMs one by one (`_row_matmul`, `_weight_grad`).

Why this shape:
- the activation (and its backward) runs once over [N, h], not once per expert: elementwise
  calls on an expert's few rows cost more in call overhead than in arithmetic;
- a custom autograd Function rather than autograd through the GEMMs: only x and h are saved,
  a = act(h) is recomputed in backward (keeping it was no faster within the noise, and cost
  SaMoE's memory ratio 0.004), and a pool's gradient is formed in place (below);
- biases are added expert by expert, in place; their gradients are one segment sum
  (index_add over the rows' expert ids) per bias;
- SaMoE: the weights may be given as a pool P [K, E, ...] with mixing coefficients c ([K],
  or [E, K] per expert). The layer's experts W = Σ_k c[.., k] · P[k] are combined just before
  use, one matrix at a time (W1 for pass 1, W2 for pass 2), in forward and again in backward:
  none are kept between forward and backward. One combination per matrix and layer is a few
  large memory-bound passes; combining expert by expert was 4E small ones, and at the default
  preset's size (E = 16, 128 x 256 experts) their call overhead made SaMoE's step 12% slower.
  The backward computes the stack's gradient ∂L/∂W as for private experts, then
  ∂L/∂P[k] = c[.., k] · ∂L/∂W and ∂L/∂c[.., k] = <P[k], ∂L/∂W>.
Under autocast the matmuls run in the autocast dtype; gradients return in the inputs' dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from samoe.model.ffn import activate


@dataclass
class ExpertSource:
    """Expert weights as the fast path takes them: stacks w1 [E, d, h], b1 [E, h],
    w2 [E, f, d], b2 [E, d] when coef is None; else a pool with a leading K axis and the
    mixing coefficients coef [K] (one mixture per layer) or [E, K] (one per expert)."""

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
    pool w = P [K, E, ...] (elementwise, memory-bound: a mul and K - 1 fused multiply-adds
    stream the pool once)."""
    if coef is None:
        return w.to(dtype)
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


def grouped_gemm_offsets(x: Tensor, counts: list[int], *widths: int) -> Tensor | None:
    """The experts' row offsets (int32 cumulative counts) when torch._grouped_mm can run the
    FFN's GEMMs on x: a device and dtype of GROUPED_GEMM, every width (d, h, and x's own) a
    16-byte multiple. None: the loop over experts runs them."""
    if x.dtype not in GROUPED_GEMM.get(x.device.type, ()) or not hasattr(torch, "_grouped_mm"):
        return None
    if any(w * x.element_size() % 16 for w in (x.shape[1], *widths)):
        return None
    return torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)


def _row_matmul(a: Tensor, w: Tensor, counts: list[int], offs: Tensor | None, transpose: bool = False) -> Tensor:
    """[N, ·]: the rows of expert e times w[e] (w[e]ᵀ with `transpose`), for w [E, ·, ·]."""
    w = w.transpose(1, 2) if transpose else w
    if offs is not None:
        return torch._grouped_mm(a, w, offs=offs)
    out = a.new_empty(a.shape[0], w.shape[-1])
    for ae, we, oe, n in zip(a.split(counts), w.unbind(0), out.split(counts), counts):
        if n:
            torch.mm(ae, we, out=oe)
    return out


def _add_bias(y: Tensor, b: Tensor, counts: list[int]) -> Tensor:
    """y [N, ·] with b[e] added to the rows of expert e, in place (per expert: a gathered
    [N, ·] bias would be a temporary as large as y)."""
    for ye, be, n in zip(y.split(counts), b.unbind(0), counts):
        if n:
            ye.add_(be)
    return y


def _weight_grad(a: Tensor, g: Tensor, counts: list[int], offs: Tensor | None, out: Tensor | None) -> Tensor:
    """[E, ·, ·]: Σ over the rows of expert e of a[rows]ᵀ · g[rows] (zero for an expert without
    rows), written into `out` when given (then a quarter of the experts at a time: the grouped
    GEMM has no `out=`, and a whole stack-sized temporary raised SaMoE's peak memory by 2%)."""
    if offs is not None and out is None:
        return torch._grouped_mm(a.t(), g, offs=offs)
    if offs is not None:
        starts, step = [0, *accumulate(counts)], max(1, len(counts) // 4)
        for s in range(0, len(counts), step):
            r0, r1 = starts[s], starts[min(len(counts), s + step)]
            out[s:s + step].copy_(torch._grouped_mm(a[r0:r1].t(), g[r0:r1], offs=offs[s:s + step] - r0))
        return out
    out = a.new_empty(len(counts), a.shape[1], g.shape[1]) if out is None else out
    for ae, ge, oe, n in zip(a.split(counts), g.split(counts), out.unbind(0), counts):
        if n:
            torch.mm(ae.t(), ge, out=oe)
        else:
            oe.zero_()
    return out


class GroupedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, activation, coef, w1, b1, w2, b2):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            xc = x.to(dtype)
            offs = grouped_gemm_offsets(xc, counts, w1.shape[-1], w2.shape[-2])
            row_expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device),
                                                 torch.tensor(counts, device=x.device))
            W1, B1 = _combine(w1, coef, dtype), _combine(b1, coef, dtype)
            h = _add_bias(_row_matmul(xc, W1, counts, offs), B1, counts)
            del W1
            a = activate(h, activation)
            W2, B2 = _combine(w2, coef, dtype), _combine(b2, coef, dtype)
            y = _add_bias(_row_matmul(a, W2, counts, offs), B2, counts)
        ctx.save_for_backward(xc, h, row_expert, offs, coef, w1, b1, w2, b2)
        ctx.counts, ctx.activation, ctx.x_dtype = counts, activation, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, h, row_expert, offs, coef, w1, b1, w2, b2 = ctx.saved_tensors
        dtype = xc.dtype
        gy = gy.to(dtype).contiguous()  # the grouped GEMM needs real strides (a sum's gradient is expanded)
        counts = ctx.counts
        E = len(counts)
        gcoef = torch.zeros_like(coef) if coef is not None else None

        def pool_grad(w: Tensor) -> Tensor | None:
            """A pool of the compute dtype: its gradient buffer, whose slice 0 takes the experts'
            gradient ∂L/∂W first, so no other stack-sized buffer is needed (_source_grad then
            scales it in place). Else None: ∂L/∂W gets a buffer of its own."""
            return torch.empty_like(w) if coef is not None and w.dtype == dtype else None

        with torch.autocast(xc.device.type, enabled=False):
            # pass 2 backwards: ∂L/∂a and W2's gradients, then the activation over all rows at once
            a = activate(h, ctx.activation)
            W2, out2 = _combine(w2, coef, dtype), pool_grad(w2)
            ga = _row_matmul(gy, W2, counts, offs, transpose=True)
            gW2 = _weight_grad(a, gy, counts, offs, None if out2 is None else out2[0])
            del W2, a
            gh = activation_backward(ga, h, ctx.activation)
            del ga
            gw2 = _source_grad(w2, coef, gcoef, gW2, out2)
            del gW2, out2
            # pass 1 backwards: ∂L/∂x and W1's gradients
            W1, out1 = _combine(w1, coef, dtype), pool_grad(w1)
            gx = _row_matmul(gh, W1, counts, offs, transpose=True)  # every row belongs to some expert
            gW1 = _weight_grad(xc, gh, counts, offs, None if out1 is None else out1[0])
            del W1
            gw1 = _source_grad(w1, coef, gcoef, gW1, out1)
            del gW1, out1
            # bias gradients: one segment sum each, over the rows' expert ids (skipped for the
            # constant zero biases of `bias: false`, which also add nothing to ∂L/∂c)
            gb1, gb2 = (_source_grad(b, coef, gcoef, g.new_zeros(E, g.shape[1]).index_add_(0, row_expert, g))
                        if ctx.needs_input_grad[i] else None
                        for b, g, i in ((b1, gh, 5), (b2, gy, 7)))
        return gx.to(ctx.x_dtype), None, None, gcoef, gw1, gb1, gw2, gb2


def grouped_expert_ffn(x: Tensor, counts: list[int], source: ExpertSource, activation: str) -> Tensor:
    """y [N, d] for expert-sorted x [N, d] with counts[e] rows for expert e."""
    return GroupedExpertFFN.apply(x, counts, activation, source.coef, *source.tensors())


def gated_sum(x: Tensor, token: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """out [T, d] with out[t] = Σ_{rows i of token t} gate[i] · y[i]: expert outputs y [N, d] of
    slots (token [N], gate [N]) added back onto x's [T, d] rows (zero where no slot), in x's dtype."""
    y = y * gate.unsqueeze(1).to(y.dtype)
    return torch.zeros(x.shape[0], x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, token, y).to(x.dtype)
