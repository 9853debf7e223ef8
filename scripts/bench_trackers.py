"""Training speed with TensorBoard and W&B (offline) logging on, against off, on a preset:

    python scripts/bench_trackers.py [PRESET] [STEPS] [REPEATS]     # default: default 200 3

Each repeat trains the preset for STEPS steps twice in fresh processes, with train.loggers =
[jsonl] and [jsonl, tensorboard, wandb] (WANDB_MODE=offline), in alternating order, logging every
10 steps and evaluating only at the end. It compares the wall time of the training loop
(summary.json's wall_s: the steps, their logging, the trackers' start-up and the final
evaluation, which both arms share) and prints each arm's median and the ratio on / off. Run it
on a quiet machine.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PRESET = sys.argv[1] if len(sys.argv) > 1 else "default"
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 200
REPEATS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
ARMS = {"off": "train.loggers=[jsonl]", "on": "train.loggers=[jsonl,tensorboard,wandb]"}


def run(arm: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "samoe", "train", "--preset", PRESET, "--max-steps", str(STEPS), "--out", str(out),
           "--quiet", ARMS[arm], "train.log_every=10", f"train.eval_every={STEPS}", f"train.ckpt_every={STEPS}"]
    subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())["wall_s"]


def main() -> None:
    walls: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(REPEATS):
            for arm in (ARMS if i % 2 == 0 else reversed(list(ARMS))):
                walls[arm].append(run(arm, Path(tmp) / f"{arm}-{i}"))
                print(f"repeat {i + 1} {arm}: {walls[arm][-1]:.1f} s", flush=True)
    med = {arm: statistics.median(w) for arm, w in walls.items()}
    print(json.dumps({"preset": PRESET, "steps": STEPS, "repeats": REPEATS, "wall_s": walls, "median_wall_s": med,
                      "on_over_off": med["on"] / med["off"]}, indent=1))


if __name__ == "__main__":
    main()
