"""Layer benchmarks: an MoE FFN layer's forward + backward against a dense FFN of the same
width (same FLOPs per token at top-1), and a SaMoE layer against the standard MoE layer.

Routing is dropless, so every token reaches an expert and the MoE layer does exactly the
dense layer's matmul work plus routing and dispatch: the ratio measures our overhead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from samoe.config_load import load_config
from samoe.ffn import FeedForward
from samoe.model.gpt import GPT
from samoe.moe.expert_gemm import rows_times_experts, runs_on, weight_grads
from samoe.timing import interleaved_medians


@dataclass
class Shape:
    tokens: int = 8192
    d_model: int = 256
    hidden: int = 1024
    activation: str = "gelu"


def moe_model(shape: Shape, num_experts: int, sharing: str = "private", pool_size: int = 2,
              router: str = "switch", top_k: int = 1, n_layers: int = 1, expert_hidden: int | None = None) -> GPT:
    """A GPT whose every block is MoE (experts of width expert_hidden, default the dense
    width); benchmarks call its MoE FFN layers directly."""
    cfg = load_config(overrides=[f"model.moe.ffn_hidden={expert_hidden or shape.hidden}",
        f"model.d_model={shape.d_model}", "model.n_heads=1", f"model.n_layers={n_layers}", "model.moe.every=1",
        f"model.ffn_hidden={shape.hidden}", f"model.activation={shape.activation}",
        f"model.moe.num_experts={num_experts}", f"model.moe.sharing={sharing}", f"model.moe.pool.size={pool_size}",
        f"model.moe.router={router}", f"model.moe.top_k={top_k}", "model.moe.dropless=true", "model.vocab_size=16"])
    return GPT(cfg.model)


def route_alike(model: GPT, like: GPT) -> GPT:
    """`model` with `like`'s router weights in every MoE layer, so both route every token to the
    same experts: SaMoE against the MoE then compares the expert computation alone, on the same
    counts (with different routers the padded layout could group one model's experts and not
    the other's, moe/grouped.py)."""
    for layer, src in zip(model.moe_layers(), like.moe_layers()):
        layer.router.load_state_dict(src.router.state_dict())
    return model


def fwd_bwd(layer, x: torch.Tensor, ids: torch.Tensor | None, owner: torch.nn.Module | None = None):
    """One forward + backward of a layer (an MoE FFN taking token ids, or a dense FFN);
    `owner` holds its parameters when a pool lives outside the layer."""
    params = list((owner or layer).parameters())

    def step():
        y = layer(x, ids)[0] if ids is not None else layer(x)
        y.sum().backward()
        for p in (x, *params):  # as an optimiser step with zero_grad(set_to_none=True) leaves them
            p.grad = None
    return step


def layer_ratios(shape: Shape, experts: tuple[int, ...] = (16, 64), pool_size: int = 2,
                 repeats: int = 5) -> dict[str, float]:
    """(a) MoE vs dense at each E, (b) SaMoE vs MoE at the first E; seconds and ratios."""
    torch.manual_seed(0)
    x = torch.randn(1, shape.tokens, shape.d_model, requires_grad=True)
    ids = torch.zeros(1, shape.tokens, dtype=torch.long)
    keep = []  # the models own the pools: keep them alive
    cases = {"dense": fwd_bwd(FeedForward(shape.d_model, shape.hidden, shape.activation, 1), x, None)}
    for E in experts:
        keep.append(moe_model(shape, E))
        cases[f"moe_e{E}"] = fwd_bwd(keep[-1].moe_layers()[0], x, ids, keep[-1])
    keep.append(route_alike(moe_model(shape, experts[0], "pool", pool_size), keep[0]))
    cases[f"samoe_e{experts[0]}"] = fwd_bwd(keep[-1].moe_layers()[0], x, ids, keep[-1])
    t = interleaved_medians(cases, repeats)
    out = {f"time_{k}": v for k, v in t.items()}
    for E in experts:
        out[f"moe_vs_dense_e{E}"] = t[f"moe_e{E}"] / t["dense"]
    out["samoe_vs_moe"] = t[f"samoe_e{experts[0]}"] / t[f"moe_e{experts[0]}"]
    return out


def scaling_table(d_model: int, hidden: int, tokens: tuple[int, ...], experts: tuple[int, ...],
                  repeats: int = 3) -> list[dict]:
    """(f) ratios of (a) and (b) as T and E grow."""
    rows = []
    for T in tokens:
        for E in experts:
            r = layer_ratios(Shape(T, d_model, hidden), (E,), repeats=repeats)
            rows.append({"tokens": T, "experts": E, "moe_vs_dense": r[f"moe_vs_dense_e{E}"],
                         "samoe_vs_moe": r["samoe_vs_moe"], "dense_ms": 1000 * r["time_dense"]})
    return rows


# ----------------------------------------------------------------------------- (h) training shapes

# (experts E, top-k): experts of width f / k, so that every layout costs the dense FFN's FLOPs
# per token; k = 1 is the classic layer, k = 2 and 4 the fine-grained ones of the recipe.
TRAINING_LAYOUTS = ((8, 1), (16, 1), (64, 1), (16, 2), (32, 4))


def gemm_floor(tokens: int, d: int, width: int, experts: int, top_k: int, batched: bool = False) -> Callable[[], None]:
    """The six GEMMs of an FFN's forward + backward alone (x·W1, a·W2; ∂a, ∂W2, ∂x, ∂W1), run
    expert by expert on equal shares of the T·k routed rows: no routing, no dispatch, no
    activation. Each of the six runs as the layer runs it: the experts over the threads
    (moe/expert_gemm.py) where that kernel takes them, else a torch.mm per expert into
    preallocated outputs. Timed beside the dense FFN's six, it is the floor the layer's shapes
    set on this machine for a GEMM per expert. `batched`: each of the six as one torch.bmm over
    all experts instead, the floor of the padded layout (moe/grouped.py) when the counts are
    equal and nothing is padded."""
    n = tokens * top_k // experts
    x, gy = torch.randn(experts, n, d), torch.randn(experts, n, d)
    w1, w2 = torch.randn(experts, d, width), torch.randn(experts, width, d)
    h, ga = torch.empty(experts, n, width), torch.empty(experts, n, width)
    y, gx = torch.empty_like(x), torch.empty_like(x)
    g1, g2 = torch.empty_like(w1), torch.empty_like(w2)

    def run():
        for e in range(experts):
            torch.mm(x[e], w1[e], out=h[e])
            torch.mm(h[e], w2[e], out=y[e])
            torch.mm(gy[e], w2[e].t(), out=ga[e])
            torch.mm(h[e].t(), gy[e], out=g2[e])
            torch.mm(ga[e], w1[e].t(), out=gx[e])
            torch.mm(x[e].t(), ga[e], out=g1[e])

    counts, rows = [n] * experts, lambda t: t.view(experts * n, t.shape[-1])

    def run_kernel():
        hk = rows_times_experts(rows(x), w1, counts)
        rows_times_experts(hk, w2, counts)
        gak = rows_times_experts(rows(gy), w2.transpose(1, 2), counts)
        weight_grads(hk, rows(gy), counts, g2)
        rows_times_experts(gak, w1.transpose(1, 2), counts)
        weight_grads(rows(x), gak, counts, g1)

    def run_batched():
        torch.bmm(x, w1, out=h)
        torch.bmm(h, w2, out=y)
        torch.bmm(gy, w2.transpose(1, 2), out=ga)
        torch.bmm(h.transpose(1, 2), gy, out=g2)
        torch.bmm(ga, w1.transpose(1, 2), out=gx)
        torch.bmm(x.transpose(1, 2), ga, out=g1)
    if batched:
        return run_batched
    return run_kernel if runs_on(counts, x, w1) else run


def weight_traffic_bound(dense_s: float, expert_params: int, dense_params: int, bytes_per_s: float,
                         passes: float = 3.0) -> float:
    """The time ratio to dense that memory traffic alone forces on a layer whose FLOPs equal the
    dense FFN's: each weight is read in forward, read in backward and its gradient written
    (`passes` = 3 passes over the weights), and the expert weights beyond the dense FFN's
    have to come from memory: (t_dense + passes · 4 B · (P_experts - P_dense) / bandwidth) / t_dense."""
    return (dense_s + passes * 4 * max(0, expert_params - dense_params) / bytes_per_s) / dense_s


# SaMoE's extra passes over a layer's expert-sized weights, K = 2 (moe/grouped.py): combining
# reads K and writes 1, in forward and again in backward (2 · 3); the pool's gradient reads the
# stack's gradient and writes a slice, for each k (2K = 4); the coefficients' gradient reads the
# K pool slices and the stack's gradient (3). 13 in all.
SAMOE_EXTRA_PASSES = 13.0


def training_shapes(shape: Shape, tokens: tuple[int, ...], bytes_per_s: float, repeats: int = 3) -> list[dict]:
    """(h) Each TRAINING_LAYOUT at each T: MoE / dense and SaMoE (K = 2) / MoE for the layer,
    beside the floor its GEMM shapes set and the bound memory traffic sets."""
    rows = []
    d, f = shape.d_model, shape.hidden
    for T in tokens:
        torch.manual_seed(0)
        x = torch.randn(1, T, d, requires_grad=True)
        ids = torch.zeros(1, T, dtype=torch.long)
        for E, k in TRAINING_LAYOUTS:
            width = f // k
            router = "switch" if k == 1 else "topk"
            moe, samoe = (moe_model(Shape(T, d, f), E, sharing, router=router, top_k=k, expert_hidden=width)
                          for sharing in ("private", "pool"))
            route_alike(samoe, moe)
            t = interleaved_medians({
                "dense": fwd_bwd(FeedForward(d, f, shape.activation, 1), x, None),
                "moe": fwd_bwd(moe.moe_layers()[0], x, ids, moe),
                "samoe": fwd_bwd(samoe.moe_layers()[0], x, ids, samoe),
                "gemm_dense": gemm_floor(T, d, f, 1, 1),
                "gemm_moe": gemm_floor(T, d, width, E, k),
                "bmm_moe": gemm_floor(T, d, width, E, k, batched=True)}, repeats)
            expert_params, dense_params = 2 * E * d * width, 2 * d * f
            rows.append({
                "tokens": T, "experts": E, "top_k": k, "expert_hidden": width, "dense_ms": 1000 * t["dense"],
                "moe_vs_dense": t["moe"] / t["dense"], "samoe_vs_moe": t["samoe"] / t["moe"],
                "gemm_floor": t["gemm_moe"] / t["gemm_dense"], "bmm_floor": t["bmm_moe"] / t["gemm_dense"],
                "traffic_bound": weight_traffic_bound(t["dense"], expert_params, dense_params, bytes_per_s),
                # SaMoE against the MoE: all of its extra passes are traffic the MoE does not have
                "samoe_traffic_bound": weight_traffic_bound(t["moe"], expert_params, 0, bytes_per_s,
                                                            SAMOE_EXTRA_PASSES)})
    return rows
