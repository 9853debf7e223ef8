"""Sparse upcycling: start an MoE (or SaMoE) run from a trained dense model.

The source is a dense samoe run directory (its latest checkpoint and tokenizer), a samoe-hf
export of one (`samoe export`), or a stock Hugging Face Llama-architecture checkpoint on disk
(hf/llama.py maps its weights to samoe's names and takes its tokenizer, eos as end of text).
The new model takes the source's tokenizer and every tensor the two share by name
(embeddings, attention, norms, the dense FFN blocks that stay dense); each MoE layer at
block i starts from block i's dense FFN (fc1: W [h, d], b; fc2):

    private experts   W1[e] = fc1.Wᵀ + σ·std(fc1.W)·ε_e,   W2[e] = fc2.Wᵀ + σ·std(fc2.W)·ε_e
                      b1[e] = fc1.b, b2[e] = fc2.b                    (ε_e ~ N(0, 1), σ = noise)
    SaMoE pool        P[k, e] from the dense FFN of MoE layer ceil(k · L_moe / K), the first
                      layer the "sequence" order gives entry k (so K = L_moe with sequence
                      one-hot coefficients is each layer's own FFN)
    shared bank       expert m from the dense FFN of MoE layer m mod L_moe
    PR-MoE branch     the dense FFN itself

Routers, SaMoE coefficients and the PR-MoE mixing weights start fresh. With σ = 0, private
experts, and gates that sum to 1 (top-k with k > 1, hash, PR-MoE softmax mixing) every MoE
layer computes Σ_j g_j · FFN(x) = FFN(x): the first forward equals the dense model's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from samoe.checkpoint import latest_checkpoint, load_checkpoint
from samoe.config import ModelConfig, expert_hidden, ffn_hidden, moe_layer_ids, residual_hidden
from samoe.config_load import from_dict, load_config
from samoe.data.tokenizer import TOKENIZER_FILE, ByteTokenizer, load_tokenizer
from samoe.errors import UpcycleError
from samoe.hf.llama import MODEL_TYPES as HF_MODEL_TYPES
from samoe.hf.llama import load_llama
from samoe.model.gpt import GPT
from samoe.runs import CONFIG_FILE

FRESH = (".router.", ".coef_logits", ".residual_coef.")  # tensors an upcycled model does not take over
BACKBONE = ("block_size", "n_layers", "n_heads", "d_model", "activation", "positions", "rope_base", "norm",
            "norm_eps", "bias", "tie_embeddings")


@dataclass
class DenseSource:
    path: Path
    cfg: ModelConfig
    tensors: dict[str, Tensor]  # samoe names, tied weights under both names
    tokenizer: object
    max_block_size: int | None = None  # rotary HF checkpoints: any model.block_size up to this fits


def load_dense_source(path: str | Path) -> DenseSource:
    """A dense run directory, samoe-hf export or Llama-architecture Hugging Face checkpoint;
    UpcycleError when it is none of these, not dense, or (Llama) does not fit the backbone."""
    path = Path(path)
    max_block = None
    if (path / CONFIG_FILE).is_file():
        cfg = load_config(path / CONFIG_FILE)
        model = GPT(cfg.model)
        load_checkpoint(latest_checkpoint(path), model)
        tensors, m, tok = dict(model.state_dict()), cfg.model, load_tokenizer(path / TOKENIZER_FILE)
    elif (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UpcycleError(f"--init-from '{path / 'config.json'}' cannot be read as JSON: {e}") from None
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type == "samoe":
            m, tensors, tok = _load_samoe_hf(path, config)
        elif model_type in HF_MODEL_TYPES:
            m, tensors, tok = load_llama(path, config)
            max_block = m.block_size  # rotary: no position table, the run chooses its context
        else:
            raise UpcycleError(f"--init-from '{path}': model_type {model_type!r} is not supported; expected a samoe "
                               f"run directory, a samoe-hf export (model_type 'samoe') or a Hugging Face checkpoint "
                               f"of model_type {', '.join(map(repr, HF_MODEL_TYPES))}")
    else:
        raise UpcycleError(f"--init-from '{path}' is neither a samoe run directory ({CONFIG_FILE}) nor a "
                           "Hugging Face model directory (config.json)")
    if moe_layer_ids(m):
        raise UpcycleError(f"--init-from '{path}' is an MoE model (model.moe.enabled = true); upcycling starts "
                           "from a dense one")
    return DenseSource(path, m, tensors, tok, max_block)


def _load_samoe_hf(path: Path, config: dict) -> tuple[ModelConfig, dict[str, Tensor], object]:
    samoe = {k: v for k, v in config["samoe"].items() if k not in ("expert_hidden", "moe_layers", "experts_per_layer")}
    samoe["moe"] = {k: v for k, v in samoe["moe"].items() if k != "top_k"}
    m = from_dict({"model": samoe}).model
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {k.removeprefix("model."): f.get_tensor(k).float() for k in f.keys()}
    if m.tie_embeddings:
        tensors["lm_head.weight"] = tensors["wte.weight"]
    byte = m.vocab_size == ByteTokenizer.vocab_size and '"merges": []' in (path / "tokenizer.json").read_text()
    tok = ByteTokenizer() if byte else load_tokenizer(path / "tokenizer.json")
    return m, tensors, tok


def check_fits(target: ModelConfig, src: DenseSource) -> None:
    """UpcycleError naming the first backbone field where target and source differ."""
    for name in BACKBONE:
        a, b = getattr(target, name), getattr(src.cfg, name)
        if name == "block_size" and src.max_block_size is not None:
            if a > src.max_block_size:
                raise UpcycleError(f"--init-from '{src.path}': model.block_size = {a} is longer than the source's "
                                   f"max_position_embeddings {src.max_block_size}")
        elif a != b:
            raise UpcycleError(f"--init-from '{src.path}': model.{name} = {a!r} does not fit the source's {b!r}")
    if ffn_hidden(target) != ffn_hidden(src.cfg):
        raise UpcycleError(f"--init-from '{src.path}': model.ffn_hidden = {ffn_hidden(target)} does not fit the "
                           f"source's {ffn_hidden(src.cfg)}")
    if moe_layer_ids(target) and expert_hidden(target) != ffn_hidden(src.cfg):
        raise UpcycleError(f"--init-from '{src.path}': model.moe.ffn_hidden = {expert_hidden(target)} does not fit "
                           f"the source's FFN width {ffn_hidden(src.cfg)} (experts start as the dense FFN)")
    if moe_layer_ids(target) and target.moe.residual and residual_hidden(target) != ffn_hidden(src.cfg):
        raise UpcycleError(f"--init-from '{src.path}': model.moe.residual_hidden = {residual_hidden(target)} does "
                           f"not fit the source's FFN width {ffn_hidden(src.cfg)} (the dense branch starts as the "
                           "dense FFN)")


def upcycled_tensors(model: GPT, src: DenseSource, noise: float = 0.0, seed: int = 0) -> dict[str, Tensor]:
    """The new model's tensors by name (all but the fresh ones), built from the dense source."""
    cfg, t = model.cfg, src.tensors
    gen = torch.Generator().manual_seed(seed)
    moe_ids = moe_layer_ids(cfg)
    out: dict[str, Tensor] = {}

    def ffn(i: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Block i's dense FFN as expert tensors W1 [d, h], b1, W2 [f, d], b2."""
        p = f"blocks.{i}.ffn."
        return t[p + "fc1.weight"].t(), t.get(p + "fc1.bias"), t[p + "fc2.weight"].t(), t.get(p + "fc2.bias")

    def stack(sources: list[int]) -> dict[str, Tensor]:
        """Expert stacks [E, ...] with expert e copied from the dense FFN of block sources[e]."""
        parts = {"w1": [], "b1": [], "w2": [], "b2": []}
        for i in sources:
            w1, b1, w2, b2 = ffn(i)
            for name, w in (("w1", w1), ("w2", w2)):
                parts[name].append(w + noise * w.std() * torch.randn(w.shape, generator=gen) if noise else w)
            parts["b1"].append(b1)
            parts["b2"].append(b2)
        return {n: torch.stack(v) for n, v in parts.items() if v and v[0] is not None}

    for name in model.state_dict():
        fresh_or_expert = any(f in name for f in FRESH) or ".ffn.experts." in name
        if fresh_or_expert or name.startswith(("expert_pool.", "expert_bank.")):
            continue
        source = name.replace(".ffn.residual.", ".ffn.") if ".ffn.residual." in name else name
        if source not in t:
            raise UpcycleError(f"--init-from '{src.path}': the source has no tensor {source!r} for {name!r}")
        out[name] = t[source]
    L = len(moe_ids)
    for i in moe_ids:
        if cfg.moe.sharing == "private":
            E = model.blocks[i].ffn.router.num_experts
            out.update({f"blocks.{i}.ffn.experts.{n}": w for n, w in stack([i] * E).items()})
    if model.expert_pool is not None:
        K, E = model.expert_pool.w1.shape[:2]
        entries = [stack([moe_ids[math.ceil(k * L / K)]] * E) for k in range(K)]
        out.update({f"expert_pool.{n}": torch.stack([e[n] for e in entries]) for n in entries[0]})
    if model.expert_bank is not None:
        M = model.expert_bank.w1.shape[0]
        out.update({f"expert_bank.{n}": w for n, w in stack([moe_ids[m % L] for m in range(M)]).items()})
    return out


@torch.no_grad()
def upcycle(model: GPT, src: DenseSource, noise: float = 0.0, seed: int = 0) -> None:
    """Copy the upcycled tensors into the whole model (in place; before parallelize shards it).
    UpcycleError on a shape that does not fit."""
    check_fits(model.cfg, src)
    own = model.state_dict()
    for name, tensor in upcycled_tensors(model, src, noise, seed).items():
        if tensor.shape != own[name].shape:
            raise UpcycleError(f"--init-from '{src.path}': {name} has shape {list(tensor.shape)} in the source, "
                               f"the new model {list(own[name].shape)}")
        own[name].copy_(tensor)
