"""The `samoe eval` verb: a run's validation loss, perplexity and bits per byte, or (--task)
its zero-shot accuracy; --export-tasks writes the tasks for lm-evaluation-harness."""

from __future__ import annotations

import argparse
import json

from samoe.errors import UserError
from samoe.eval import tasks, zeroshot
from samoe.eval.run import RUN_DEFAULT, evaluate_run
from samoe.verbs import check_at_least_one


def eval_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Without --task: validation loss, perplexity and bits per byte. With --task: "
                     "zero-shot accuracy (docs/evaluation.md).")
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--data", help="evaluate on all documents of this path instead of the run's validation split")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens (default: the run's "
                   "train.eval_tokens, from the windows its train.eval_windows names, as training's "
                   "evaluations did; 0 = all)")
    p.add_argument("--task", metavar="NAMES", help=f"comma-separated zero-shot tasks: built-in names "
                   f"({', '.join(tasks.BUILTIN)}) or .jsonl files of your own")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, help="requests per forward pass (default: the run's micro-batch size)")
    p.add_argument("--export-tasks", metavar="DIR", help="write the built-in tasks (or those of --task) as JSONL "
                   "and lm-evaluation-harness YAMLs into DIR, for running lm-eval offline")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_eval(args: argparse.Namespace) -> int:
    if args.export_tasks or args.task:
        return _zero_shot(args)
    if args.run_dir is None:
        raise UserError("samoe eval needs a run directory: samoe eval RUN_DIR [--task NAMES]")
    max_tokens = RUN_DEFAULT if args.max_tokens is None else (args.max_tokens or None)
    result = evaluate_run(args.run_dir, args.device or "auto", args.data, max_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<12} {v:.4f}" if isinstance(v, float) else f"{k:<12} {v}")
    return 0


def _zero_shot(args: argparse.Namespace) -> int:
    """`samoe eval RUN_DIR --task ...` and `samoe eval --export-tasks DIR`."""
    if args.data or args.max_tokens is not None:
        raise UserError("--data and --max-tokens set up perplexity evaluation; "
                        "they do not go with --task/--export-tasks")
    check_at_least_one(args, "limit", "batch_size")
    names = [n.strip() for n in (args.task or "").split(",") if n.strip()]
    if args.export_tasks:
        if args.run_dir is not None:
            raise UserError("--export-tasks writes task files and takes no RUN_DIR")
        written = tasks.export_tasks(args.export_tasks, names or list(tasks.BUILTIN))
        print(f"wrote {len(written)} tasks (JSONL + lm-evaluation-harness YAML) to {args.export_tasks}; "
              f"lm-eval tasks: {', '.join('samoe_' + p.stem for p in written)} (--include_path {args.export_tasks})")
        return 0
    if not names:
        raise UserError("--task needs at least one task name or .jsonl path")
    if args.run_dir is None:
        raise UserError("samoe eval --task needs a run directory: samoe eval RUN_DIR --task NAMES")
    tasks.check_names(names)
    loaded = [tasks.load_task(n, args.limit) for n in names]
    scorer = zeroshot.load_scorer(args.run_dir, args.device or "auto", args.batch_size)
    results = {t.name: zeroshot.evaluate_task(scorer, t, progress=not args.quiet) for t in loaded}
    print(json.dumps(results) if args.json else zeroshot.format_results(results))
    return 0
