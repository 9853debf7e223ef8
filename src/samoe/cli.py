"""The `samoe` command: train, eval, generate, export, params, flops, match-dense, analyze, data, bench.

Config values come from defaults <- --preset <- --config FILE <- `key.path=value` overrides
(e.g. `model.moe.num_experts=8 train.max_steps=200`). User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from samoe.config import field_paths, load_config, micro_batch, preset_names
from samoe.data.cli import add_data_parser
from samoe.errors import UserError
from samoe.eval.tasks import BUILTIN
from samoe.malloc import keep_freed_memory

EXIT_USER_ERROR = 2


def _overrides_help() -> str:
    keys = "\n".join(f"  {k} (default {v})" for k, v in field_paths())
    return f"config keys (override with key.path=value):\n{keys}"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (see below)")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--preset", help=f"a built-in preset: {', '.join(preset_names())}")


def _cli_overrides(args) -> list[str]:
    """The everyday flags as overrides, after the positional ones."""
    out = list(args.overrides)
    for flag, key in [("max_steps", "train.max_steps"), ("seed", "train.seed"), ("device", "train.device"),
                      ("ep", "train.ep"), ("data", "data.path")]:
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    return out


def cmd_train(args) -> int:
    from samoe.train.launch import is_main_process, launch, resume_config
    from samoe.train.loop import format_summary, train

    overrides = _cli_overrides(args)
    if args.resume:
        run_dir = Path(args.out or args.resume_dir or "")
        if not str(run_dir) or run_dir == Path(""):
            raise UserError("--resume needs the run directory: samoe train --resume --out RUN_DIR")
        if args.config or args.preset:
            raise UserError("--resume continues a run with its saved config; drop --config/--preset")
        cfg = resume_config(run_dir, overrides)
    else:
        cfg = load_config(args.config, args.preset or (None if args.config else "default"), overrides)
        name = args.preset or (Path(args.config).stem if args.config else "default")
        run_dir = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.init_from is not None and args.resume:
        raise UserError("--init-from starts a new run; it does not go with --resume")
    if args.init_noise < 0:
        raise UserError(f"--init-noise {args.init_noise} is invalid; expected a number >= 0")
    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        # this same command without --nproc, with the run directory named for every process
        argv = [a for a, prev in zip(args.argv, [None, *args.argv])
                if not a.startswith("--nproc") and prev != "--nproc"]
        if not args.out and not args.resume_dir:
            argv += ["--out", str(run_dir)]
        return launch(argv, args.nproc, cfg)
    summary = train(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet, init_from=args.init_from,
                    init_noise=args.init_noise)
    if is_main_process():
        print(format_summary(summary, run_dir))
    return 0


def _main_process() -> bool:
    """True unless this is a process other than rank 0 of a torchrun launch (which stay quiet)."""
    return not int(os.environ.get("RANK", "0"))


def cmd_eval(args) -> int:
    if args.export_tasks or args.task:
        return _zero_shot(args)
    if args.run_dir is None:
        raise UserError("samoe eval needs a run directory: samoe eval RUN_DIR [--task NAMES]")
    from samoe.data.prepare import load_eval_stream, load_splits
    from samoe.eval.perplexity import evaluate
    from samoe.runs import autocast_for, load_trained

    cfg, model, tok = load_trained(args.run_dir, args.device or "auto")
    stream = load_eval_stream(args.data, tok) if args.data else load_splits(cfg.data, cfg.model.vocab_size, tok).val
    batch = micro_batch(cfg.train)
    device = next(model.parameters()).device
    max_tokens = cfg.train.eval_tokens if args.max_tokens is None else (args.max_tokens or None)
    if max_tokens is not None and max_tokens < 0:
        raise UserError(f"--max-tokens {args.max_tokens} is invalid; expected an integer >= 0 (0 = all)")
    result = evaluate(model, stream, tok.token_bytes(), batch, max_tokens, autocast_for(cfg, device))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<12} {v:.4f}" if isinstance(v, float) else f"{k:<12} {v}")
    return 0


def _zero_shot(args) -> int:
    """`samoe eval RUN_DIR --task ...` and `samoe eval --export-tasks DIR`."""
    from samoe.eval import tasks, zeroshot

    if args.data or args.max_tokens is not None:
        raise UserError("--data and --max-tokens set up perplexity evaluation; "
                        "they do not go with --task/--export-tasks")
    for flag in ("limit", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is invalid; expected an integer >= 1")
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


def cmd_generate(args) -> int:
    import torch

    from samoe.runs import load_trained

    cfg, model, tok = load_trained(args.run_dir, args.device or "auto")
    device = next(model.parameters()).device
    ids = tok.encode(args.prompt) or [tok.eot_id]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(torch.tensor([ids], device=device), args.max_tokens, args.temperature, args.top_k, gen)
    print(tok.decode(out[0].tolist()))
    return 0


def _load_target(target: str, overrides: list[str]):
    """A preset name, a config YAML file or a run directory (its config.yaml) -> Config."""
    path = Path(target)
    if path.is_dir():
        from samoe.runs import load_run_config

        return load_run_config(path, overrides)
    if path.is_file() or target.endswith((".yaml", ".yml")):
        return load_config(path, overrides=overrides)
    if "/" in target or "\\" in target:
        raise UserError(f"'{target}' does not exist; expected a preset, a config YAML file or a run directory")
    return load_config(preset=target, overrides=overrides)


def cmd_params(args) -> int:
    from samoe.analysis.params import count_config_params, format_params

    counts = count_config_params(_load_target(args.target, args.overrides).model)
    print(json.dumps(counts) if args.json else format_params(counts))
    return 0


def cmd_flops(args) -> int:
    from samoe.analysis.flops import flops_report, format_report

    report = flops_report(_load_target(args.target, args.overrides), args.tokens, args.batch_tokens)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_match_dense(args) -> int:
    from samoe.analysis.flops import format_matched, write_matched

    cfg = _load_target(args.target, args.overrides)
    name = Path(args.target.rstrip("/\\")).stem or "config"
    print(format_matched(cfg, write_matched(cfg, name, args.out)))
    return 0


def cmd_analyze_gradflow(args) -> int:
    from samoe.analysis import gradflow

    routers = gradflow.parse_list(args.routers, "--routers")
    experts = gradflow.parse_list(args.experts, "--experts", int)
    sharings = gradflow.parse_list(args.sharing, "--sharing")
    gradflow.check_grid(routers, experts, sharings)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    run_dirs = [a for a in args.overrides if "=" not in a]
    overrides = [a for a in args.overrides if "=" in a] + ([f"data.path={json.dumps(args.data)}"] if args.data else [])
    t0 = time.time()
    if run_dirs:  # existing runs: their next steps from the latest checkpoint, measured
        if args.config or args.preset or args.data:
            raise UserError("RUN_DIR... is measured with its own config and data; drop --config/--preset/--data")
        report = gradflow.measure_runs(run_dirs, args.out, args.steps or 8, overrides, progress=not args.quiet)
        print(gradflow.format_runs_table(report))
        print(f"{len(run_dirs)} runs in {time.time() - t0:.0f}s; results in {args.out}/runs.json")
        return 0
    cfg = gradflow.base_config(args.config, args.preset, overrides, args.steps)
    grid = gradflow.run_grid(cfg, args.out, routers, experts, sharings, args.measure, progress=not args.quiet,
                             log=lambda m: print(m, file=sys.stderr))
    print(gradflow.format_table(grid))
    print(f"{len(grid['cells'])} cells in {time.time() - t0:.0f}s; results in {args.out}/gradflow.json, "
          f"plots in {args.out}/gradflow*.png")
    return 0


def cmd_analyze_experts(args) -> int:
    from samoe.analysis.experts import analyze_experts, format_report

    out = args.out or str(Path(args.run_dir) / "analysis")
    report = analyze_experts(args.run_dir, out, args.max_tokens, args.device or "auto")
    print(format_report(report, out))
    return 0


def cmd_export(args) -> int:
    from samoe.hf.export import export_run

    out = export_run(args.run_dir, args.out, args.format, args.materialize, args.dtype)
    how = "trust_remote_code=True" if args.format == "samoe-hf" else "no remote code"
    print(f"exported {args.run_dir} as {args.format} to {out} (AutoModelForCausalLM.from_pretrained, {how})")
    return 0


def cmd_bench(args) -> int:
    from samoe.bench.suite import main as bench_main

    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats} is invalid; expected an integer >= 1")
    command = ("samoe bench" + (" --quick" if args.quick else "")
               + (f" --repeats {args.repeats}" if args.repeats != 5 else ""))
    results = bench_main(args.quick, args.repeats, args.json, args.out, command)
    print(open(args.out).read())
    return 0 if results else 1


def cmd_study_run(args) -> int:
    from samoe.study import grid as study

    cells = study.load_study(args.study, args.out)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {c.arm for c in cells})
        if unknown:
            raise UserError(f"--only {unknown[0]!r}: no such arm in '{args.study}'; arms: "
                            f"{', '.join(dict.fromkeys(c.arm for c in cells))}")
        cells = [c for c in cells if c.arm in names]
    for flag in ("jobs", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} is invalid; expected an integer >= 1")
    if args.dry_run:
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        est = study.estimate_seconds(cells, threads)
        print(f"{'run':<40} {'state':<8} {'total params':>13} {'active':>11} {'train FLOPs':>12} {'tokens':>11} "
              f"{'est. time':>9}")
        for c in cells:
            d = study.describe(c)
            print(f"{c.name:<40} {c.state():<8} {d['total_params']:>13,} {d['active_params']:>11,} "
                  f"{d['train_flops']:>12.3g} {c.tokens:>11,} {study.format_seconds(est[c.name]):>9}")
        left = sum(est[c.name] for c in cells if c.state() != "done")
        print(f"estimated time left: {study.format_seconds(left / args.jobs)} ({args.jobs} at a time, {threads} "
              f"thread(s) each; timed on random tokens, evaluation not counted)")
        return 0
    study.check_data(cells)
    failed = study.run_cells(cells, Path(args.out), args.jobs, args.threads,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    return 1 if failed else 0


def cmd_study_speed(args) -> int:
    from samoe.fileio import write_text_atomic
    from samoe.study import grid as study

    for flag in ("threads", "repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} is invalid; expected an integer >= 1")
    speed = study.measure_speed(study.load_study(args.study, args.out), args.threads, args.repeats)
    path = Path(args.out) / study.SPEED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(speed, indent=1) + "\n")
    for name, tps in speed["tokens_per_s"].items():
        print(f"{name:<40} {tps:>10,.0f} tokens/s")
    print(f"written: {path}")
    return 0


def cmd_study_report(args) -> int:
    from samoe.study import report

    path, rows = report.write_report(args.study_dir, args.task, args.limit,
                                     log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(report.format_table(rows))
        print(f"written: {path} and its PNGs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="train a model (default: small SaMoE on the built-in stdlib corpus)",
                       epilog=_overrides_help(), formatter_class=fmt)
    _config_args(p)
    p.add_argument("--data", help="a text file, a directory of text files, or JSONL with a 'text' field")
    p.add_argument("--out", help="run directory (default: runs/<name>-<time>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue the run in --out (or RUN_DIR) from its latest checkpoint")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--nproc", type=int, metavar="N",
                   help="run N processes on this machine (torchrun --standalone); train.batch_size stays global")
    p.add_argument("--ep", type=int, metavar="P",
                   help="expert-parallel size (train.ep): experts spread over P processes")
    p.add_argument("--init-from", metavar="RUN_DIR|HF_DIR", help="sparse upcycling: start from a dense run, its "
                   "samoe-hf export or a Llama-architecture Hugging Face checkpoint; every expert starts as the "
                   "dense FFN, routers fresh (docs/interop.md)")
    p.add_argument("--init-noise", type=float, default=0.0, metavar="SIGMA",
                   help="with --init-from: add SIGMA * std(W) * N(0, 1) to each expert copy (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="perplexity of a run, or its zero-shot accuracy on tasks (--task)",
                       description="Without --task: validation loss, perplexity and bits per byte. With --task: "
                                   "zero-shot accuracy (docs/evaluation.md).")
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--data", help="evaluate on all documents of this path instead of the run's validation split")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens (default: the run's "
                   "train.eval_tokens, as training's evaluations did; 0 = all)")
    p.add_argument("--task", metavar="NAMES", help=f"comma-separated zero-shot tasks: built-in names "
                   f"({', '.join(BUILTIN)}) or .jsonl files of your own")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, help="requests per forward pass (default: the run's micro-batch size)")
    p.add_argument("--export-tasks", metavar="DIR", help="write the built-in tasks (or those of --task) as JSONL "
                   "and lm-evaluation-harness YAMLs into DIR, for running lm-eval offline")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("params", help="parameter counts (total, active per token, by component)")
    p.add_argument("target", help=f"a preset ({', '.join(preset_names())}), a config YAML file or a run directory")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("flops", help="FLOPs per token by component, training FLOPs, PF-days, all-to-all bytes")
    p.add_argument("target", help=f"a preset ({', '.join(preset_names())}), a config YAML file or a run directory")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--tokens", type=int, help="training tokens (default: max_steps x batch_size x block_size)")
    p.add_argument("--batch-tokens", type=int,
                   help="tokens per forward pass, over which SaMoE's pool combination is amortised "
                        "(default: micro-batch x block_size)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("match-dense", help="write dense configs matching an MoE's training FLOPs and its parameters")
    p.add_argument("target", help="a preset, a config YAML file or a run directory (an MoE config)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--out", default=".", help="directory for NAME-dense-flops.yaml and NAME-dense-params.yaml")
    p.set_defaults(func=cmd_match_dense)

    add_data_parser(sub)

    p = sub.add_parser("analyze", help="gradient flow across routers and expert counts; a run's experts")
    analyze = p.add_subparsers(dest="analysis", required=True)
    p = analyze.add_parser("gradflow", help="per-expert gradient statistics over a grid of routers x E x sharing",
                           description="Train a short run per grid cell and record, per expert, the gradient norm "
                                       "per parameter, tokens per step, dead experts, gradient SNR across "
                                       "micro-batches and router entropy (docs/analysis.md). Resumable: finished "
                                       "cells are kept in OUT/cells/ and skipped. Given run directories instead, "
                                       "measure each run's next --steps steps (default 8) from its latest "
                                       "checkpoint, without changing the run (OUT/runs.json).",
                           epilog=_overrides_help(), formatter_class=fmt)
    p.add_argument("overrides", nargs="*", metavar="RUN_DIR | key.path=value",
                   help="run directories to measure, and/or config overrides (see below)")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--preset", help=f"a built-in preset: {', '.join(preset_names())}")
    p.add_argument("--data", help="training data (default: the built-in corpus, data.corpus)")
    p.add_argument("--routers", default="switch,gshard,base,hash", help="comma-separated routers")
    p.add_argument("--experts", default="4,8,16,32,64", help="comma-separated expert counts E")
    p.add_argument("--sharing", default="private,pool", help="comma-separated sharing strategies")
    p.add_argument("--steps", type=int, help="training steps per cell (default: the preset's train.max_steps)")
    p.add_argument("--measure", type=float, default=0.5, help="fraction of the steps, at the end, that are measured")
    p.add_argument("--out", default="runs/gradflow", help="output directory (cells/, gradflow.json, PNGs)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadiest on a busy 2-core machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_analyze_gradflow)
    p = analyze.add_parser("experts", help="a run's per-layer expert load, expert similarity and SaMoE coefficients")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output directory (default: RUN_DIR/analysis)")
    p.add_argument("--max-tokens", type=int, default=65536, help="validation tokens to route (default 65536)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_analyze_experts)

    p = sub.add_parser("study", help="a grid of arms x seeds x corpora as ordinary runs (see studies/)")
    study_sub = p.add_subparsers(dest="study_command", required=True)
    p = study_sub.add_parser("run", help="train every unfinished run of a study file (finished ones are skipped, "
                             "partial ones resumed)")
    p.add_argument("study", help="a study YAML file (studies/*.yaml)")
    p.add_argument("--out", required=True, help="the study directory: one run directory per arm, seed and corpus")
    p.add_argument("--only", metavar="ARMS", help="comma-separated arms to run")
    p.add_argument("--dry-run", action="store_true", help="print the grid with parameters and FLOPs; train nothing")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.set_defaults(func=cmd_study_run)
    p = study_sub.add_parser("speed", help="OUT/speed.json: every arm's training tokens/s, timed round-robin on a "
                             "quiet machine (study report then uses it for the per-second view)")
    p.add_argument("study", help="a study YAML file")
    p.add_argument("--out", required=True, help="the study directory")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per arm (after 2 warm-ups)")
    p.set_defaults(func=cmd_study_speed)
    p = study_sub.add_parser("report", help="DIR/report.md, report.json and PNGs: curves over seeds, the table of arms")
    p.add_argument("study_dir", help="a study directory (samoe study run --out)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--task", metavar="NAMES", help="also score the best arms (3 lowest val losses, the dense arms; "
                   "at most 5) zero-shot on these comma-separated tasks (as samoe eval --task), every seed")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.set_defaults(func=cmd_study_report)

    p = sub.add_parser("export", help="a run as a Hugging Face model directory (samoe-hf, mixtral, qwen2_moe)",
                       description="Export a run's latest checkpoint for transformers (docs/interop.md).")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    p.add_argument("--format", default="samoe-hf", choices=("samoe-hf", "mixtral", "qwen2_moe"),
                   help="samoe-hf (default): samoe's own modelling code, loaded with trust_remote_code=True; "
                        "mixtral, qwen2_moe: stock architectures, for models that fit")
    p.add_argument("--materialize", action="store_true",
                   help="samoe-hf: expand SaMoE's pool (or the shared bank) into per-layer experts")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weight dtype (default float32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="MoE speed and memory benchmarks, written to docs/benchmarks.md")
    p.add_argument("--quick", action="store_true", help="a reduced suite (T = 2048), under 2 minutes")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per case (after 2 warm-ups)")
    p.add_argument("--json", metavar="FILE", help="also write the ratios as JSON")
    p.add_argument("--out", default="docs/benchmarks.md", help="the Markdown report")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "resume", False) not in (False, True):
        args.resume_dir, args.resume = args.resume, True
    else:
        args.resume_dir = None
    keep_freed_memory()  # every verb trains, evaluates or benchmarks: steady state is the peak
    try:
        return args.func(args)
    except UserError as e:
        if _main_process():  # under torchrun every process hits the same error
            print(f"samoe: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if _main_process():
            print("samoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `samoe params ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
