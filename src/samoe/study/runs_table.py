"""RunRecord and Arm: a study's finished runs grouped by arm, and the mean ± sample std over seeds.

mean_std(x) = (mean(x), sqrt(Σ (x_i - mean)^2 / (n - 1))), the std 0 for a single value and both
nan if any value is nan. Shared by samoe.study.report, .headline, .against_dense, .zeroshot and
.diversity.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from samoe.errors import UserError
from samoe.runs import SUMMARY_FILE


def finished_run_dirs(study_dir: str | Path, allow_empty: bool = False) -> list[Path]:
    """Every run directory below study_dir with a summary.json, sorted; a UserError for a
    directory that does not exist, or (unless allow_empty) holds no finished run."""
    root = Path(study_dir)
    if not root.is_dir():
        raise UserError(f"study directory '{root}' does not exist")
    runs = sorted(p.parent for p in root.rglob(SUMMARY_FILE))
    if not runs and not allow_empty:
        raise UserError(f"'{root}' holds no finished runs (no {SUMMARY_FILE} below it)")
    return runs


@dataclass
class RunRecord:
    path: Path
    summary: dict
    curve: list[tuple[int, int, float, float]]  # (step, tokens, seconds, val_loss)
    tokens_per_s: float
    full: dict | None = None  # its whole validation split's evaluation (samoe study eval), if any

    @property
    def seed(self) -> str:
        """The run directory's name: seed{s} in a study."""
        return self.path.name


@dataclass
class Arm:
    name: str
    runs: list[RunRecord] = field(default_factory=list)

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


WHOLE_SPLIT, IN_TRAINING = "whole validation split", "training's last evaluation"


def final_losses(*arms: Arm) -> tuple[list[list[float]], str]:
    """Each arm's final val loss per run, and where it comes from: the whole validation split
    when every run of every given arm has been scored on it (samoe study eval), else training's
    last evaluation, so that compared arms are always measured alike."""
    if all(r.full is not None for a in arms for r in a.runs):
        return [[r.full["val_loss"] for r in a.runs] for a in arms], WHOLE_SPLIT
    return [[r.summary["val_loss"] for r in a.runs] for a in arms], IN_TRAINING


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; nan if any value is nan)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def base_name(arm: str) -> str:
    """The arm's own name, without its corpus."""
    return arm.rsplit("/", 1)[-1]


def by_corpus(arms: list[Arm]) -> dict[str | None, dict[str, Arm]]:
    """The arms of each corpus (None in a study without corpora), by their own names."""
    groups: dict[str | None, dict[str, Arm]] = {}
    for a in arms:
        groups.setdefault(corpus_of(a.name), {})[base_name(a.name)] = a
    return groups


def corpus_of(arm: str) -> str | None:
    """The arm's corpus (None in a study without corpora)."""
    return arm.rsplit("/", 1)[0] if "/" in arm else None
