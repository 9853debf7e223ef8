"""Timing and peak-memory measurement for the benchmark suite.

Machines here are shared and noisy, so every number is a ratio against a baseline measured
in the same run, with the candidates interleaved repeat by repeat (noise hits both alike),
each the median of several repeats after warm-up.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 2,
                        sample_s: float | None = None) -> dict[str, float]:
    """Median seconds per call of each case, cases run round-robin so they share the noise.

    With `sample_s`, a sample of a case is n calls in a row, n set from its last warm-up call so
    that a sample takes about sample_s, and its time is divided by n. A lone short call timed
    between the other cases measures the caches they left, where training runs its steps one
    after another (docs/fast-moe.md, "Bench part (d)")."""
    if sample_s is not None and warmup < 1:
        raise ValueError("sample_s needs a warm-up call to size the samples")
    times: dict[str, list[float]] = {name: [] for name in cases}
    calls = dict.fromkeys(cases, 1)
    for i in range(warmup + repeats):
        for name, fn in cases.items():
            n = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            seconds = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(seconds / n)
            elif i == warmup - 1 and sample_s is not None:
                calls[name] = max(1, round(sample_s / max(seconds, 1e-9)))
    return {name: statistics.median(ts) for name, ts in times.items()}


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted), median of the repeats:
    the rate at which weights that do not fit in cache can be streamed."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy": lambda: dst.copy_(src)}, repeats)["copy"]
    return 2 * src.numel() * 4 / t


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB: VmHWM, which a new program image
    starts afresh (ru_maxrss would carry the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(module: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None) -> dict:
    """Run `python -m module args...` in a fresh process (its own peak RSS, its own imports),
    with `env` added to this environment, and return the JSON object it prints on its last line."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
