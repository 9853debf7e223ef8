"""`samoe plan`: what one rank holds for each way of laying a model out over N GPUs, and whether
it fits, before anything is allocated (the model is built on the meta device).

A layout is (dp = N data-parallel ranks, ep = expert-parallel degree, fsdp on or off). With P_e
the routed experts' parameters (a SaMoE pool or a shared bank included) and P_n the rest, one
rank holds, in bytes:

    weights      4 · (P_e / ep + P_n / s)          fp32 master weights, s = N with fsdp, else 1
    gradients    4 · (P_e / ep + P_n / s)          fp32, sharded as the weights (FSDP reduce-scatters)
    optimiser    8 · (P_e / ep + P_n / s)          AdamW's two fp32 moments
    gathered     b · 2 · P_unit                    with fsdp: the largest FSDP unit (a block, its experts left
                                                   out: ep shards them) all-gathered
                                                   in the compute dtype, twice (the one computing and
                                                   the one prefetched)
    activations  b · T · [L · (10·d + ffn)] + 4 · 2 · T · V        kept for the backward
                 ffn = 2·f + d for a dense block; for an MoE block k·(d + 2·f_e + d) + E (+ 2·f_r + d
                 with a shared expert); T = micro-batch x block size tokens on the rank; V the
                 vocabulary (logits in fp32: 2·V at 4 bytes)

b is 2 for bfloat16 and 4 for float32 compute. The activation term is an estimate, the usual
per-token count of the tensors a transformer block keeps (Korthikanti et al. 2022), without the
attention scores (SDPA's fused kernels keep none) and adapted to top-k experts; the rest is exact
arithmetic on the parameter counts of `samoe params`. A layout fits when its total is at most FIT_SHARE of
the GPU's memory (the rest for the CUDA context, the allocator's fragmentation and NCCL
buffers). Each layout also gets the largest micro-batch (a divisor of the rank's share of the
batch) that fits. The one recommended fits at the configured micro-batch if any does, then has
no FSDP (less communication), then the largest micro-batch, then the smallest ep.

The time the preset's token budget takes is train FLOPs (`samoe flops`) / (N · peak · MFU).
"""

from __future__ import annotations

import torch

from samoe.config import (
    Config,
    expert_hidden,
    experts_per_layer,
    ffn_hidden,
    micro_batch,
    moe_layer_ids,
    residual_hidden,
    router_top_k,
)
from samoe.errors import UserError
from samoe.model.flops import flops_report
from samoe.model.gpt import GPT
from samoe.model.params import component, count_params

FIT_SHARE = 0.9
BYTES = {"float32": 4, "bfloat16": 2}
PEAK_BF16_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16


def parse_memory(text: str) -> float:
    """'80GB', '141GB', '80GiB', '40000MB' -> bytes."""
    units = {"gib": 2 ** 30, "gb": 1e9, "mib": 2 ** 20, "mb": 1e6, "tb": 1e12}
    t = text.strip().lower()
    for unit, size in units.items():
        if t.endswith(unit):
            try:
                return float(t[: -len(unit)]) * size
            except ValueError:
                break
    raise UserError(f"--gpu-mem {text!r} is not a size; expected a number with GB, GiB, MB or TB, such as 80GB")


def expert_split(cfg: Config) -> dict:
    """The model's parameters as expert-parallel (P_e) and the rest (P_n), with the largest
    block's parameters (an FSDP unit), counted on a model built on the meta device."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    counts = count_params(model)
    experts = counts["expert"]
    unit = max((sum(p.numel() for n, p in b.named_parameters() if component(f"blocks.0.{n}") != "expert")
                for b in model.blocks), default=0)  # expert shards stay where ep put them: not gathered
    return {"total": counts["total"], "expert": experts, "rest": counts["total"] - experts, "unit": unit}


def activation_elements(cfg: Config, tokens: int) -> float:
    """Elements kept for the backward by one rank's micro-batch of `tokens` tokens (module docstring)."""
    m, moe = cfg.model, cfg.model.moe
    d = m.d_model
    f = ffn_hidden(m)
    moe_ids, per_token = moe_layer_ids(m), 0.0
    n_exp = experts_per_layer(m) if moe_ids else []
    k = router_top_k(moe)
    f_e = expert_hidden(m)
    for i in range(m.n_layers):
        per_token += 10 * d
        if i in moe_ids:
            E = n_exp[moe_ids.index(i)]
            per_token += k * (2 * d + 2 * f_e) + E
            if moe.residual:
                per_token += 2 * residual_hidden(m) + d
        else:
            per_token += 2 * f + d
    return tokens * per_token


def layouts(cfg: Config, gpus: int, ep: int | None = None, fsdp: bool | None = None) -> list[tuple[int, bool]]:
    """(ep, fsdp) for every layout of `gpus` ranks: ep divides the rank count and every layer's
    expert count; fsdp off and on (or what was asked)."""
    counts = experts_per_layer(cfg.model) if moe_layer_ids(cfg.model) else [1]
    eps = [p for p in range(1, gpus + 1) if gpus % p == 0 and all(e % p == 0 for e in counts)]
    if ep is not None:
        if ep not in eps:
            raise UserError(f"--ep {ep} is invalid for {gpus} GPUs; expected a divisor of the GPU count and of "
                            f"every layer's expert count ({sorted(set(counts))}): one of {eps}")
        eps = [ep]
    return [(p, f) for f in ([fsdp] if fsdp is not None else [False, True]) for p in eps]


def plan(cfg: Config, gpus: int, gpu_mem: float, dtype: str | None = None, ep: int | None = None,
         fsdp: bool | None = None, mfu: float = 0.4, peak_tflops: float = PEAK_BF16_TFLOPS) -> dict:
    """Per-rank memory of every layout (module docstring), which fit, the one recommended, and the
    time of the config's token budget at `mfu` of `peak_tflops` per GPU."""
    if gpus < 1:
        raise UserError(f"--gpus {gpus} is invalid; expected an integer >= 1")
    dtype = dtype or cfg.train.dtype
    b = BYTES[dtype]
    split = expert_split(cfg)
    per_rank = max(1, cfg.train.batch_size // gpus)
    mb = min(micro_batch(cfg.train, gpus), per_rank)

    def activations(sequences: int) -> float:
        tokens = sequences * cfg.model.block_size
        return b * activation_elements(cfg, tokens) + 4 * 2 * tokens * cfg.model.vocab_size

    rows = []
    for p, sharded in layouts(cfg, gpus, ep, fsdp):
        held = split["expert"] / p + split["rest"] / (gpus if sharded else 1)
        row = {"ep": p, "fsdp": sharded, "weights": 4 * held, "gradients": 4 * held, "optimizer": 8 * held,
               "gathered": b * 2 * split["unit"] if sharded else 0.0, "activations": activations(mb)}
        static = sum(row[k] for k in ("weights", "gradients", "optimizer", "gathered"))
        row["total"] = static + row["activations"]
        row["fits"] = row["total"] <= FIT_SHARE * gpu_mem
        # the largest micro-batch (a divisor of the rank's share of the batch) that fits: 0 for none
        row["max_micro_batch"] = max((m for m in range(1, per_rank + 1) if per_rank % m == 0
                                      and static + activations(m) <= FIT_SHARE * gpu_mem), default=0)
        rows.append(row)
    fitting = [r for r in rows if r["max_micro_batch"]]
    best = min(fitting, key=lambda r: (not r["fits"], r["fsdp"], -r["max_micro_batch"], r["ep"])) if fitting else None
    fl = flops_report(cfg)
    seconds = fl["train_flops"] / (gpus * peak_tflops * 1e12 * mfu)
    return {"gpus": gpus, "gpu_mem": gpu_mem, "dtype": dtype, "params": split, "micro_batch": mb,
            "micro_batch_tokens": mb * cfg.model.block_size, "layouts": rows, "recommended": best,
            "fit_share": FIT_SHARE,
            "tokens": fl["tokens"], "train_flops": fl["train_flops"], "mfu": mfu, "peak_tflops": peak_tflops,
            "train_days": seconds / 86400}


def format_plan(report: dict, name: str) -> str:
    gb = 1e9
    p = report["params"]
    lines = [f"{name} on {report['gpus']} GPU(s) of {report['gpu_mem'] / gb:.0f} GB, {report['dtype']} compute, "
             f"fp32 master weights and AdamW state",
             f"parameters: {p['total']:,} ({p['expert']:,} in routed experts, sharded by ep; {p['rest']:,} else, "
             f"sharded by fsdp); micro-batch of {report['micro_batch']} sequences, "
             f"{report['micro_batch_tokens']:,} tokens a rank",
             "",
             "| ep | fsdp | weights GB | grads GB | AdamW GB | gathered GB | activations GB | total GB | fits "
             "| largest micro-batch that fits |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in report["layouts"]:
        sizes = " | ".join(f"{r[k] / gb:.1f}" for k in ("weights", "gradients", "optimizer", "gathered",
                                                             "activations", "total"))
        lines.append(f"| {r['ep']} | {'yes' if r['fsdp'] else 'no'} | {sizes} | {'yes' if r['fits'] else 'no'} "
                     f"| {r['max_micro_batch'] or 'none'} |")
    best = report["recommended"]
    lines += ["", f"fits: a total at most {report['fit_share']:.0%} of a GPU's memory; formulas: "
              "`python -c 'import samoe.analysis.plan as p; help(p)'` or docs/distributed.md"]
    if best is None:
        lines.append("no layout fits at any micro-batch: more GPUs, or bf16 (--dtype bfloat16)")
    elif best["fits"]:
        lines.append(f"recommended: ep {best['ep']}, fsdp {'on' if best['fsdp'] else 'off'} "
                     f"({best['total'] / gb:.1f} GB a rank)")
    else:
        lines.append(f"recommended: ep {best['ep']}, fsdp {'on' if best['fsdp'] else 'off'}, with "
                     f"train.micro_batch_size={best['max_micro_batch']} (the configured micro-batch fits no layout)")
    lines.append(f"training time of {report['tokens']:,} tokens ({report['train_flops']:.3g} FLOPs): "
                 f"{report['train_days']:.1f} days at {report['mfu']:.0%} MFU of {report['peak_tflops']:.0f} "
                 "TFLOP/s a GPU")
    return "\n".join(lines)
