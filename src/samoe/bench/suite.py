"""`samoe bench`: the MoE speed and memory suite, written to docs/benchmarks.md (and JSON).

Every figure is a ratio against a baseline measured in the same run (interleaved medians of
several repeats after warm-up); the seconds beside them only say what was compared.

    (a) MoE layer fwd+bwd vs a dense FFN of the same width, top-1 dropless, E = 16 and 64,
        at T = 2048 tokens (what the default preset's layers see per step)
    (b) SaMoE layer (K = 2) vs the standard MoE layer at the same E
    (c) our layer vs peer implementations (hf_switch, hf_mixtral, deepspeed) when installed,
        each side also against the dense FFN of our layer's shape
    (d) training tokens/s of the tiny and default presets: SaMoE vs MoE vs dense (default also at
        one thread, as studies run two training processes of one thread each), steps in a row
    (e) peak memory of a training step, SaMoE vs MoE (12 layers, MoE every other, E = 16, K = 2)
    (f) how (a) and (b) change with T and E
    (g) data: near-dedup and tokenisation throughput; training memory as the dataset grows
    (h) training shapes: T = 2048 and 4096, E = 8, 16, 64 top-1 and fine-grained top-2 and
        top-4, each beside the floor its GEMM shapes set and the bound memory traffic sets
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from samoe.bench.data import dedup_throughput, tokenize_throughput, training_rss
from samoe.bench.layers import Shape, layer_ratios, scaling_table, training_shapes
from samoe.bench.timing import memory_bandwidth, run_isolated
from samoe.bench.training import MEMORY_BATCHES, peak_memory, training_throughput
from samoe.fileio import write_text_atomic

# (key, what, target): lower is better for the first five, higher for the throughput ratios
HEADLINE = [
    ("moe_vs_dense_e16", "(a) MoE top-1 (dropless) layer time / dense FFN, E = 16", "≤ 1.15x"),
    ("moe_vs_dense_e64", "(a) MoE top-1 (dropless) layer time / dense FFN, E = 64", "≤ 1.6x"),
    ("samoe_vs_moe", "(b) SaMoE (K = 2) layer time / MoE layer, E = 16", "≤ 1.10x"),
    *((f"samoe_vs_moe_peak_mem_b{b}", f"(e) SaMoE / MoE training-step peak memory, {b}×512 tokens", "< 0.70x")
      for b in MEMORY_BATCHES),
    *((f"{p}_{v}_vs_dense_tokens_per_s", f"(d) training tokens/s, {name} / dense, {label}", target)
      for p, label, target in (("tiny", "tiny", "≥ 0.70x"), ("default", "default", "≥ 0.85x"),
                               ("default_1t", "default at 1 thread (as studies run)", "≥ 0.85x"))
      for v, name in (("moe", "MoE"), ("samoe", "SaMoE"))),
]
TARGETS = {key for key, _, _ in HEADLINE} | {"samoe_vs_moe_peak_mem"}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def conditions() -> str:
    """What else the numbers depend on: the peers' versions and how busy the machine was (the
    1-minute load average; above 0.5 on an idle start, something else was running)."""
    versions = []
    for name in ("transformers", "deepspeed"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    return f"load average {os.getloadavg()[0]:.2f} at the start; " + ", ".join(versions)


def run_suite(quick: bool, repeats: int) -> dict:
    said = conditions()  # before this suite adds to the load
    shape = Shape(2048)
    bandwidth = memory_bandwidth()
    steps = [
        ("(a, b) layers", lambda: layer_ratios(shape, repeats=repeats)),
        ("(c) peers", lambda: run_isolated("samoe.bench.peers", str(shape.tokens), str(shape.d_model),
                                           str(shape.hidden), "16", str(repeats))),
        ("(d) training", lambda: {**training_throughput("tiny", repeats), **training_throughput("default", repeats),
                                  **training_throughput("default", repeats, threads=1)}),
        ("(e) memory", peak_memory),
        ("(f) scaling", lambda: {"scaling": scaling_table(
            shape.d_model, shape.hidden, (1024, 4096) if quick else (2048, 8192, 32768),
            (4, 16) if quick else (4, 16, 64), repeats)}),
        ("(g) data", lambda: {**dedup_throughput(20_000 if quick else 100_000),
                              **tokenize_throughput(4_000 if quick else 20_000),
                              **({} if quick else training_rss())}),
        ("(h) training shapes", lambda: {"training_shapes": training_shapes(
            shape, (2048,) if quick else (2048, 4096), bandwidth, repeats)}),
    ]
    results: dict = {"machine": machine(), "conditions": said, "quick": quick, "tokens": shape.tokens,
                     "repeats": repeats, "bandwidth_gb_per_s": bandwidth / 1e9}
    for _name, fn in tqdm(steps, desc="bench", unit="part"):
        results.update(fn())
    return results


def markdown(r: dict, command: str) -> str:
    def fmt(key):
        return f"{r[key]:.2f}x" if key in r else "n/a"

    lines = [
        "# Benchmarks", "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M')}; machine: {r['machine']}; "
        f"{r.get('conditions', 'conditions not recorded')}.",
        "Each ratio is the median of interleaved repeats after warm-up, against a baseline measured in the same",
        f"run; lower is better for ours. Layer shapes: T = {r['tokens']}, d = 256, f = 1024, fp32, forward + backward.",
        "", "| what | ratio | target |", "| --- | --- | --- |",
        *(f"| {what} | {fmt(key)} | {target} |" for key, what, target in HEADLINE),
    ]
    peers = sorted(k[5:-8] for k in r if k.startswith("peer_") and k.endswith("_vs_ours"))
    for name in peers:
        lines.append(f"| (c) {name} time / ours | {r[f'peer_{name}_vs_ours']:.2f}x | ≥ 1.3x |")
    for name, reason in r.get("skipped", {}).items():
        lines.append(f"| (c) {name} | skipped: {reason} | |")
    against_dense = [f"{name} {r[f'{name}_vs_dense']:.2f}x and ours {r[f'ours_for_{name}_vs_dense']:.2f}x"
                     for name in peers if f"{name}_vs_dense" in r]
    if against_dense:
        lines += ["", "(c) Each side's time over the dense FFN of its shape, in the same round-robin: "
                  + "; ".join(against_dense) + "."]
    lines += ["", "(d) Training throughput (tokens/s of optimiser steps on random tokens, timed in samples of "
              "about 50 ms of steps in a row, as training runs them):", "",
              "| preset | SaMoE | MoE | dense |", "| --- | --- | --- | --- |"]
    for preset, label in (("tiny", "tiny"), ("default", "default"), ("default_1t", "default, 1 thread")):
        if f"{preset}_moe_tokens_per_s" in r:
            lines.append(f"| {label} | " + " | ".join(f"{r[f'{preset}_{v}_tokens_per_s']:,.0f}"
                                                    for v in ("samoe", "moe", "dense")) + " |")
    lines += ["", "(h) Training shapes: one MoE layer, forward + backward, d = 256, dense FFN f = 1024; E experts of "
              "width f / k with top-k, so every row costs the dense FFN's FLOPs per token. *GEMM floor*: the "
              "layer's six GEMMs alone on equal shares of the rows, over the dense FFN's six: what the shapes "
              "cost on this machine before any routing, with a GEMM per expert; *batched floor*: the same six as one "
              "batched GEMM each over all experts, what the padded layout (moe/grouped.py) approaches when the "
              "counts are near-equal. *Traffic bound*: what streaming the expert weights "
              f"(read in forward and backward, gradient written) at the measured {r['bandwidth_gb_per_s']:.1f} GB/s "
              "(large copy) adds to the dense time; for SaMoE, its 13 extra passes over the layer's expert-sized "
              "weights (moe/grouped.py) added to the MoE time.", "",
              "| T | E | top-k | expert width | dense (ms) | MoE / dense | GEMM floor | batched floor | traffic bound "
              "| SaMoE / MoE | SaMoE traffic bound |", "|" + " --- |" * 11]
    for row in r.get("training_shapes", []):
        lines.append(f"| {row['tokens']} | {row['experts']} | {row['top_k']} | {row['expert_hidden']} | "
                     f"{row['dense_ms']:.1f} | {row['moe_vs_dense']:.2f}x | {row['gemm_floor']:.2f}x | "
                     f"{row.get('bmm_floor', float('nan')):.2f}x | "
                     f"{row['traffic_bound']:.2f}x | {row['samoe_vs_moe']:.2f}x | {row['samoe_traffic_bound']:.2f}x |")
    lines += ["", "(e) Peak RSS growth over two training steps (12 layers, MoE every other, E = 16, K = 2, "
              "d = 256):", ""]
    lines += [f"- {b}×512 tokens: SaMoE {r[f'samoe_step_peak_mib_b{b}']:.0f} MiB, "
              f"MoE {r[f'moe_step_peak_mib_b{b}']:.0f} MiB" for b in MEMORY_BATCHES if f"moe_step_peak_mib_b{b}" in r]
    lines += ["",
              "(f) Scaling with tokens T and experts E:", "",
              "| T | E | dense fwd+bwd (ms) | MoE / dense | SaMoE / MoE |", "| --- | --- | --- | --- | --- |"]
    for row in r.get("scaling", []):
        lines.append(f"| {row['tokens']} | {row['experts']} | {row['dense_ms']:.1f} | {row['moe_vs_dense']:.2f}x | "
                     f"{row['samoe_vs_moe']:.2f}x |")
    if "near_dedup_docs_per_s" in r:
        lines += ["", "(g) Data pipeline:", "",
                  f"- de-duplication of {r['dedup_docs']:,} documents of 40 words (10% planted near copies): "
                  f"near (MinHash LSH) {r['near_dedup_docs_per_s']:,.0f} docs/s = "
                  f"{r['near_dedup_docs_per_s'] / r['exact_dedup_docs_per_s']:.3f}x exact dedup "
                  f"({r['exact_dedup_docs_per_s']:,.0f} docs/s); removed {r['near_dedup_removed']:,} of "
                  f"{r['near_dedup_planted']:,} planted",
                  f"- tokenisation of {r['tokenize_docs']:,} documents of 200 words: BPE-2048 "
                  f"{r['bpe2048_tokens_per_s']:,.0f} tokens/s = "
                  f"{r['bpe2048_tokens_per_s'] / r['byte_tokens_per_s']:.3f}x the byte tokenizer "
                  f"({r['byte_tokens_per_s']:,.0f} tokens/s)"]
    if "rss_prepared_x1_mib" in r:
        lines.append("- peak RSS of 30 tiny training steps, prepared (memory-mapped) dataset vs the same text read "
                     "into memory: " + "; ".join(
                         f"{r[f'text_x{s}_mb']:.1f} MB of text: {r[f'rss_prepared_x{s}_mib']} MiB vs "
                         f"{r[f'rss_text_x{s}_mib']} MiB" for s in (1, 10)))
    return "\n".join(lines) + "\n"


def main(quick: bool, repeats: int, json_path: str | None, doc_path: str | None, command: str) -> tuple[dict, str]:
    """Run the suite; (results, the Markdown report), the report also written to doc_path when given."""
    results = run_suite(quick, repeats)
    report = markdown(results, command)
    if doc_path:
        write_text_atomic(Path(doc_path), report)
    if json_path:
        ratios = {k: v for k, v in results.items() if k in TARGETS or k.startswith("peer_") or k.endswith("_vs_dense")}
        ratios["training_shapes"] = results["training_shapes"]
        write_text_atomic(Path(json_path), json.dumps(ratios, indent=2) + "\n")
    return results, report
