"""Starting a training run from the command line: the resume rules and the multi-process
launcher (`samoe train --nproc N`: the same command as N processes under torchrun's elastic
launcher, on this machine)."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from samoe.config import Config
from samoe.errors import EXIT_USER_ERROR, UserError
from samoe.runs import load_run_config
from samoe.train.distributed import check_layout

# A resumed run continues with its saved config; only these keys may be changed on resume: the
# step count (to train further), and where it runs (which does not change what it computes:
# checkpoints move between devices and process layouts).
RESUMABLE_KEYS = ("train.max_steps", "train.device", "train.ep", "train.fsdp")


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The config to resume run_dir with: its saved one, with `overrides` (key=value) limited to
    RESUMABLE_KEYS (a UserError names any other)."""
    changed = [o.split("=")[0] for o in overrides if o.split("=")[0] not in RESUMABLE_KEYS]
    if changed:
        raise UserError(f"--resume cannot change {', '.join(changed)}; only {', '.join(RESUMABLE_KEYS)}")
    return load_run_config(run_dir, overrides)


def is_main_process() -> bool:
    """True unless this is a process other than rank 0 of a torchrun launch (which stay quiet)."""
    return not int(os.environ.get("RANK", "0"))


def launch(argv: list[str], nproc: int, cfg: Config) -> int:
    """Run `samoe ARGV` as `nproc` processes on this machine under torchrun's elastic launcher
    (argv must name the run directory, so that all processes share it). Returns the exit
    status: 2 if a process reported a user error, 1 for another failure, 130 on Ctrl-C."""
    if nproc < 1:
        raise UserError(f"--nproc = {nproc} is invalid; expected an integer >= 1")
    check_layout(cfg, nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # the processes report for themselves
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "samoe", *argv)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        return EXIT_USER_ERROR if EXIT_USER_ERROR in codes else 1
    except SignalException:  # Ctrl-C: the launcher has stopped the processes
        print("samoe: interrupted", file=sys.stderr)
        return 130
    return 0
