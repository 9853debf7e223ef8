"""Stock Hugging Face formats (Mixtral, Qwen2-MoE): which samoe models fit, their config.json
and their tensors, named as the checkpoints on the Hub name them (transformers 4.x loads
them as they are, 5.x merges the per-expert tensors on load).

A model fits when the stock architecture computes exactly what samoe computes:

    backbone   RMSNorm (model.norm), rotary positions, SwiGLU FFNs, no biases (model.bias),
               a key/value head per query head
    routing    softmax over experts, the top k; Mixtral always renormalises the k gates, so it
               needs k > 1 (samoe renormalises exactly when k > 1); Qwen2-MoE renormalises
               when norm_topk_prob, which is written as k > 1. No selection bias.
    layout     Mixtral: an MoE FFN in every block (model.moe.every = 1), no dense branch.
               Qwen2-MoE: an MoE FFN in every `every`-th block (its decoder_sparse_step), the
               PR-MoE branch as its shared expert when mixed by a sigmoid gate
               (y = moe(x) + σ(x·w)·ffn(x), model.moe.residual_gate = sigmoid); without a
               branch the shared expert is a zero FFN of width 1 (adds exactly 0).
    experts    the same count in every layer; a SaMoE pool or shared bank is materialised
               (hf/tensors.py) first.

Mapping (nn.Linear weights are [out, in]; samoe's experts W1 [E, d, 2f], W2 [E, f, d]):
    q, k, v = rows [0, d), [d, 2d), [2d, 3d) of qkv.weight;    o = proj.weight
    expert e: gate = W1[e][:, :f]ᵀ, up = W1[e][:, f:]ᵀ, down = W2[e]ᵀ     (Mixtral: w1, w3, w2)
    dense FFN: gate = fc1.weight[:f], up = fc1.weight[f:], down = fc2.weight
"""

from __future__ import annotations

from torch import Tensor

from samoe.config import (
    ROUTER_KINDS,
    ModelConfig,
    expert_hidden,
    experts_per_layer,
    ffn_hidden,
    moe_layer_ids,
    residual_hidden,
    router_top_k,
)
from samoe.errors import ExportError

FORMATS = ("mixtral", "qwen2_moe")


def check_fits(m: ModelConfig, fmt: str) -> None:
    """ExportError naming the first config field that keeps model m out of format fmt."""
    moe, k = m.moe, router_top_k(m.moe)
    sparse = bool(moe_layer_ids(m))

    def need(ok: bool, field: str, value, why: str) -> None:
        if not ok:
            raise ExportError(f"cannot export to {fmt}: {field} = {value!r}; {fmt} needs {why}")

    need(m.norm == "rmsnorm", "model.norm", m.norm, "rmsnorm")
    need(m.positions == "rotary", "model.positions", m.positions, "rotary")
    need(m.activation == "swiglu", "model.activation", m.activation, "swiglu")
    need(not m.bias, "model.bias", m.bias, "false (no biases)")
    if fmt == "mixtral":
        need(sparse, "model.moe.enabled", moe.enabled, "an MoE model (export a dense one as qwen2_moe)")
    if not sparse:
        return
    need(ROUTER_KINDS[moe.router].softmax_top_k, "model.moe.router", moe.router,
         "softmax top-k routing (switch, gshard or topk)")
    need(not moe.aux_free_bias, "model.moe.aux_free_bias", moe.aux_free_bias, "false (no selection bias)")
    need(len(set(experts_per_layer(m))) == 1, "model.moe.experts_per_layer", moe.experts_per_layer,
         "the same number of experts in every layer")
    if fmt == "mixtral":
        field, value = ("model.moe.top_k", moe.top_k) if moe.router == "topk" else ("model.moe.router", moe.router)
        need(k > 1, field, value, "k > 1 (it renormalises the chosen gates, samoe does so only for k > 1)")
        need(moe.every == 1, "model.moe.every", moe.every, "an MoE FFN in every block (1)")
        need(not moe.residual, "model.moe.residual", moe.residual, "no dense branch (export to qwen2_moe)")
    else:
        need(not moe.residual or moe.residual_gate == "sigmoid", "model.moe.residual_gate", moe.residual_gate,
             "sigmoid (its shared expert is added with a sigmoid gate)")


def backbone_keys(m: ModelConfig) -> dict:
    """The Hugging Face config keys every export format shares: the transformer backbone's sizes."""
    return {"vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads, "max_position_embeddings": m.block_size,
            "tie_word_embeddings": m.tie_embeddings}


def stock_config(m: ModelConfig, fmt: str, eot_id: int, dtype: str) -> dict:
    """config.json of format fmt for model m (check_fits first)."""
    moe_ids = moe_layer_ids(m)
    E = experts_per_layer(m)[0] if moe_ids else 1
    k = router_top_k(m.moe) if moe_ids else 1
    out = {
        "architectures": ["MixtralForCausalLM" if fmt == "mixtral" else "Qwen2MoeForCausalLM"],
        "model_type": fmt,
        **backbone_keys(m),
        "num_key_value_heads": m.n_heads,
        "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "num_experts_per_tok": k,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype,
    }
    if fmt == "mixtral":
        out.update({"intermediate_size": expert_hidden(m), "num_local_experts": E, "sliding_window": None,
                    "router_jitter_noise": 0.0, "router_aux_loss_coef": m.moe.load_balance_weight})
    else:
        out.update({"intermediate_size": ffn_hidden(m), "moe_intermediate_size": expert_hidden(m), "num_experts": E,
                    "shared_expert_intermediate_size": residual_hidden(m) if m.moe.residual else 1,
                    "norm_topk_prob": k > 1, "decoder_sparse_step": m.moe.every if moe_ids else 1,
                    "mlp_only_layers": [] if moe_ids else list(range(m.n_layers)), "qkv_bias": True,
                    "use_sliding_window": False, "sliding_window": None, "max_window_layers": m.n_layers,
                    "router_aux_loss_coef": m.moe.load_balance_weight})
    return out


def stock_tensors(m: ModelConfig, t: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Stock tensor names -> tensors, from a private (materialised) model's samoe tensors t."""
    d, f, fd = m.d_model, expert_hidden(m), ffn_hidden(m)
    out = {"model.embed_tokens.weight": t["wte.weight"], "model.norm.weight": t["ln_f.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    moe_ids = moe_layer_ids(m)
    for i in range(m.n_layers):
        p, s = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = t[s + "ln_1.weight"]
        out[p + "post_attention_layernorm.weight"] = t[s + "ln_2.weight"]
        for name, w in zip("qkv", t[s + "attn.qkv.weight"].split(d)):
            out[p + f"self_attn.{name}_proj.weight"] = w
            if fmt == "qwen2_moe":  # Qwen2-MoE has q, k, v biases: zero
                out[p + f"self_attn.{name}_proj.bias"] = w.new_zeros(d)
        out[p + "self_attn.o_proj.weight"] = t[s + "attn.proj.weight"]
        if i not in moe_ids:
            out.update(_ffn(p + "mlp.", t[s + "ffn.fc1.weight"], t[s + "ffn.fc2.weight"], fd))
            continue
        mlp = p + ("block_sparse_moe." if fmt == "mixtral" else "mlp.")
        out[mlp + "gate.weight"] = t[s + "ffn.router.weight"]
        names = ("w1", "w3", "w2") if fmt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        w1, w2 = t[s + "ffn.experts.w1"], t[s + "ffn.experts.w2"]
        for e in range(w1.shape[0]):
            for name, w in zip(names, (w1[e][:, :f].t(), w1[e][:, f:].t(), w2[e].t())):
                out[mlp + f"experts.{e}.{name}.weight"] = w
        if fmt == "qwen2_moe" and m.moe.residual:
            out.update(_ffn(mlp + "shared_expert.", t[s + "ffn.residual.fc1.weight"], t[s + "ffn.residual.fc2.weight"],
                            residual_hidden(m)))
            out[mlp + "shared_expert_gate.weight"] = t[s + "ffn.residual_coef.weight"]
        elif fmt == "qwen2_moe":  # a zero shared expert of width 1: adds σ(0) · 0 = 0
            z = w1.new_zeros
            out.update({mlp + "shared_expert.gate_proj.weight": z(1, d), mlp + "shared_expert.up_proj.weight": z(1, d),
                        mlp + "shared_expert.down_proj.weight": z(d, 1), mlp + "shared_expert_gate.weight": z(1, d)})
    return {name: w.contiguous() for name, w in out.items()}


def _ffn(prefix: str, fc1: Tensor, fc2: Tensor, hidden: int) -> dict[str, Tensor]:
    """A samoe SwiGLU FFN (fc1 [2f, d] = [gate; up], fc2 [d, f]) as gate_proj, up_proj, down_proj."""
    return {prefix + "gate_proj.weight": fc1[:hidden], prefix + "up_proj.weight": fc1[hidden:],
            prefix + "down_proj.weight": fc2}

