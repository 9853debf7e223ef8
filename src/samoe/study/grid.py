"""Studies: a grid of named arms x seeds x corpora, each cell an ordinary `samoe train` run.

A study file (YAML):

    preset: default              # the base of every arm (default: default)
    steps: 2400                  # train.max_steps of every run (default: the preset's)
    overrides: [train.eval_every=200]   # applied to every arm, before its own
    seeds: [1, 2, 3]             # seeds of every arm that does not name its own
    corpora:                     # optional: name -> overrides; default one corpus, the preset's
      stdlib: []
      debian: [data.path=data/debian-mix]
    arms:
      dense: [model.moe.enabled=false, model.ffn_hidden=524]
      moe:                       # or a mapping, for an arm with its own preset or seeds
        overrides: [model.moe.sharing=private]
        seeds: [1, 2]
        preset: default

Run `c` of arm `a` with seed `s` lives in OUT/a/seed{s} (OUT/{corpus}/a/seed{s} when the study
names corpora) and is trained by `samoe train --preset P OVERRIDES --seed s --out DIR` as a
subprocess, so every other verb works on it. A run with a summary.json whose step count is the
study's is finished and skipped; a run directory without one is resumed (`--resume`), which
continues from its latest checkpoint exactly as an uninterrupted run would.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from samoe.checkpoint import LATEST
from samoe.config import Config
from samoe.config_load import load_config
from samoe.errors import ConfigError, UserError
from samoe.model.flops import flops_report
from samoe.model.params import count_config_params
from samoe.runs import METRICS_FILE, SUMMARY_FILE, read_json, read_metrics
from samoe.timing import interleaved_medians
from samoe.train.synthetic import synthetic_step


@dataclass
class Cell:
    """One run of the grid."""

    arm: str
    seed: int
    corpus: str | None
    preset: str
    overrides: list[str]  # the study's, the arm's, then the corpus's
    run_dir: Path
    cfg: Config = field(repr=False)
    arm_seeds: list[int] = field(default_factory=list)  # every seed of this arm, in study order
    extra: list[str] = field(default_factory=list)  # overrides of this invocation only (study run --loggers)

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.corpus, self.arm, f"seed{self.seed}") if p)

    @property
    def tokens(self) -> int:
        return self.cfg.train.max_steps * self.cfg.train.batch_size * self.cfg.model.block_size

    def state(self) -> str:
        """'done', 'partial' (a run directory with a checkpoint to resume from) or 'new'."""
        summary = self.run_dir / SUMMARY_FILE
        if summary.is_file() and read_json(summary).get("steps") == self.cfg.train.max_steps:
            return "done"
        return "partial" if (self.run_dir / "checkpoints" / LATEST).is_file() else "new"


def _string_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of key.path=value strings, got {value!r}")
    return value


def _int_list(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                            for v in value):
        raise ConfigError(f"{where} must be a non-empty list of integer seeds >= 1, got {value!r}")
    return value


def check_data(cells: list[Cell]) -> None:
    """Every data path the grid trains on exists: one error naming the first missing one (and
    its run) before anything starts, rather than a failure per run later."""
    for c in cells:
        if c.cfg.data.path is not None and not Path(c.cfg.data.path).exists():
            raise ConfigError(f"{c.name}: data path '{c.cfg.data.path}' does not exist")


def load_study(path: str | Path, out: str | Path) -> list[Cell]:
    """Every cell of the study file at path, with run directories under out, in file order
    (arm, then corpus, then seed). Raises ConfigError naming the key for a bad file, and
    validates every arm's config before anything runs."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"study file '{path}' does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"study file '{path}' is not valid YAML: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("arms"), dict) or not spec["arms"]:
        raise ConfigError(f"study file '{path}' must be a mapping with a non-empty 'arms' mapping")
    known = {"preset", "steps", "seeds", "corpora", "arms", "overrides"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"study file '{path}': unknown key {unknown[0]!r}; "
                          f"expected one of: {', '.join(sorted(known))}")
    preset = spec.get("preset", "default")
    seeds = _int_list(spec.get("seeds", [1337]), f"{path}: seeds")
    steps = spec.get("steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"{path}: steps must be an integer >= 1, got {steps!r}")
    common = _string_list(spec.get("overrides"), f"{path}: overrides")
    corpora = spec.get("corpora") or {None: []}
    if not isinstance(corpora, dict):
        raise ConfigError(f"{path}: corpora must be a mapping of name -> overrides")
    cells = []
    for arm, value in spec["arms"].items():
        where = f"{path}: arms.{arm}"
        if isinstance(value, dict):
            extra = sorted(set(value) - {"overrides", "seeds", "preset"})
            if extra:
                raise ConfigError(f"{where}: unknown key {extra[0]!r}; expected overrides, seeds or preset")
            arm_over = _string_list(value.get("overrides"), f"{where}.overrides")
            arm_seeds = _int_list(value["seeds"], f"{where}.seeds") if "seeds" in value else seeds
            arm_preset = value.get("preset", preset)
        else:
            arm_over, arm_seeds, arm_preset = _string_list(value, where), seeds, preset
        for corpus, corpus_over in corpora.items():
            overrides = common + arm_over + _string_list(corpus_over, f"{path}: corpora.{corpus}")
            if steps is not None:
                overrides = overrides + [f"train.max_steps={steps}"]
            try:
                load_config(preset=arm_preset, overrides=overrides)  # one error per arm, before its seeds
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            for seed in arm_seeds:
                cfg_seed = load_config(preset=arm_preset, overrides=overrides + [f"train.seed={seed}"])
                parts = [p for p in (corpus, arm, f"seed{seed}") if p]
                cells.append(Cell(arm, seed, corpus, arm_preset, overrides, Path(out, *parts), cfg_seed, arm_seeds))
    return cells


def describe(cell: Cell) -> dict:
    """Total and active parameters and training FLOPs of a cell, from its config alone."""
    params = count_config_params(cell.cfg.model)
    fl = flops_report(cell.cfg, cell.tokens)
    return {"total_params": params["total"], "active_params": params["active"],
            "train_flops_per_token": fl["train_flops_per_token"], "train_flops": fl["train_flops"]}


def estimate_seconds(cells: list[Cell], threads: int, repeats: int = 3) -> dict[str, float]:
    """Estimated training seconds of each cell (by name): its steps' tokens at the tokens/s that
    measure_speed times for its arm. Evaluation and data preparation are not counted."""
    speed = measure_speed(cells, threads, repeats)["tokens_per_s"]
    return {c.name: c.tokens / speed[c.name.rsplit("/", 1)[0]] for c in cells}


def measure_speed(cells: list[Cell], threads: int, repeats: int = 7) -> dict:
    """Training tokens/s of each arm (by its run-directory prefix, `[corpus/]arm`): the median
    time of an optimiser step of its model on random tokens, the arms timed round-robin so they
    share the machine's noise (after two warm-ups), with `threads` torch threads. Meant for a
    quiet machine, so that a study's per-second comparison does not depend on what else ran
    beside its runs (`samoe study speed` keeps it under OUT/speed/, samoe.study.speeds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        arms = {}
        for c in cells:
            arms.setdefault(c.name.rsplit("/", 1)[0], c)
        steps = {name: synthetic_step(c.cfg) for name, c in arms.items()}
        seconds = interleaved_medians(steps, repeats)
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "repeats": repeats, "measured": time.strftime("%Y-%m-%d %H:%M"),
            "tokens_per_s": {name: c.cfg.train.batch_size * c.cfg.model.block_size / seconds[name]
                             for name, c in arms.items()}}


def train_command(cell: Cell) -> list[str]:
    """The `samoe train` command line that (re)starts a cell. A run directory that a killed
    run left before its first checkpoint is moved aside (to `seed{s}.incomplete-N`), as there
    is nothing to resume from."""
    if cell.state() == "new" and cell.run_dir.exists():
        n = 1 + sum(1 for _ in cell.run_dir.parent.glob(cell.run_dir.name + ".incomplete-*"))
        cell.run_dir.rename(cell.run_dir.with_name(f"{cell.run_dir.name}.incomplete-{n}"))
    base = [sys.executable, "-m", "samoe", "train", "--quiet"]
    if cell.state() == "partial":
        return base + ["--resume", "--out", str(cell.run_dir), f"train.max_steps={cell.cfg.train.max_steps}",
                       *cell.extra]
    return base + ["--preset", cell.preset, *cell.overrides, *cell.extra, "--seed", str(cell.seed),
                   "--out", str(cell.run_dir)]


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def parse_duration(text: str, option: str = "--time-limit") -> float:
    """Seconds of a duration written as hours, minutes and seconds: 2h30m, 90m, 1.5h, 45s."""
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    if not text.strip() or m is None:
        raise UserError(f"{option} {text!r} is not a duration; expected hours, minutes and seconds "
                        "such as 2h30m, 90m or 45s")
    h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
    return 3600 * h + 60 * mi + sec


EVAL_OVERHEAD = 1.05  # evaluations and checkpoints, on top of the training steps' logged time


def seconds_left(cell: Cell) -> float | None:
    """The training time the cell still needs, at the median tokens/s that the runs of its arm
    (every seed's, in this study directory) have logged so far, with EVAL_OVERHEAD; None when no
    run of the arm has logged a step yet. Speeds logged on another machine, or with other --jobs
    and --threads, price the run as it ran there."""
    speeds = [r["tokens_per_s"] for m in sorted(cell.run_dir.parent.glob(f"seed*/{METRICS_FILE}"))
              for r in read_metrics(m.parent) if r.get("tokens_per_s")]
    if not speeds:
        return None
    rows = read_metrics(cell.run_dir) if (cell.run_dir / METRICS_FILE).is_file() else []
    done = rows[-1]["tokens"] if rows and cell.state() == "partial" else 0
    return (cell.tokens - done) / statistics.median(speeds) * EVAL_OVERHEAD


def last_logged_step(cell: Cell) -> dict | None:
    """The last step a cell's run has logged with its tokens/s, or None."""
    if not (cell.run_dir / METRICS_FILE).is_file():
        return None
    return next((r for r in reversed(read_metrics(cell.run_dir)) if r.get("tokens_per_s")), None)


def in_flight_line(cells: list[Cell]) -> str:
    """One line on the runs training now: each one's step of its total, its logged tokens/s and
    how long its remaining tokens take at that speed (evaluations not counted)."""
    parts = []
    for cell in cells:
        row, total = last_logged_step(cell), cell.cfg.train.max_steps
        if row is None:
            parts.append(f"{cell.name} starting")
            continue
        left = max(0, cell.tokens - row["tokens"]) / row["tokens_per_s"]
        parts.append(f"{cell.name} step {row['step']:,}/{total:,} ({row['step'] / total:.0%}), "
                     f"{row['tokens_per_s'] / 1e3:.1f}k tokens/s, {format_seconds(left)} left")
    return "in flight: " + "; ".join(parts)


def run_cells(cells: list[Cell], out: Path, jobs: int = 1, threads: int | None = None,
              log=print, deadline: float | None = None, progress_every: float = 300.0) -> list[Cell]:
    """Train every unfinished cell, `jobs` at a time, each with `threads` torch threads
    (default: the cores shared out evenly). One line per finished run, with the ETA of the
    grid from the tokens/s measured so far, and every `progress_every` seconds one line on the
    runs in flight (in_flight_line). With a `deadline` (time.time() seconds), a run
    that seconds_left says cannot finish by then is not started (a shorter one behind it may
    be); runs already training are never stopped. Returns the cells that failed."""
    # seed-major: every arm's first seed before any arm's second, so a grid stopped early
    # still compares every arm
    rank = {c.name: (c.arm_seeds.index(c.seed), i) for i, c in enumerate(cells)}
    todo = sorted((c for c in cells if c.state() != "done"), key=lambda c: rank[c.name])
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    logs = Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log(f"{len(cells) - len(todo)} of {len(cells)} runs done; {len(todo)} to run, {jobs} at a time, "
        f"{threads} thread(s) each")
    running: list[tuple[Cell, subprocess.Popen, float, object]] = []
    failed, not_started, finished_tokens, busy_s, total = [], [], 0, 0.0, len(todo)
    done_count = 0
    remaining = list(todo)
    last_progress = time.time()
    while remaining or running:
        while remaining and len(running) < jobs:
            cell = remaining.pop(0)
            need = seconds_left(cell) if deadline is not None else None
            if need is not None and time.time() + need > deadline:
                not_started.append(cell)
                log(f"{cell.name}: not started: needs about {format_seconds(need)} at its arm's logged tokens/s, "
                    f"{format_seconds(max(0.0, deadline - time.time()))} left of --time-limit")
                continue
            handle = open(logs / (cell.name.replace("/", "-") + ".log"), "a")
            proc = subprocess.Popen(train_command(cell), stdout=handle, stderr=subprocess.STDOUT, env=env)
            running.append((cell, proc, time.time(), handle))
        time.sleep(1.0)
        if running and time.time() - last_progress >= progress_every:
            log(f"{time.strftime('%H:%M')} {in_flight_line([c for c, *_ in running])}")
            last_progress = time.time()
        for item in list(running):
            cell, proc, t0, handle = item
            if proc.poll() is None:
                continue
            running.remove(item)
            handle.close()
            done_count += 1
            wall = time.time() - t0
            if proc.returncode != 0:
                failed.append(cell)
                log(f"[{done_count}/{total}] {cell.name}: FAILED (exit {proc.returncode}); see {handle.name}")
                continue
            summary = read_json(cell.run_dir / SUMMARY_FILE)
            finished_tokens += summary["steps_this_session"] * cell.cfg.train.batch_size * cell.cfg.model.block_size
            busy_s += wall
            left = sum(c.tokens for c in remaining) + sum(c.tokens for c, *_ in running)
            eta = left / max(finished_tokens / busy_s, 1e-9) / jobs
            log(f"[{done_count}/{total}] {cell.name}: val_loss {summary['val_loss']:.4f} "
                f"(ppl {summary['val_ppl']:.2f}) in {format_seconds(wall)}; grid ETA {format_seconds(eta)}")
    if not_started:
        log(f"{len(not_started)} run(s) not started within --time-limit: "
            f"{', '.join(c.name for c in not_started)}; run the study again to train them")
    return failed
