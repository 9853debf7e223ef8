"""Grouped expert FFN over expert-sorted tokens, with a hand-written backward.

Tokens arrive sorted by expert: rows [o_e, o_e + n_e) of x [N, d] belong to expert e. Each
expert runs once on its contiguous slice:

    h = x_e·W1[e] + b1[e]        a = act(h)        y_e = a·W2[e] + b2[e]

Why a custom autograd Function rather than a loop of autograd ops:
- every result is written in place into preallocated [N, ·] and [E, ·, ·] buffers, so no
  cat/split/stack copies of activations or full-size weight gradients;
- only x and h are saved; a = act(h) is recomputed in backward;
- SaMoE: the weights may be given as a pool P [K, E, ...] with mixing coefficients c ([K],
  or [E, K] per expert). Expert e's weights W[e] = Σ_k c_e[k] · P[k, e] are combined just
  before use, in forward and again in backward, one expert at a time: a layer's combined
  weights are never all alive at once, and none are kept between forward and backward.
  The backward turns ∂L/∂W[e] into ∂L/∂P[k, e] = c_e[k] · ∂L/∂W[e] and
  ∂L/∂c_e[k] = <∂L/∂W[e], P[k, e]>.
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


def _pool_view(w: Tensor, e: int) -> Tensor:
    """Pool slice P[:, e] flattened to [K, numel]: a view, no copy."""
    return w[:, e].reshape(w.shape[0], -1)


def _combine(c: Tensor, w: Tensor, e: int) -> Tensor:
    """Σ_k c[k] · P[k, e] for a pool tensor P = w [K, E, ...] (elementwise: memory-bound work
    is all there is, and a mul + fused multiply-adds stream it once)."""
    c = c.to(w.dtype)
    out = w[0, e] * c[0]
    for k in range(1, w.shape[0]):
        out.addcmul_(w[k, e], c[k])
    return out


def _expert_weights(weights: tuple[Tensor, ...], coef: Tensor | None, e: int, dtype: torch.dtype):
    """(W1, b1, W2, b2) of expert e in the compute dtype, combined from the pool if coef is given."""
    if coef is None:
        return tuple(w[e].to(dtype) for w in weights)
    c = coef if coef.dim() == 1 else coef[e]
    return tuple(_combine(c, w, e).to(dtype) for w in weights)


class GroupedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, activation, coef, w1, b1, w2, b2):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        weights = (w1, b1, w2, b2)
        with torch.autocast(dev, enabled=False):
            xc = x.to(dtype)
            h = xc.new_empty(x.shape[0], w1.shape[-1])
            y = xc.new_empty(x.shape[0], w2.shape[-1])
            start = 0
            for e, n in enumerate(counts):
                if n:
                    W1, B1, W2, B2 = _expert_weights(weights, coef, e, dtype)
                    rows = slice(start, start + n)
                    torch.addmm(B1, xc[rows], W1, out=h[rows])
                    torch.addmm(B2, activate(h[rows], activation), W2, out=y[rows])
                    start += n
        ctx.save_for_backward(xc, h, coef, w1, b1, w2, b2)
        ctx.counts, ctx.activation, ctx.x_dtype = counts, activation, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, h, coef, w1, b1, w2, b2 = ctx.saved_tensors
        weights = (w1, b1, w2, b2)
        dtype = xc.dtype
        gy = gy.to(dtype)
        gx = torch.empty_like(xc)  # every row belongs to some expert
        grads = [torch.empty_like(w) for w in weights]  # same shapes as given: stack or pool
        gcoef = torch.zeros_like(coef) if coef is not None else None
        with torch.autocast(xc.device.type, enabled=False):
            start = 0
            for e, n in enumerate(ctx.counts):
                if not n:  # an expert without tokens gets zero gradients
                    for g in grads:
                        (g[e] if coef is None else g[:, e]).zero_()
                    continue
                rows = slice(start, start + n)
                start += n
                W1, _, W2, _ = _expert_weights(weights, coef, e, dtype)
                a = activate(h[rows], ctx.activation)
                gh = activation_backward(gy[rows] @ W2.t(), h[rows], ctx.activation)
                torch.mm(gh, W1.t(), out=gx[rows])
                if coef is None and grads[0].dtype == dtype:  # straight into the gradient stacks
                    torch.mm(xc[rows].t(), gh, out=grads[0][e])
                    torch.sum(gh, 0, out=grads[1][e])
                    torch.mm(a.t(), gy[rows], out=grads[2][e])
                    torch.sum(gy[rows], 0, out=grads[3][e])
                    continue
                expert_grads = (xc[rows].t() @ gh, gh.sum(0), a.t() @ gy[rows], gy[rows].sum(0))
                for g, ge, w in zip(grads, expert_grads, weights):
                    if coef is None:
                        g[e] = ge
                        continue
                    ge = ge.to(w.dtype).reshape(-1)
                    c = (coef if coef.dim() == 1 else coef[e]).to(w.dtype)
                    for k in range(c.shape[0]):  # ∂L/∂P[k, e] = c_e[k] · ∂L/∂W[e]
                        torch.mul(ge, c[k], out=g[k, e].view(-1))
                    gc = (_pool_view(w, e) @ ge).to(coef.dtype)  # ∂L/∂c_e[k] = <P[k, e], ∂L/∂W[e]>
                    if coef.dim() == 1:
                        gcoef += gc
                    else:
                        gcoef[e] += gc
        return gx.to(ctx.x_dtype), None, None, gcoef, *grads


def grouped_expert_ffn(x: Tensor, counts: list[int], source: ExpertSource, activation: str) -> Tensor:
    """y [N, d] for expert-sorted x [N, d] with counts[e] rows for expert e."""
    return GroupedExpertFFN.apply(x, counts, activation, source.coef, *source.tensors())


def gated_sum(x: Tensor, token: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """out [T, d] with out[t] = Σ_{rows i of token t} gate[i] · y[i]: expert outputs y [N, d] of
    slots (token [N], gate [N]) added back onto x's [T, d] rows (zero where no slot), in x's dtype."""
    y = y * gate.unsqueeze(1).to(y.dtype)
    return torch.zeros(x.shape[0], x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, token, y).to(x.dtype)
