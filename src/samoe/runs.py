"""A run directory's file names and readers, below train, eval, analysis and study.

    run_dir/config.yaml        resolved config (vocab size set from the tokenizer, data path absolute)
    run_dir/tokenizer.json     the tokenizer trained on the training split
    run_dir/metrics.jsonl      one JSON object per logged step (val_* on evaluation steps)
    run_dir/checkpoints/       see train/checkpoint.py
    run_dir/summary.json       parameter counts, tokens, training FLOPs and PF-days, wall time, final
                               validation metrics
"""

from __future__ import annotations

import json
from pathlib import Path

from samoe.errors import CheckpointError

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"


def read_json(path: str | Path) -> dict:
    """A JSON file of a run directory; CheckpointError naming it when missing or damaged."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"'{path}' does not exist") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' cannot be read as JSON: {e}") from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (one per logged step), in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' has no {METRICS_FILE}: not a samoe run directory")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
