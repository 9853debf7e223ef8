"""`samoe study eval DIR`: every finished run of a study scored on its whole validation split.

Training's own evaluations score a sample (`train.eval_tokens`, 65,536 tokens spread over the
split for the presets), which is enough to draw curves but adds its own noise to a comparison of
arms whose seeds differ by a few hundredths of a nat. Each finished run (one with a summary.json)
gets RUN/eval-full.json: `samoe eval RUN --max-tokens 0 --json` (dropless, every token of the
split once), plus the step it scored, written atomically. Runs that already have one for their
last step are skipped, so the verb resumes where it stopped. `samoe study report` compares arms
on these numbers wherever every run of the compared arms has one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from samoe.eval.run import evaluate_run
from samoe.fileio import write_text_atomic
from samoe.runs import SUMMARY_FILE, read_json
from samoe.study.runs_table import finished_run_dirs

FULL_EVAL_FILE = "eval-full.json"


def full_eval(run_dir: Path, steps: int) -> dict | None:
    """The run's whole-split evaluation, or None when it has none for its last step, `steps`
    (files written before the step was recorded count as the run's)."""
    path = run_dir / FULL_EVAL_FILE
    if not path.is_file():
        return None
    result = read_json(path)
    return result if result.get("steps", steps) == steps else None


def evaluate_study(study_dir: str | Path, device: str = "auto", log: Callable[[str], None] = print) -> list[Path]:
    """Write eval-full.json for every finished run under study_dir that lacks one; returns the
    runs scored now."""
    root = Path(study_dir)
    runs = finished_run_dirs(root)
    steps = {r: read_json(r / SUMMARY_FILE)["steps"] for r in runs}
    todo = [r for r in runs if full_eval(r, steps[r]) is None]
    log(f"{len(runs) - len(todo)} of {len(runs)} finished runs already scored on the whole split; {len(todo)} to score")
    for i, run in enumerate(todo, 1):
        t0 = time.time()
        result = evaluate_run(run, device, max_tokens=None)
        result["steps"] = steps[run]
        write_text_atomic(run / FULL_EVAL_FILE, json.dumps(result) + "\n")
        log(f"[{i}/{len(todo)}] {run.relative_to(root)}: val_loss {result['val_loss']:.4f} over "
            f"{result['val_tokens']:,} tokens in {time.time() - t0:.0f}s")
    return todo
