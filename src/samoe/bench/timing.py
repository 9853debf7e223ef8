"""Timing and peak-memory measurement for the benchmark suite.

Machines here are shared and noisy, so every number is a ratio against a baseline measured
in the same run, with the candidates interleaved repeat by repeat (noise hits both alike),
each the median of several repeats after warm-up (samoe.timing.interleaved_medians).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch

from samoe.timing import interleaved_medians


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
