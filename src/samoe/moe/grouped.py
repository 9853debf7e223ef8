"""Grouped expert FFN over expert-sorted tokens, with a hand-written backward.

Tokens arrive sorted by expert: rows [o_e, o_e + n_e) of x [N, d] belong to expert e. Each
expert's matrices run once on its contiguous slice, in two passes over the experts:

    pass 1:  h[rows_e] = x[rows_e]·W1[e] + b1[e]          (all experts)
             a = act(h)                                    (one call over all N rows)
    pass 2:  y[rows_e] = a[rows_e]·W2[e] + b2[e]           (all experts)

Why this shape:
- the activation (and its backward) runs once over [N, h], not once per expert: elementwise
  calls on an expert's few rows cost more in call overhead than in arithmetic;
- a custom autograd Function rather than a loop of autograd ops: every result is written in
  place into preallocated [N, ·] and [E, ·, ·] buffers, so no cat/split/stack copies of
  activations or full-size weight gradients; only x and h are saved, a = act(h) is recomputed
  in backward (keeping it was no faster within the noise, and cost SaMoE's memory ratio 0.004);
- each expert's rows and matrices are views taken all at once (`split(counts)`, `unbind(0)`),
  not sliced expert by expert: at E = 16 the per-slice Python calls were a tenth of the layer;
- bias gradients are one segment sum (index_add over the rows' expert ids) per bias;
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


class GroupedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, activation, coef, w1, b1, w2, b2):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        active = [e for e, n in enumerate(counts) if n]
        with torch.autocast(dev, enabled=False):
            xc = x.to(dtype)
            W1, B1 = _combine(w1, coef, dtype), _combine(b1, coef, dtype)
            h = xc.new_empty(x.shape[0], W1.shape[-1])
            xs, hs, W1s, B1s = xc.split(counts), h.split(counts), W1.unbind(0), B1.unbind(0)
            for e in active:
                torch.addmm(B1s[e], xs[e], W1s[e], out=hs[e])
            del W1, W1s
            a = activate(h, activation)
            W2, B2 = _combine(w2, coef, dtype), _combine(b2, coef, dtype)
            y = xc.new_empty(x.shape[0], W2.shape[-1])
            as_, ys, W2s, B2s = a.split(counts), y.split(counts), W2.unbind(0), B2.unbind(0)
            for e in active:
                torch.addmm(B2s[e], as_[e], W2s[e], out=ys[e])
        ctx.save_for_backward(xc, h, coef, w1, b1, w2, b2)
        ctx.counts, ctx.active, ctx.activation, ctx.x_dtype = counts, active, activation, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, h, coef, w1, b1, w2, b2 = ctx.saved_tensors
        dtype = xc.dtype
        gy = gy.to(dtype)
        counts, active = ctx.counts, ctx.active
        E = len(counts)
        gcoef = torch.zeros_like(coef) if coef is not None else None

        def stack_grad(w: Tensor) -> tuple[Tensor, Tensor | None]:
            """(g, out): where the experts' gradients go, g [E, ...], and the buffer that
            _source_grad turns it into. A stack of the compute dtype: g is w's gradient itself.
            A pool of the compute dtype: g is slice 0 of the pool's gradient, so no stack-sized
            buffer is needed. Experts without tokens get zero gradients."""
            out = torch.empty_like(w) if coef is not None and w.dtype == dtype else None
            g = out[0] if out is not None else xc.new_empty(w.shape[1:] if coef is not None else w.shape)
            if len(active) < E:
                g[[e for e, n in enumerate(counts) if not n]] = 0
            return g, out

        with torch.autocast(xc.device.type, enabled=False):
            # pass 2 backwards: ∂L/∂a and W2's gradients, then the activation over all rows at once
            a = activate(h, ctx.activation)
            W2, (gW2, out2) = _combine(w2, coef, dtype), stack_grad(w2)
            ga = torch.empty_like(a)
            gys, as_, gas, W2s, gW2s = gy.split(counts), a.split(counts), ga.split(counts), W2.unbind(0), gW2.unbind(0)
            for e in active:
                torch.mm(gys[e], W2s[e].t(), out=gas[e])
                torch.mm(as_[e].t(), gys[e], out=gW2s[e])
            del W2, W2s, a, as_
            gh = activation_backward(ga, h, ctx.activation)
            del ga, gas
            gw2 = _source_grad(w2, coef, gcoef, gW2, out2)
            del gW2, gW2s, out2
            # pass 1 backwards: ∂L/∂x and W1's gradients
            W1, (gW1, out1) = _combine(w1, coef, dtype), stack_grad(w1)
            gx = torch.empty_like(xc)  # every row belongs to some expert
            ghs, xs, gxs, W1s, gW1s = gh.split(counts), xc.split(counts), gx.split(counts), W1.unbind(0), gW1.unbind(0)
            for e in active:
                torch.mm(ghs[e], W1s[e].t(), out=gxs[e])
                torch.mm(xs[e].t(), ghs[e], out=gW1s[e])
            del W1, W1s
            gw1 = _source_grad(w1, coef, gcoef, gW1, out1)
            del gW1, gW1s, out1
            # bias gradients: one segment sum each, over the rows' expert ids (skipped for the
            # constant zero biases of `bias: false`, which also add nothing to ∂L/∂c)
            row_expert = torch.repeat_interleave(torch.arange(E, device=xc.device),
                                                 torch.tensor(counts, device=xc.device))
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
