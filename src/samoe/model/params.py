"""Parameter accounting: total parameters by component, and active parameters per token.

Shared tensors (tied embeddings, SaMoE's pool, the shared bank) are counted once.
Active parameters per token = all non-expert parameters + for each MoE layer, k experts'
worth (k experts per token; for expert choice, top_k on average): for SaMoE that is k of the
layer's *combined* experts, so SaMoE and the standard MoE it shares shapes with match.
"""

from __future__ import annotations

import torch

from samoe.config import ModelConfig, router_top_k
from samoe.model.gpt import GPT

COMPONENTS = ("embedding", "attention", "dense_ffn", "expert", "router", "coefficient", "norm")


def component(name: str) -> str:
    """Which component a parameter belongs to, from its qualified name."""
    if name.startswith(("wte.", "wpe.", "lm_head.")):
        return "embedding"
    if ".attn." in name:
        return "attention"
    if ".router." in name:
        return "router"
    if name.endswith(("coef_logits", "depth_embedding")):  # what a layer adds to the experts it shares
        return "coefficient"
    if name.startswith(("expert_pool.", "expert_bank.")) or ".ffn.experts." in name:
        return "expert"
    if ".ln_" in name or name.startswith("ln_f."):
        return "norm"
    return "dense_ffn"  # dense FFN blocks, PR-MoE's dense branch and its mixing coefficients


def count_params(model: GPT) -> dict[str, int]:
    """{total, active, <component>...}; works on a model built on the meta device."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # tied/shared tensors appear once
        counts[component(name)] += p.numel()
    total = sum(counts.values())
    cfg = model.cfg
    active = total - counts["expert"]
    k = router_top_k(cfg.moe)
    for layer in model.moe_layers():
        w1, b1, w2, b2 = layer.experts()
        biases = b1.numel() + b2.numel() if cfg.bias else 0  # without biases b1, b2 are constant zeros
        per_expert = (w1.numel() + biases + w2.numel()) // w1.shape[0]
        active += k * per_expert
    return {"total": total, "active": active, **counts}


def count_config_params(cfg: ModelConfig) -> dict[str, int]:
    """count_params without allocating weights (the model is built on the meta device)."""
    with torch.device("meta"):
        model = GPT(cfg)
    return count_params(model)


def format_params(counts: dict[str, int]) -> str:
    rows = [(name, counts[name]) for name in ("total", "active", *COMPONENTS)]
    width = max(len(n) for n, _ in rows)
    return "\n".join(f"{n:<{width}}  {v:>16,}  ({v / 1e6:,.2f}M)" for n, v in rows)
