"""(c) Our MoE layer against peer implementations that run on CPU, at the same shapes, routing
and activation, forward + backward, interleaved in one process. A peer that is not installed
is skipped and reported as such.

- hf_switch: transformers' SwitchTransformersSparseMLP (top-1, capacity; a loop over experts).
  Ours: switch router, the same capacity factor, gelu.
- hf_mixtral: transformers' MixtralSparseMoeBlock (top-2 dropless, swiglu; a loop over
  experts indexing the stacked weights). Ours: topk k = 2, dropless, swiglu.
- deepspeed: deepspeed.moe.layer.MoE (top-1 gating with dense one-hot dispatch/combine
  einsums, O(T·E·C) memory) on a one-process gloo group. Ours: switch, same capacity, gelu.

Run as `python -m samoe.bench.peers TOKENS D_MODEL HIDDEN EXPERTS REPEATS`: it prints one JSON
object {"peer_<name>_vs_ours": ratio, ...} plus {"skipped": {name: reason}}, and each side's time
over the dense FFN of our layer's shape, timed in the same round-robin ("<name>_vs_dense",
"ours_for_<name>_vs_dense"): a peer at p times the dense FFN can be 1.3x slower than ours only if
ours runs at p / 1.3 of it, which the GEMM floor of bench part (h) may not allow. Both run under the
allocator setting of every samoe verb (samoe.malloc): freed memory going back to the system
would add the same page faults to both sides and pull the ratios toward 1 (docs/fast-moe.md).
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from samoe.bench.layers import Shape, fwd_bwd, moe_model
from samoe.ffn import FeedForward
from samoe.malloc import keep_freed_memory
from samoe.timing import interleaved_medians

CAPACITY_FACTOR = 1.25


def ours(shape: Shape, E: int, router: str, top_k: int, dropless: bool):
    model = moe_model(shape, E, router=router, top_k=top_k)
    model.cfg.moe.dropless = dropless  # the router reads its config at call time
    model.cfg.moe.capacity_factor = CAPACITY_FACTOR
    layer = model.moe_layers()[0]
    ids = torch.zeros(1, shape.tokens, dtype=torch.long)
    return lambda x: layer(x, ids)[0], model


def hf_switch(shape: Shape, E: int):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    cfg = SwitchTransformersConfig(d_model=shape.d_model, d_ff=shape.hidden, num_experts=E, dense_act_fn="gelu",
                                   expert_capacity=math.ceil(CAPACITY_FACTOR * shape.tokens / E), dropout_rate=0.0,
                                   router_jitter_noise=0.0)
    peer = SwitchTransformersSparseMLP(cfg)
    return peer, peer, ours(shape, E, "switch", 1, dropless=False)


def hf_mixtral(shape: Shape, E: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=shape.d_model, intermediate_size=shape.hidden, num_local_experts=E,
                        num_experts_per_tok=2, hidden_act="silu")
    peer = MixtralSparseMoeBlock(cfg)
    for p in peer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    swiglu = Shape(shape.tokens, shape.d_model, shape.hidden, "swiglu")
    return peer, peer, ours(swiglu, E, "topk", 2, dropless=True)


def deepspeed_moe(shape: Shape, E: int):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo")
    layer = MoE(hidden_size=shape.d_model, expert=FeedForward(shape.d_model, shape.hidden, "gelu", 1),
                num_experts=E, ep_size=1, k=1, capacity_factor=CAPACITY_FACTOR,
                eval_capacity_factor=CAPACITY_FACTOR, min_capacity=4, drop_tokens=True)
    return (lambda x: layer(x)[0]), layer, ours(shape, E, "switch", 1, dropless=False)


PEERS = {"hf_switch": hf_switch, "hf_mixtral": hf_mixtral, "deepspeed": deepspeed_moe}


def compare(shape: Shape, E: int, repeats: int) -> dict:
    """Each installed peer against ours (and both against the dense FFN of our layer's shape) at E
    experts: a builder of PEERS gives (the peer's call, the module holding its weights, (our
    call, our model))."""
    out: dict = {"skipped": {}}
    for name, build in PEERS.items():
        try:
            peer, peer_module, (mine, model) = build(shape, E)
        except ImportError as e:
            out["skipped"][name] = f"not installed ({e.name or e})"
            continue
        torch.manual_seed(0)
        x = torch.randn(1, shape.tokens, shape.d_model, requires_grad=True)
        # each call's gradients dropped after it, as an optimiser step leaves them: accumulating into the
        # last call's would add a pass over every weight to both sides (1.9 ms a call at E = 16)
        cases = {"peer": fwd_bwd(peer, x, None, peer_module), "ours": fwd_bwd(mine, x, None, model)}
        if model is not None:  # the dense FFN of our layer's shape (its width, its activation)
            m = model.cfg
            dense = FeedForward(m.d_model, m.ffn_hidden, m.activation, 1)
            cases["dense"] = fwd_bwd(dense, x, None)
        t = interleaved_medians(cases, repeats)
        out[f"peer_{name}_vs_ours"] = t["peer"] / t["ours"]
        out[f"time_peer_{name}"], out[f"time_ours_for_{name}"] = t["peer"], t["ours"]
        if "dense" in t:
            out[f"{name}_vs_dense"], out[f"ours_for_{name}_vs_dense"] = t["peer"] / t["dense"], t["ours"] / t["dense"]
    return out


if __name__ == "__main__":
    keep_freed_memory()  # the allocator every samoe verb runs with, for the peer and for ours alike
    T, d, f, E, repeats = (int(a) for a in sys.argv[1:6])
    print(json.dumps(compare(Shape(T, d, f), E, repeats)))
