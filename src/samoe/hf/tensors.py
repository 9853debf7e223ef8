"""A trained model's tensors as exports store them: by samoe name, tied weights once, and
SaMoE's pool (or the shared bank) optionally materialised into per-layer experts.

Materialising layer l of a pool model writes its combined experts

    W1_l[e] = Σ_k c_l[e, k] · P1[k, e],   c_l = softmax(a_l / τ)      (likewise b1, W2, b2)

as that layer's own stack `blocks.i.ffn.experts.{w1,b1,w2,b2}` ([E_l, ...]) and drops the pool
and the coefficient logits; a shared-bank model gets a copy of the bank in every MoE layer.
The result is a `private` model: samoe's GPT and the exported modelling code load it as one,
and it computes the same function (up to the rounding of the combination).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from samoe.config import ModelConfig, experts_per_layer, moe_layer_ids
from samoe.model.gpt import GPT


def model_tensors(model: GPT) -> dict[str, Tensor]:
    """Persistent tensors by samoe name (parameters and buffers), lm_head left out when tied."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {name: t.detach() for name, t in state.items()}


def materialized(model: GPT) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, tensors) of the equivalent `private` model of a pool or shared-bank model; a
    private or dense model is returned as it is."""
    cfg = model.cfg
    tensors = model_tensors(model)
    if not moe_layer_ids(cfg) or cfg.moe.sharing == "private":
        return cfg, tensors
    out = {n: t for n, t in tensors.items()
           if not n.startswith(("expert_pool.", "expert_bank.")) and not n.endswith(".ffn.experts.coef_logits")}
    new = copy.deepcopy(cfg)
    new.moe.experts_per_layer = experts_per_layer(cfg)
    new.moe.sharing = "private"
    names = ("w1", "b1", "w2", "b2") if cfg.bias else ("w1", "w2")
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            if i not in moe_layer_ids(cfg):
                continue
            w1, b1, w2, b2 = block.ffn.experts()  # combined from the pool, or the bank itself
            combined = dict(zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2)))
            for name in names:
                out[f"blocks.{i}.ffn.experts.{name}"] = combined[name].detach().clone()
    return new, out
