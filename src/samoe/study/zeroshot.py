"""Zero-shot scores of a study's best arms for `samoe study report --task`.

The best arms (`best_arms`): the ZEROSHOT_BEST (3) lowest mean val losses, then the arms named
dense*, at most ZEROSHOT_MAX_ARMS (5). Every seed is scored by samoe's own scorer
(samoe.eval.zeroshot, dropless, as `samoe eval --task`) and reported as mean ± sample std over
seeds. Each run's scores are cached in RUN/zeroshot-<task>-<limit>.json and reused while the run's
step count and the sha256 of the task's items are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Callable

from samoe.errors import UserError
from samoe.eval import tasks as tasklib
from samoe.eval.zeroshot import Scorer, evaluate_task, load_scorer
from samoe.fileio import read_cache, write_text_atomic
from samoe.study.runs_table import Arm, RunRecord, base_name, mean_std

ZEROSHOT_BEST, ZEROSHOT_MAX_ARMS = 3, 5
ZEROSHOT_METRICS = ("acc", "acc_norm", "ppl")


def _loss_order(arm: Arm) -> tuple[bool, float]:
    m = arm.stat("val_loss")[0]
    return (math.isnan(m), m)


def best_arms(arms: list[Arm]) -> list[Arm]:
    """The arms to score zero-shot: the ZEROSHOT_BEST with the lowest mean val loss, then every
    arm named dense* (best first), at most ZEROSHOT_MAX_ARMS; in order of mean val loss."""
    ordered = sorted(arms, key=_loss_order)
    best = ordered[:ZEROSHOT_BEST]
    dense = [a for a in ordered if base_name(a.name).startswith("dense") and a not in best]
    chosen = (best + dense)[:ZEROSHOT_MAX_ARMS]
    return sorted(chosen, key=_loss_order)


def parse_tasks(text: str | list[str] | None, limit: int | None) -> list[str]:
    """The task names of --task (comma-separated), checked before anything is scored."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text or []) if n.strip()]
    if text is not None and not names:
        raise UserError("--task needs at least one task name or .jsonl path")
    if limit is not None and not names:
        raise UserError("--limit limits the items of the zero-shot tasks; it goes with --task")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} is invalid; expected an integer >= 1")
    tasklib.check_names(names)
    return names


def task_digest(task: tasklib.Task) -> str:
    """sha256 of a task's items: a cached score belongs to exactly these items."""
    items = [tasklib.item_json(i, task.kind) for i in task.items]
    return hashlib.sha256(json.dumps([task.kind, items], ensure_ascii=False).encode()).hexdigest()


def zeroshot_cache(run_dir: Path, name: str, limit: int | None) -> Path:
    """RUN/zeroshot-<task>-<limit>.json (a task file by its stem; limit 'all' without one)."""
    slug = name if name in tasklib.BUILTIN else Path(name).stem
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", slug) or "task"
    return run_dir / f"zeroshot-{slug}-{limit if limit is not None else 'all'}.json"


def score_run(run: RunRecord, loaded: dict[str, tasklib.Task], limit: int | None, log: Callable[[str], None],
              label: str) -> dict[str, dict]:
    """Each task's metrics for one run: from its cache when the run's steps and the task's items
    are those it was scored with, else scored (the model loaded once, dropless) and cached."""
    out: dict[str, dict] = {}
    scorer: Scorer | None = None
    for name, task in loaded.items():
        cache, digest = zeroshot_cache(run.path, name, limit), task_digest(task)
        cached = read_cache(cache)
        if (cached.get("steps") == run.summary["steps"] and cached.get("task_sha256") == digest
                and isinstance(cached.get("metrics"), dict)):
            out[name] = cached["metrics"]
            continue
        if scorer is None:
            scorer = load_scorer(run.path)
        metrics = evaluate_task(scorer, task)
        write_text_atomic(cache, json.dumps({"task": name, "limit": limit, "steps": run.summary["steps"],
                                             "task_sha256": digest, "metrics": metrics}, indent=1) + "\n")
        log(f"zero-shot {label} on {name}: acc {metrics['acc']:.4f}")
        out[name] = metrics
    return out


def zeroshot_rows(arms: list[Arm], names: list[str], limit: int | None,
                  log: Callable[[str], None] = lambda m: None) -> list[dict]:
    """One dict per (best arm, task): seeds, items, and acc / acc_norm / ppl (where the task has
    it) as mean and sample std over the arm's seeds, and chance."""
    loaded = {n: tasklib.load_task(n, limit) for n in names}  # every task read before any scoring
    rows = []
    for a in best_arms(arms):
        per_run = [score_run(r, loaded, limit, log, f"{a.name}/{r.path.name}") for r in a.runs]
        for name in names:
            scores = [s[name] for s in per_run]
            row = {"arm": a.name, "task": name, "seeds": len(scores), "n": scores[0]["n"]}
            for key in ZEROSHOT_METRICS:
                if all(key in s for s in scores):
                    row[key], row[f"{key}_std"] = mean_std([s[key] for s in scores])
            if "chance" in scores[0]:
                row["chance"] = scores[0]["chance"]
            rows.append(row)
    return rows


def format_zeroshot(rows: list[dict]) -> str:
    def pm(r: dict, key: str, digits: int = 4) -> str:
        return f"{r[key]:.{digits}f} ± {r[key + '_std']:.{digits}f}" if key in r else "-"

    lines = ["| arm | task | seeds | items | acc | acc_norm | chance |", "| --- | --- |" + " ---: |" * 5]
    for r in rows:
        chance = f"{r['chance']:.4f}" if "chance" in r else "-"
        acc = pm(r, "acc") + (f" (ppl {pm(r, 'ppl', 2)})" if "ppl" in r else "")
        lines.append(f"| {r['arm']} | {r['task']} | {r['seeds']} | {r['n']:,} | {acc} | {pm(r, 'acc_norm')} "
                     f"| {chance} |")
    return "\n".join(lines)

