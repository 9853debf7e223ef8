"""Layer benchmarks: an MoE FFN layer's forward + backward against a dense FFN of the same
width (same FLOPs per token at top-1), and a SaMoE layer against the standard MoE layer.

Routing is dropless, so every token reaches an expert and the MoE layer does exactly the
dense layer's matmul work plus routing and dispatch: the ratio measures our overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samoe.bench.timing import interleaved_medians
from samoe.config import load_config
from samoe.model.ffn import FeedForward
from samoe.model.gpt import GPT


@dataclass
class Shape:
    tokens: int = 8192
    d_model: int = 256
    hidden: int = 1024
    activation: str = "gelu"


def moe_model(shape: Shape, num_experts: int, sharing: str = "private", pool_size: int = 2,
              router: str = "switch", top_k: int = 1, n_layers: int = 1) -> GPT:
    """A GPT whose every block is MoE; benchmarks call its MoE FFN layers directly."""
    cfg = load_config(overrides=[
        f"model.d_model={shape.d_model}", "model.n_heads=1", f"model.n_layers={n_layers}", "model.moe.every=1",
        f"model.ffn_hidden={shape.hidden}", f"model.activation={shape.activation}",
        f"model.moe.num_experts={num_experts}", f"model.moe.sharing={sharing}", f"model.moe.pool.size={pool_size}",
        f"model.moe.router={router}", f"model.moe.top_k={top_k}", "model.moe.dropless=true", "model.vocab_size=16"])
    return GPT(cfg.model)


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
    keep.append(moe_model(shape, experts[0], "pool", pool_size))
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
