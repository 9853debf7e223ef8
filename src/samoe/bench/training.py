"""Whole-model benchmarks: (d) training tokens/s of a preset as SaMoE, standard MoE and dense;
(e) peak memory of a training step, SaMoE vs MoE (each in its own process)."""

from __future__ import annotations

import torch

from samoe.bench.timing import run_isolated
from samoe.config_load import load_config
from samoe.timing import interleaved_medians
from samoe.train.synthetic import synthetic_step

VARIANTS = {"samoe": ["model.moe.sharing=pool"], "moe": ["model.moe.sharing=private"],
            "dense": ["model.moe.enabled=false"]}


def training_throughput(preset: str, repeats: int = 5, threads: int | None = None) -> dict[str, float]:
    """Tokens per second of one training step for each variant of the preset, at `threads`
    intra-op threads (default: as set). Keys start with "<preset>_", or with "<preset>_<threads>t_"
    when `threads` is given."""
    cfgs = {name: load_config(preset=preset, overrides=o) for name, o in VARIANTS.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        # steps in a row, as training runs them (a sample of about 50 ms: one step of `default`, 4-6 of
        # `tiny`, whose lone steps measured each variant in the caches the others left)
        t = interleaved_medians({name: synthetic_step(cfg) for name, cfg in cfgs.items()}, repeats, sample_s=0.05)
    finally:
        torch.set_num_threads(before)
    key = preset if threads is None else f"{preset}_{threads}t"
    tokens = cfgs["moe"].train.batch_size * cfgs["moe"].model.block_size
    out = {f"{key}_{name}_tokens_per_s": tokens / s for name, s in t.items()}
    for name in ("moe", "samoe"):
        out[f"{key}_{name}_vs_dense_tokens_per_s"] = t["dense"] / t[name]
    return out


MEMORY_SHAPE = ["model.n_layers=12", "model.moe.every=2", "model.moe.num_experts=16", "model.moe.pool.size=2",
                "model.d_model=256", "model.n_heads=4", "model.ffn_hidden=1024", "model.block_size=512",
                "model.vocab_size=2048"]
# glibc returns every large freed block at once, so RSS follows the live tensors (samoe's verbs keep
# freed memory for speed, samoe.malloc, which would make the peak the heap's high-water mark instead)
RSS_TRACKS_LIVE = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MEMORY_BATCHES = (1, 4)  # sequences of 512 tokens: activations grow with the batch, weights do not


def peak_memory() -> dict[str, float]:
    """Peak RSS growth of two training steps (so the optimiser state exists), SaMoE vs MoE,
    for each batch in MEMORY_BATCHES; the headline ratio is the smallest batch's."""
    out: dict[str, float] = {}
    for b in MEMORY_BATCHES:
        res = {name: run_isolated("samoe.bench.memory", name, str(b), env=RSS_TRACKS_LIVE)["peak_mib"]
               for name in ("samoe", "moe")}
        out[f"samoe_step_peak_mib_b{b}"], out[f"moe_step_peak_mib_b{b}"] = res["samoe"], res["moe"]
        out[f"samoe_vs_moe_peak_mem_b{b}"] = res["samoe"] / res["moe"]
    out["samoe_vs_moe_peak_mem"] = out[f"samoe_vs_moe_peak_mem_b{MEMORY_BATCHES[0]}"]
    return out
