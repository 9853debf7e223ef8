"""The `samoe train` verb: a new run, a resumed one (--resume), an upcycled one (--init-from),
or the same command on N processes (--nproc, through train/launch.py)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from samoe.config_load import load_config
from samoe.errors import UserError
from samoe.train.launch import is_main_process, launch, resume_config
from samoe.train.run import format_summary, train
from samoe.verbs import config_args

# everyday flags -> the config keys they set (after the positional overrides)
FLAG_KEYS = (("max_steps", "train.max_steps"), ("seed", "train.seed"), ("device", "train.device"),
             ("ep", "train.ep"), ("fsdp", "train.fsdp"), ("data", "data.path"))


def train_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
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
    p.add_argument("--fsdp", action="store_const", const=True,
                   help="shard every other weight over all processes with FSDP2 (train.fsdp)")
    p.add_argument("--init-from", metavar="RUN_DIR|HF_DIR", help="sparse upcycling: start from a dense run, its "
                   "samoe-hf export or a Llama-architecture Hugging Face checkpoint; every expert starts as the "
                   "dense FFN, routers fresh (docs/interop.md)")
    p.add_argument("--init-noise", type=float, default=0.0, metavar="SIGMA",
                   help="with --init-from: add SIGMA * std(W) * N(0, 1) to each expert copy (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in FLAG_KEYS
                                        if getattr(args, flag) is not None]
    resume_dir = None if args.resume in (False, True) else args.resume  # --resume RUN_DIR
    resume = resume_dir is not None or args.resume
    if resume:
        run_dir = Path(args.out or resume_dir or "")
        if not str(run_dir) or run_dir == Path(""):
            raise UserError("--resume needs the run directory: samoe train --resume --out RUN_DIR")
        if args.config or args.preset:
            raise UserError("--resume continues a run with its saved config; drop --config/--preset")
        cfg = resume_config(run_dir, overrides)
    else:
        cfg = load_config(args.config, args.preset or (None if args.config else "default"), overrides)
        name = args.preset or (Path(args.config).stem if args.config else "default")
        run_dir = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.init_from is not None and resume:
        raise UserError("--init-from starts a new run; it does not go with --resume")
    if args.init_noise < 0:
        raise UserError(f"--init-noise {args.init_noise} is invalid; expected a number >= 0")
    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        # this same command without --nproc, with the run directory named for every process
        argv = [a for a, prev in zip(args.argv, [None, *args.argv])
                if not a.startswith("--nproc") and prev != "--nproc"]
        if not args.out and not resume_dir:
            argv += ["--out", str(run_dir)]
        return launch(argv, args.nproc, cfg)
    summary = train(cfg, run_dir, resume=resume, progress=not args.quiet, init_from=args.init_from,
                    init_noise=args.init_noise)
    if is_main_process():
        print(format_summary(summary, run_dir))
    return 0
