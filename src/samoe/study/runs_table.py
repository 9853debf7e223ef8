"""Run and Arm: a study's finished runs grouped by arm, and the mean ± sample std over seeds.

mean_std(x) = (mean(x), sqrt(Σ (x_i - mean)^2 / (n - 1))), the std 0 for a single value and both
nan if any value is nan. Shared by samoe.study.report, .zeroshot and .diversity.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    path: Path
    summary: dict
    curve: list[tuple[int, int, float, float]]  # (step, tokens, seconds, val_loss)
    tokens_per_s: float


@dataclass
class Arm:
    name: str
    runs: list[Run] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float]:
        return mean_std([r.summary[key] for r in self.runs])

    @property
    def params(self) -> dict:
        return self.runs[0].summary["params"]

    def curve(self) -> list[tuple[int, float, float, float, float]]:
        """(tokens, mean seconds, mean val loss, std, n) at the steps every seed evaluated."""
        steps = set.intersection(*({c[0] for c in r.curve} for r in self.runs))
        out = []
        for s in sorted(steps):
            rows = [next(c for c in r.curve if c[0] == s) for r in self.runs]
            m, sd = mean_std([c[3] for c in rows])
            out.append((rows[0][1], statistics.mean(c[2] for c in rows), m, sd, len(rows)))
        return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; nan if any value is nan)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def base_name(arm: str) -> str:
    """The arm's own name, without its corpus."""
    return arm.rsplit("/", 1)[-1]


def corpus_of(arm: str) -> str | None:
    """The arm's corpus (None in a study without corpora)."""
    return arm.rsplit("/", 1)[0] if "/" in arm else None
