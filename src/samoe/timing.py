"""Timing on a shared, noisy machine: candidates run round-robin so that they share its noise,
each the median of several repeats after warm-up. Used by the benchmarks (samoe.bench) and by a
study's per-second comparison (samoe.study.grid.measure_speed)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


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
