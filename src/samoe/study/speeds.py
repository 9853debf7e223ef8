"""A study's quiet-machine speed measurements (`samoe study speed`), kept one file per measurement
under OUT/speed/, the latest also as OUT/speed.json (where a study directory from before kept
its only one). The report puts each arm on the latest measurement that timed it, so adding arms and
timing them later never changes the speeds of the arms measured before; `--speed WHEN` redraws
the report on one measurement (its "measured" time starts with WHEN, e.g. 2026-12-02)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from samoe.errors import UserError
from samoe.fileio import write_text_atomic
from samoe.runs import read_json
from samoe.study.runs_table import Arm

SPEED_DIR, LEGACY_SPEED_FILE = "speed", "speed.json"


def write_measurement(out: Path, speed: dict) -> Path:
    """OUT/speed/<measured time>.json and OUT/speed.json for a measure_speed answer; returns the first."""
    stamp = speed.get("measured") or time.strftime("%Y-%m-%d %H:%M")
    path = Path(out) / SPEED_DIR / (stamp.replace(" ", "-").replace(":", "") + ".json")
    for p in (path, Path(out) / LEGACY_SPEED_FILE):
        write_text_atomic(p, json.dumps(speed, indent=1) + "\n")
    return path


def measurements(root: Path) -> list[dict]:
    """Every measurement of the study directory, oldest first."""
    files = [root / LEGACY_SPEED_FILE] if (root / LEGACY_SPEED_FILE).is_file() else []
    files += sorted((root / SPEED_DIR).glob("*.json"))
    found = {m.get("measured", ""): m for m in (read_json(f) for f in files)}  # speed.json repeats the latest
    return [found[k] for k in sorted(found)]


def chosen_speeds(root: Path, arms: list[str], when: str | None = None
                  ) -> tuple[dict[str, tuple[float, dict]], list[dict]]:
    """({arm: (tokens/s, its measurement)} for the given arms, the measurements used): each arm
    on the latest measurement that timed it, or on the one measured at `when` alone."""
    found = measurements(root)
    if when is not None:
        found = [m for m in found if m.get("measured", "").startswith(when)][-1:]
        if not found:
            raise UserError(f"--speed {when!r}: no speed measurement of '{root}' was taken then; taken: "
                            f"{', '.join(m.get('measured', '?') for m in measurements(root)) or 'none'}")
    per_arm: dict[str, tuple[float, dict]] = {}
    for m in found:
        for arm, tps in m["tokens_per_s"].items():
            if arm in arms:
                per_arm[arm] = (tps, m)
    used = [m for m in found if any(m is u for _, u in per_arm.values())]
    return per_arm, used


def apply_speed(arms: list[Arm], per_arm: dict[str, tuple[float, dict]]) -> list[str]:
    """Put each arm's training time on its measured tokens/s: a run's seconds at an evaluation
    become its tokens / that speed. Returns the arms without a measured speed (they keep their
    logged tokens/s)."""
    missing = []
    for a in arms:
        if a.name not in per_arm:
            missing.append(a.name)
            continue
        tps = per_arm[a.name][0]
        for r in a.runs:
            r.curve = [(step, tokens, tokens / tps, loss) for step, tokens, _, loss in r.curve]
            r.tokens_per_s = tps
    return missing


def speed_note(used: list[dict], missing: list[str]) -> str:
    """The report's sentence on where tokens/s and training seconds come from."""
    if not used:
        return "tokens/s is each run's median over logged steps; train s excludes evaluation."
    taken = "; ".join(f"{m['measured']} ({m['threads']} thread(s), median of {m['repeats']}, "
                      f"{sum(1 for a in m['tokens_per_s'])} arms timed)" for m in used)
    return ("tokens/s and train s come from `samoe study speed` (every arm's optimiser step timed round-robin on "
            f"random tokens; each arm on the latest measurement that timed it: {taken}), not from the runs, which "
            "may have shared the machine" + (f"; arms without a measured speed keep their logged one: "
                                             f"{', '.join(missing)}." if missing else "."))
