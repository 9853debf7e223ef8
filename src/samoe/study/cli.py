"""The `samoe study` verbs: `run` (train a study file's grid of runs), `speed` (time every arm),
`eval` (score every finished run on its whole validation split) and `report` (curves, the table
of arms, the comparison with dense seed by seed, optional zero-shot scores)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from samoe.config import LOGGERS
from samoe.config_load import load_config
from samoe.errors import UserError
from samoe.study import grid as study
from samoe.study import report, speeds, whole_split
from samoe.train.tracking import check_installed
from samoe.verbs import Verb, check_at_least_one


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="a study YAML file (studies/*.yaml)")
    p.add_argument("--out", required=True, help="the study directory: one run directory per arm, seed and corpus")
    p.add_argument("--only", metavar="ARMS", help="comma-separated arms to run")
    p.add_argument("--dry-run", action="store_true", help="print the grid with parameters and FLOPs; train nothing")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--time-limit", metavar="DURATION", help="start no run that cannot finish within DURATION "
                   "(e.g. 2h30m) of now, priced at the tokens/s its arm's runs have logged; runs already "
                   "started are not stopped")
    p.add_argument("--progress-every", metavar="DURATION", default="5m",
                   help="how often to print a line on the runs in flight (default 5m)")
    p.add_argument("--loggers", metavar="NAMES", help="tensorboard and/or wandb (comma-separated): every run also "
                   "logs there, W&B grouped by the study's name; `tensorboard --logdir OUT` shows every arm and seed")


def cmd_run(args: argparse.Namespace) -> int:
    cells = study.load_study(args.study, args.out)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {c.arm for c in cells})
        if unknown:
            raise UserError(f"--only {unknown[0]!r}: no such arm in '{args.study}'; arms: "
                            f"{', '.join(dict.fromkeys(c.arm for c in cells))}")
        cells = [c for c in cells if c.arm in names]
    check_at_least_one(args, "jobs", "threads")
    if args.loggers:
        extra = logger_overrides(args.loggers, Path(args.study).stem)
        check_installed(load_config(overrides=extra).train.loggers)
        for c in cells:
            c.extra = extra
    deadline = time.time() + study.parse_duration(args.time_limit) if args.time_limit is not None else None
    progress_every = study.parse_duration(args.progress_every, "--progress-every")
    if args.dry_run:
        _print_dry_run(cells, args.jobs, args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
        return 0
    study.check_data(cells)
    failed = study.run_cells(cells, Path(args.out), args.jobs, args.threads, log=_log, deadline=deadline,
                             progress_every=progress_every)
    return 1 if failed else 0


def logger_overrides(names: str, group: str) -> list[str]:
    """`--loggers tensorboard,wandb` as the overrides every run of the study gets."""
    loggers = ["jsonl", *dict.fromkeys(n.strip() for n in names.split(",") if n.strip() and n.strip() != "jsonl")]
    unknown = [n for n in loggers if n not in LOGGERS]
    if unknown:
        raise UserError(f"--loggers {unknown[0]!r} is not a logger; expected some of: {', '.join(LOGGERS[1:])}")
    return [f"train.loggers=[{','.join(loggers)}]", f"train.wandb_group={group}"]


def _print_dry_run(cells: list, jobs: int, threads: int) -> None:
    """The grid with each run's state, parameters, FLOPs, tokens and estimated time."""
    est = study.estimate_seconds(cells, threads)
    print(f"{'run':<40} {'state':<8} {'total params':>13} {'active':>11} {'train FLOPs':>12} {'tokens':>11} "
          f"{'est. time':>9}")
    for c in cells:
        d = study.describe(c)
        print(f"{c.name:<40} {c.state():<8} {d['total_params']:>13,} {d['active_params']:>11,} "
              f"{d['train_flops']:>12.3g} {c.tokens:>11,} {study.format_seconds(est[c.name]):>9}")
    left = sum(est[c.name] for c in cells if c.state() != "done")
    print(f"estimated time left: {study.format_seconds(left / jobs)} ({jobs} at a time, {threads} "
          f"thread(s) each; timed on random tokens, evaluation not counted)")


def speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="a study YAML file")
    p.add_argument("--out", required=True, help="the study directory")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per arm (after 2 warm-ups)")


def cmd_speed(args: argparse.Namespace) -> int:
    check_at_least_one(args, "threads", "repeats")
    speed = study.measure_speed(study.load_study(args.study, args.out), args.threads, args.repeats)
    path = speeds.write_measurement(Path(args.out), speed)
    for name, tps in speed["tokens_per_s"].items():
        print(f"{name:<40} {tps:>10,.0f} tokens/s")
    print(f"written: {path}")
    return 0


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", help="a study directory (samoe study run --out)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def cmd_eval(args: argparse.Namespace) -> int:
    whole_split.evaluate_study(args.study_dir, args.device, log=_log)
    return 0


def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", help="a study directory (samoe study run --out)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--task", metavar="NAMES", help="also score the best arms (3 lowest val losses, the dense arms; "
                   "at most 5) zero-shot on these comma-separated tasks (as samoe eval --task), every seed")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--speed", metavar="WHEN", help="put every arm on the `samoe study speed` measurement taken at "
                   "WHEN (e.g. 2026-12-02 08:39; default: each arm on the latest that timed it)")


def cmd_report(args: argparse.Namespace) -> int:
    path, rows = report.write_report(args.study_dir, args.task, args.limit, log=_log, speed=args.speed)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(report.format_table(rows))
        print(f"written: {path} and its PNGs")
    return 0


STUDY_VERBS = (
    Verb("run", "train every unfinished run of a study file (finished ones are skipped, partial ones resumed)",
         run_args, cmd_run),
    Verb("speed", "OUT/speed/DATE.json: every arm's training tokens/s, timed round-robin on a quiet machine (study "
         "report then uses it for the per-second view)", speed_args, cmd_speed),
    Verb("eval", "RUN/eval-full.json for every finished run: its whole validation split, dropless (study report "
         "then compares arms on it)", eval_args, cmd_eval),
    Verb("report", "DIR/report.md, report.json and PNGs: curves over seeds, the table of arms", report_args,
         cmd_report),
)
