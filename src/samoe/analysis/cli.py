"""The analysis verbs: `samoe params`, `samoe flops` and `samoe match-dense` on a preset, a
config file or a run directory, and `samoe analyze gradflow` / `samoe analyze experts`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from samoe.analysis import gradflow
from samoe.analysis.experts import analyze_experts
from samoe.analysis.experts import format_report as format_experts
from samoe.analysis.plan import format_plan, parse_memory, plan
from samoe.config import Config
from samoe.config_load import load_config, preset_names
from samoe.errors import UserError
from samoe.model.flops import flops_report, format_matched, write_matched
from samoe.model.flops import format_report as format_flops
from samoe.model.params import count_config_params, format_params
from samoe.runs import load_run_config
from samoe.verbs import Verb, config_args


def load_target(target: str, overrides: list[str]) -> Config:
    """A preset name, a config YAML file or a run directory (its config.yaml) -> Config."""
    path = Path(target)
    if path.is_dir():
        return load_run_config(path, overrides)
    if path.is_file() or target.endswith((".yaml", ".yml")):
        return load_config(path, overrides=overrides)
    if "/" in target or "\\" in target:
        raise UserError(f"'{target}' does not exist; expected a preset, a config YAML file or a run directory")
    return load_config(preset=target, overrides=overrides)


def _target_args(p: argparse.ArgumentParser, target_help: str | None = None) -> None:
    p.add_argument("target", help=target_help or f"a preset ({', '.join(preset_names())}), a config YAML file "
                   "or a run directory")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")


def params_args(p: argparse.ArgumentParser) -> None:
    _target_args(p)
    p.add_argument("--json", action="store_true")


def cmd_params(args: argparse.Namespace) -> int:
    counts = count_config_params(load_target(args.target, args.overrides).model)
    print(json.dumps(counts) if args.json else format_params(counts))
    return 0


def flops_args(p: argparse.ArgumentParser) -> None:
    _target_args(p)
    p.add_argument("--tokens", type=int, help="training tokens (default: max_steps x batch_size x block_size)")
    p.add_argument("--batch-tokens", type=int,
                   help="tokens per forward pass, over which SaMoE's pool combination is amortised "
                        "(default: micro-batch x block_size)")
    p.add_argument("--json", action="store_true")


def cmd_flops(args: argparse.Namespace) -> int:
    report = flops_report(load_target(args.target, args.overrides), args.tokens, args.batch_tokens)
    print(json.dumps(report, indent=2) if args.json else format_flops(report))
    return 0


def plan_args(p: argparse.ArgumentParser) -> None:
    _target_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) in all")
    p.add_argument("--gpu-mem", required=True, metavar="SIZE", help="memory of one GPU, e.g. 80GB or 141GB")
    p.add_argument("--ep", type=int, help="only this expert-parallel degree (default: every one that divides)")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="only layouts with (--fsdp) or without (--no-fsdp) FSDP (default: both)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: train.dtype)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate")
    p.add_argument("--json", action="store_true")


def cmd_plan(args: argparse.Namespace) -> int:
    report = plan(load_target(args.target, args.overrides), args.gpus, parse_memory(args.gpu_mem), args.dtype,
                  args.ep, args.fsdp, args.mfu)
    print(json.dumps(report, indent=1) if args.json else format_plan(report, Path(args.target).stem))
    return 0


def match_dense_args(p: argparse.ArgumentParser) -> None:
    _target_args(p, "a preset, a config YAML file or a run directory (an MoE config)")
    p.add_argument("--out", default=".", help="directory for NAME-dense-flops.yaml and NAME-dense-params.yaml")


def cmd_match_dense(args: argparse.Namespace) -> int:
    cfg = load_target(args.target, args.overrides)
    name = Path(args.target.rstrip("/\\")).stem or "config"
    print(format_matched(cfg, write_matched(cfg, name, args.out)))
    return 0


def _gradflow_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/gradflow", help="output directory")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadiest on a busy 2-core machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def gradflow_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a short run per grid cell and record, per expert, the gradient norm per parameter, "
                     "tokens per step, dead experts, gradient SNR across micro-batches and router entropy "
                     "(docs/analysis.md). Resumable: finished cells are kept in OUT/cells/ and skipped. "
                     "`samoe analyze gradflow-runs` measures existing runs instead.")
    config_args(p)
    p.add_argument("--data", help="training data (default: the built-in corpus, data.corpus)")
    p.add_argument("--routers", default="switch,gshard,base,hash", help="comma-separated routers")
    p.add_argument("--experts", default="4,8,16,32,64", help="comma-separated expert counts E")
    p.add_argument("--sharing", default="private,pool", help="comma-separated sharing strategies")
    p.add_argument("--steps", type=int, help="training steps per cell (default: the preset's train.max_steps)")
    p.add_argument("--measure", type=float, default=0.5, help="fraction of the steps, at the end, that are measured")
    _gradflow_common(p)


def cmd_gradflow(args: argparse.Namespace) -> int:
    routers = gradflow.parse_list(args.routers, "--routers")
    experts = gradflow.parse_list(args.experts, "--experts", int)
    sharings = gradflow.parse_list(args.sharing, "--sharing")
    gradflow.check_grid(routers, experts, sharings)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = args.overrides + ([f"data.path={json.dumps(args.data)}"] if args.data else [])
    t0 = time.time()
    cfg = gradflow.base_config(args.config, args.preset, overrides, args.steps)
    grid = gradflow.run_grid(cfg, args.out, routers, experts, sharings, args.measure, progress=not args.quiet,
                             log=lambda m: print(m, file=sys.stderr))
    print(gradflow.format_table(grid))
    print(f"{len(grid['cells'])} cells in {time.time() - t0:.0f}s; results in {args.out}/gradflow.json, "
          f"plots in {args.out}/gradflow*.png")
    return 0


def gradflow_runs_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Measure each run's next --steps steps from its latest checkpoint through the same train step "
                     "and statistics as `samoe analyze gradflow`, without changing the run (OUT/runs.json).")
    p.add_argument("overrides", nargs="+", metavar="RUN_DIR | key.path=value",
                   help="the run directories to measure, and overrides of their configs (key.path=value)")
    p.add_argument("--steps", type=int, default=8, help="steps to measure (default 8)")
    _gradflow_common(p)


def cmd_gradflow_runs(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run_dirs = [a for a in args.overrides if "=" not in a]
    overrides = [a for a in args.overrides if "=" in a]
    if not run_dirs:
        raise UserError("samoe analyze gradflow-runs needs at least one RUN_DIR")
    t0 = time.time()
    report = gradflow.measure_runs(run_dirs, args.out, args.steps, overrides, progress=not args.quiet)
    print(gradflow.format_runs_table(report))
    print(f"{len(run_dirs)} runs in {time.time() - t0:.0f}s; results in {args.out}/runs.json")
    return 0


def experts_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--out", help="output directory (default: RUN_DIR/analysis)")
    p.add_argument("--max-tokens", type=int, default=65536, help="validation tokens to route (default 65536)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))


def cmd_experts(args: argparse.Namespace) -> int:
    out = args.out or str(Path(args.run_dir) / "analysis")
    report = analyze_experts(args.run_dir, out, args.max_tokens, args.device or "auto")
    print(format_experts(report, out))
    return 0


ANALYZE_VERBS = (
    Verb("gradflow", "per-expert gradient statistics over a grid of routers x E x sharing", gradflow_args,
         cmd_gradflow),
    Verb("gradflow-runs", "the same statistics over existing runs' next steps", gradflow_runs_args,
         cmd_gradflow_runs),
    Verb("experts", "a run's per-layer expert load, expert similarity and SaMoE coefficients", experts_args,
         cmd_experts),
)
