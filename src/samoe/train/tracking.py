"""Live tracking: every row the trainer logs to metrics.jsonl also goes to TensorBoard and/or
Weights & Biases (`train.loggers`), under the same names and step.

metrics.jsonl stays the run's record; the trackers are for watching. So a tracker that fails
mid-run (a full disk, a broken W&B) prints one warning and is switched off, and training and
metrics.jsonl go on. Only the main process tracks.

Besides the row (loss, lr, grad_norm, tokens/s, val_loss / ppl / bpb, dropped_frac,
router_entropy, auxiliary losses) each logged step sends what metrics.jsonl does not hold:
SaMoE's coefficients as one scalar per layer and pool layer (`coef/layer{l}/pool{k}`, the mean
over experts where each expert has its own), and each MoE layer's load of its last forward as a
histogram of slots per expert (`load/layer{l}`, TensorBoard only).

Resuming continues the same curves: TensorBoard drops the events at and after the checkpoint's
step (SummaryWriter's purge_step), and W&B resumes the run whose id RUN_DIR/wandb-run-id keeps.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from pathlib import Path

import torch

from samoe.config import Config
from samoe.config_load import to_dict
from samoe.errors import ConfigError
from samoe.fileio import write_text_atomic
from samoe.model.gpt import GPT

EXTRA = 'pip install -e ".[track]"'
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the module it needs
WANDB_ID_FILE = "wandb-run-id"
TB_DIR = "tb"


def check_installed(loggers: list[str]) -> None:
    """A ConfigError (one line, exit 2) for a logger whose package is missing, before training."""
    for name in loggers:
        module = PACKAGES.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.loggers: {name!r} needs the {module} package, which is not installed; "
                              f"install the extra: {EXTRA}")


def model_extras(model: GPT) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(scalars, histograms): SaMoE's coefficients and each MoE layer's load of its last forward.
    Every process calls it (the coefficients may be sharded over them)."""
    scalars: dict[str, float] = {}
    for l, c in enumerate(model.pool_coefficients() or []):
        c = torch.tensor(c)
        for k, v in enumerate(c if c.dim() == 1 else c.mean(0)):
            scalars[f"coef/layer{l}/pool{k}"] = float(v)
    hists = {}
    for l, layer in enumerate(model.moe_layers()):
        r = layer.last_routing
        if r is not None:
            hists[f"load/layer{l}"] = r.counts(layer.router.num_experts).float()
    return scalars, hists


class TensorBoard:
    def __init__(self, run_dir: Path, cfg: Config, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # an optional extra: loaded only when asked for

        self.writer = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step if start_step > 0 else None)
        if start_step == 0:
            self.writer.add_text("config", "```\n" + repr(to_dict(cfg)) + "\n```", 0)

    def log(self, step: int, row: dict, hists: dict[str, torch.Tensor]) -> None:
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)
        for name, counts in hists.items():
            self.writer.add_histogram(name, torch.repeat_interleave(torch.arange(len(counts)), counts.long()), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, cfg: Config, start_step: int):
        import wandb  # an optional extra: loaded only when asked for

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        group = cfg.train.wandb_group
        name = f"{run_dir.parent.name}/{run_dir.name}" if group else run_dir.name
        self.run = wandb.init(project=cfg.train.wandb_project, group=group, name=name, id=run_id, resume="allow",
                              dir=str(run_dir), config=to_dict(cfg), settings=wandb.Settings(
                                  silent=True, console="off", x_disable_stats=True, x_disable_meta=True,
                                  disable_git=True, save_code=False))  # no sampler processes beside training
        if not id_file.is_file():
            write_text_atomic(id_file, run_id + "\n")

    def log(self, step: int, row: dict, hists: dict[str, torch.Tensor]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB}


class Trackers:
    """The run's trackers (none on other processes than the main one); each call is guarded."""

    def __init__(self, cfg: Config, run_dir: Path, start_step: int, main: bool = True):
        # the same on every process: the extras are computed by all of them (model_extras)
        self.wants_extras = any(name in KINDS for name in cfg.train.loggers)
        self.active = {}
        for name in dict.fromkeys(cfg.train.loggers) if main else ():
            if name in KINDS:
                self._guard(name, lambda n=name: self.active.__setitem__(n, KINDS[n](run_dir, cfg, start_step)))

    def _guard(self, name: str, call) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - any failure of a tracker: warn once, switch it off, train on
            self.active.pop(name, None)
            print(f"warning: logger {name!r} failed and is switched off for the rest of the run "
                  f"({type(e).__name__}: {e}); metrics.jsonl is complete", file=sys.stderr)

    def log(self, step: int, row: dict, extras: tuple[dict, dict] | None) -> None:
        """Log `row` and model_extras' (scalars, histograms) to every active tracker."""
        if not self.active:
            return
        scalars, hists = extras or ({}, {})
        row = {**row, **scalars}
        for name, tracker in list(self.active.items()):
            self._guard(name, lambda t=tracker: t.log(step, row, hists))

    def close(self) -> None:
        for name, tracker in list(self.active.items()):
            self._guard(name, tracker.close)
        self.active = {}

