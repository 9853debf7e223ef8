"""A stock Hugging Face Llama-architecture checkpoint on disk as a dense samoe model, for sparse
upcycling (`samoe train --init-from HF_DIR`, train/upcycle.py).

What fits samoe's backbone exactly (model.norm = rmsnorm, positions = rotary, activation =
swiglu, bias = false): LlamaForCausalLM with hidden_act silu, no attention or MLP biases,
plain rotary positions (rope_type default, no rope scaling) and head_dim = hidden_size /
num_attention_heads. Anything else is refused with one line naming the config.json field.

Mapping (nn.Linear weights are [out, in], as samoe's):
    model.embed_tokens -> wte;  lm_head -> lm_head (tied: wte);  model.norm -> ln_f
    layers.i.input_layernorm -> blocks.i.ln_1;  post_attention_layernorm -> blocks.i.ln_2
    q_proj, k_proj, v_proj -> blocks.i.attn.qkv = [q; k; v];  o_proj -> blocks.i.attn.proj
    mlp: [gate_proj; up_proj] -> blocks.i.ffn.fc1 (samoe's SwiGLU: silu(first half) · second half),
         down_proj -> blocks.i.ffn.fc2
Grouped-query attention (num_key_value_heads < num_attention_heads) becomes multi-head
attention: each key/value head is repeated for the query heads that share it (as transformers'
repeat_kv does), which computes the same function; the copies then train apart.

The tokenizer is the checkpoint's tokenizer.json, with its eos token (tokenizer_config.json or
special_tokens_map.json, else config.json / generation_config.json eos_token_id) as samoe's
end-of-text token; its vocabulary must be the model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from torch import Tensor

from samoe.config import ModelConfig
from samoe.config_load import from_dict
from samoe.data.tokenizer import HF_TOKENIZER_CONFIG, TOKENIZER_FILE, BPETokenizer, hf_eos_token
from samoe.errors import UpcycleError

MODEL_TYPES = ("llama",)
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UpcycleError(f"--init-from '{path}' cannot be read as {what}: {e}") from None


def llama_config(path: Path, config: dict) -> ModelConfig:
    """The dense samoe ModelConfig of a Llama config.json; UpcycleError naming the first field
    that does not fit samoe's backbone."""

    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise UpcycleError(f"--init-from '{path}': config.json {field} = {config.get(field)!r} does not fit "
                               f"samoe's backbone; it needs {why}")

    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        need(isinstance(config.get(field), int) and config[field] > 0, field, "a positive integer")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    need(config.get("hidden_act", "silu") == "silu", "hidden_act", "'silu' (SwiGLU FFNs)")
    need(not config.get("attention_bias", False), "attention_bias", "false (no biases)")
    need(not config.get("mlp_bias", False), "mlp_bias", "false (no biases)")
    need(d % heads == 0, "num_attention_heads", f"a divisor of hidden_size {d}")
    need(config.get("head_dim") in (None, d // heads), "head_dim", f"hidden_size / num_attention_heads = {d // heads}")
    need(isinstance(kv, int) and heads % kv == 0, "num_key_value_heads", f"a divisor of num_attention_heads {heads}")
    rope = config.get("rope_parameters") or {}
    need(config.get("rope_scaling") in (None, {}) or config["rope_scaling"].get("rope_type") == "default",
         "rope_scaling", "null (plain rotary positions)")
    need(rope.get("rope_type", "default") == "default", "rope_parameters",
         "rope_type 'default' (plain rotary positions, no scaling)")
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return from_dict({"model": {
        "vocab_size": config["vocab_size"], "block_size": int(config.get("max_position_embeddings") or 2048),
        "n_layers": config["num_hidden_layers"], "n_heads": heads, "d_model": d,
        "ffn_hidden": config["intermediate_size"], "activation": "swiglu", "positions": "rotary",
        "rope_base": float(base), "norm": "rmsnorm", "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "bias": False, "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "moe": {"enabled": False}}}).model


def _safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of model.safetensors, or of the shards a model.safetensors.index.json lists."""
    if (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    elif (path / INDEX).is_file():
        files = [path / f for f in sorted(set(_read_json(path / INDEX, "JSON").get("weight_map", {}).values()))]
    else:
        raise UpcycleError(f"--init-from '{path}' has no {WEIGHTS} (nor {INDEX}); save the checkpoint with "
                           "safetensors (transformers' default)")
    out = {}
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                out.update({k: f.get_tensor(k).float() for k in f.keys()})
    except (OSError, ValueError, RuntimeError) as e:
        raise UpcycleError(f"--init-from '{path}': cannot read its weights ({type(e).__name__}: {e})") from None
    return out


def llama_tensors(path: Path, m: ModelConfig, kv_heads: int) -> dict[str, Tensor]:
    """samoe names -> tensors of the checkpoint's weights (see the module docstring)."""
    t = _safetensors(path)
    heads, hd = m.n_heads, m.d_model // m.n_heads

    def get(name: str) -> Tensor:
        if name not in t:
            raise UpcycleError(f"--init-from '{path}': the checkpoint has no tensor {name!r}")
        return t[name]

    def repeat_kv(w: Tensor) -> Tensor:  # [kv·hd, d] -> [heads·hd, d], head j from kv head j // (heads / kv)
        return w.view(kv_heads, hd, -1).repeat_interleave(heads // kv_heads, dim=0).reshape(heads * hd, -1)

    out = {"wte.weight": get("model.embed_tokens.weight"), "ln_f.weight": get("model.norm.weight")}
    out["lm_head.weight"] = out["wte.weight"] if m.tie_embeddings else get("lm_head.weight")
    for i in range(m.n_layers):
        p, s = f"model.layers.{i}.", f"blocks.{i}."
        out[s + "ln_1.weight"] = get(p + "input_layernorm.weight")
        out[s + "ln_2.weight"] = get(p + "post_attention_layernorm.weight")
        q, k, v = (get(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        out[s + "attn.qkv.weight"] = torch.cat([q, repeat_kv(k), repeat_kv(v)])
        out[s + "attn.proj.weight"] = get(p + "self_attn.o_proj.weight")
        out[s + "ffn.fc1.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        out[s + "ffn.fc2.weight"] = get(p + "mlp.down_proj.weight")
    return out


def _eos_token(path: Path, tk: Tokenizer, config: dict) -> str | None:
    for name in (HF_TOKENIZER_CONFIG, "special_tokens_map.json"):
        eos = hf_eos_token(path / name, tk)
        if eos is not None:
            return eos
    generation = path / "generation_config.json"
    for source in (config, _read_json(generation, "JSON") if generation.is_file() else {}):
        ids = source.get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids]
        if ids and isinstance(ids[0], int) and tk.id_to_token(ids[0]) is not None:
            return tk.id_to_token(ids[0])
    return None


def llama_tokenizer(path: Path, config: dict) -> BPETokenizer:
    if not (path / TOKENIZER_FILE).is_file():
        raise UpcycleError(f"--init-from '{path}' has no {TOKENIZER_FILE}; samoe takes the checkpoint's tokenizer "
                           "from it (save the fast tokenizer with save_pretrained)")
    try:
        tk = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise UpcycleError(f"--init-from '{path / TOKENIZER_FILE}' is not a tokenizers file ({e})") from None
    eos = _eos_token(path, tk, config)
    if eos is None:
        raise UpcycleError(f"--init-from '{path}': no eos token found (eos_token in {HF_TOKENIZER_CONFIG} or "
                           "eos_token_id in config.json); samoe needs one as its end-of-text token")
    tok = BPETokenizer(tk, eos)
    if tok.vocab_size != config["vocab_size"]:
        raise UpcycleError(f"--init-from '{path}': config.json vocab_size = {config['vocab_size']} does not fit its "
                           f"tokenizer's {tok.vocab_size} tokens; samoe's vocabulary is the tokenizer's")
    return tok


def load_llama(path: Path, config: dict) -> tuple[ModelConfig, dict[str, Tensor], BPETokenizer]:
    """(dense samoe config, samoe-named tensors, tokenizer) of a Llama checkpoint directory."""
    m = llama_config(path, config)
    tok = llama_tokenizer(path, config)
    return m, llama_tensors(path, m, config.get("num_key_value_heads") or m.n_heads), tok
