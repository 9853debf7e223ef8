"""`samoe export RUN_DIR --out DIR`: a run's latest checkpoint as a Hugging Face model directory.

Formats:
    samoe-hf   config.json (auto_map to the remote code), configuration_samoe.py and
               modeling_samoe.py (written by samoe, self-contained), model.safetensors with
               samoe's tensor names under `model.` (a SaMoE pool stays a pool unless
               --materialize), tokenizer files, generation_config.json. Every model samoe
               trains loads with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
    mixtral    stock MixtralForCausalLM, no remote code; models that fit (hf/stock.py)
    qwen2_moe  stock Qwen2MoeForCausalLM, no remote code; models that fit (hf/stock.py)

Exports route as samoe evaluates: dropless (no capacity), no jitter, no random routing.
Everything is checked before anything is written; the directory is assembled under a
temporary name beside DIR and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from samoe.checkpoint import latest_checkpoint, load_checkpoint
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
from samoe.config_load import load_config
from samoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from samoe.errors import ExportError
from samoe.hf.stock import FORMATS as STOCK_FORMATS
from samoe.hf.stock import backbone_keys, check_fits, stock_config, stock_tensors
from samoe.hf.tensors import materialized, model_tensors
from samoe.hf.tokenizer import tokenizer_files
from samoe.model.gpt import GPT
from samoe.runs import CONFIG_FILE

FORMATS = ("samoe-hf", *STOCK_FORMATS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REMOTE_CODE = Path(__file__).parent / "remote_code"
REMOTE_FILES = ("configuration_samoe.py", "modeling_samoe.py")
WEIGHTS = "model.safetensors"


def samoe_hf_config(m: ModelConfig, eot_id: int, dtype: str) -> dict:
    """config.json of the samoe-hf format: the model config with derived values resolved."""
    moe_ids = moe_layer_ids(m)
    samoe = dataclasses.asdict(m)
    samoe.update(ffn_hidden=ffn_hidden(m), expert_hidden=expert_hidden(m), moe_layers=moe_ids,
                 experts_per_layer=experts_per_layer(m) if moe_ids else [])
    samoe["moe"]["top_k"] = router_top_k(m.moe)
    samoe["moe"]["residual_hidden"] = residual_hidden(m)
    return {
        "architectures": ["SamoeForCausalLM"],
        "model_type": "samoe",
        "auto_map": {"AutoConfig": "configuration_samoe.SamoeConfig",
                     "AutoModelForCausalLM": "modeling_samoe.SamoeForCausalLM"},
        "samoe": samoe,
        **backbone_keys(m),
        # expert choice is not causal: every step re-reads the whole text, so no KV cache
        "use_cache": not moe_ids or ROUTER_KINDS[m.moe.router].causal,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "torch_dtype": dtype,
    }


def check_run_dir(run_dir: Path) -> None:
    if not (run_dir / CONFIG_FILE).is_file():
        raise ExportError(f"'{run_dir}' is not a samoe run directory (no {CONFIG_FILE})")


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out '{out}' already exists and is not an empty directory")


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "samoe-hf", materialize: bool = False,
               dtype: str = "float32") -> Path:
    """Write the export of run_dir's latest checkpoint to out; return out."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is invalid; expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is invalid; expected one of {', '.join(DTYPES)}")
    check_run_dir(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE)
    for name, on in (("model.moe.norm_router", cfg.model.moe.norm_router),
                     ("model.moe.pool.depth_embedding", cfg.model.moe.pool.depth_embedding)):
        if on:
            raise ExportError(f"run '{run_dir}' has {name} = true, which no export format computes yet; "
                              "expected a run without it")
    if fmt in STOCK_FORMATS:
        check_fits(cfg.model, fmt)
    check_out_dir(out)
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    model = GPT(cfg.model)
    load_checkpoint(latest_checkpoint(run_dir), model)
    model.eval()
    if materialize or fmt in STOCK_FORMATS:
        m, tensors = materialized(model)
    else:
        m, tensors = cfg.model, model_tensors(model)
    if fmt in STOCK_FORMATS:
        config, tensors = stock_config(m, fmt, tok.eot_id, dtype), stock_tensors(m, tensors, fmt)
    else:
        config = samoe_hf_config(m, tok.eot_id, dtype)
        tensors = {(n if n == "lm_head.weight" else "model." + n): t for n, t in tensors.items()}
    tensors = {n: (t.to(DTYPES[dtype]) if t.is_floating_point() else t).contiguous().clone()
               for n, t in tensors.items()}
    generation = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id,
                  "use_cache": config["use_cache"]}
    files = {"config.json": json.dumps(config, indent=2) + "\n",
             "generation_config.json": json.dumps(generation, indent=2) + "\n",
             **tokenizer_files(tok, m.block_size)}
    if fmt == "samoe-hf":
        files.update({name: (REMOTE_CODE / name).read_text(encoding="utf-8") for name in REMOTE_FILES})
    _write_dir(out, files, tensors)
    return out


def _write_dir(out: Path, files: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Assemble the directory under a temporary name beside out, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o755)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.is_dir():  # an empty directory (checked before)
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
