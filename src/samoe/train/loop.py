"""The trainer's optimiser step; samoe.train.run trains a run around it.

One optimiser step consumes `train.batch_size` sequences of `model.block_size` tokens (the
global batch), split into micro-batches of `train.micro_batch_size` for gradient accumulation.
Resuming restores weights, optimiser, RNG and data-sampler state and truncates metrics.jsonl to
the checkpoint, so a resumed run logs the same values as an uninterrupted one.

A Trainer holds the config, model, optimiser, data and this process's layout; forward_backward
runs the micro-batches; train_step is one optimiser step (the schedule's learning rate, the
batch, the expert-gradient reduction, clipping to the global norm, the optimiser step and the
router-bias update). `samoe analyze gradflow` and the timing of benchmarks and studies
(samoe.train.synthetic) call these steps directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from samoe.config import Config, micro_batch
from samoe.data.dataset import TokenStream
from samoe.model.gpt import GPT, GPTOutput
from samoe.runs import autocast_for
from samoe.train.distributed import (
    Layout,
    all_mean,
    clip_grad_norm,
    gradient_sync_paused,
    reduce_expert_grads,
    reset_a2a_bytes,
    step_metrics,
    sync_router_loads,
    wrap_ddp,
)
from samoe.train.optim import build_optimizer, lr_at, set_lr

# --------------------------------------------------------------------------- the train step


@dataclass
class Trainer:
    """What an optimiser step reads and changes: the config, this process's layout and device,
    the model (and `ddp`, the model or its DistributedDataParallel wrapper), the optimiser, the
    training stream with its sampler, and the number of steps taken."""

    cfg: Config
    model: GPT
    optimizer: torch.optim.Optimizer
    train_data: TokenStream
    data_gen: torch.Generator
    layout: Layout = field(default_factory=Layout)
    device: torch.device = torch.device("cpu")
    ddp: nn.Module | None = None
    autocast: Callable[[], AbstractContextManager] = nullcontext
    step: int = 0

    def __post_init__(self):
        if self.ddp is None:
            self.ddp = self.model

    @property
    def local_batch(self) -> int:
        """This process's share of the global batch."""
        return self.cfg.train.batch_size // self.layout.world

    @property
    def micro(self) -> int:
        return micro_batch(self.cfg.train, self.layout.world)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.model.block_size


def new_trainer(cfg: Config, model: GPT, train_data: TokenStream, layout: Layout | None = None) -> Trainer:
    """A Trainer at step 0 for `model` (already on the layout's device, weights final): its DDP
    wrapper under data parallelism, the optimiser, the data sampler seeded with train.seed."""
    layout = layout or Layout()
    device = layout.device
    optimizer = build_optimizer(model, cfg.train, fused=device.type in ("cpu", "cuda"),
                                coef_lr_scale=cfg.model.moe.pool.lr_scale)
    return Trainer(cfg, model, optimizer, train_data, torch.Generator().manual_seed(cfg.train.seed), layout, device,
                   wrap_ddp(model, layout, device), autocast_for(cfg, device))


class StepHook:
    """Watches the micro-batches of a train_step (gradient-flow analysis). The defaults do nothing."""

    def forward(self) -> AbstractContextManager:
        """A context around each micro-batch's forward pass (to record what it routes)."""
        return nullcontext()

    def after_backward(self, out: GPTOutput, weight: float) -> None:
        """Called after each micro-batch's backward; `weight` is the micro-batch's share of the
        step's loss (its gradients were scaled by it)."""


def forward_backward(tr: Trainer, x: Tensor, y: Tensor, hook: StepHook | None = None) -> dict[str, float]:
    """Forward and backward of this process's share of the global batch (x, y [B, S]) in
    micro-batches, gradients accumulated into .grad as the gradient of the share's mean loss.
    Returns the share's mean loss and auxiliary losses (not yet averaged over processes)."""
    layout, local = tr.layout, tr.local_batch
    mine = slice(layout.rank * local, (layout.rank + 1) * local)
    pieces = list(zip(x[mine].split(tr.micro), y[mine].split(tr.micro)))
    logs = {"loss": 0.0}
    for i, (xm, ym) in enumerate(pieces):
        weight = xm.shape[0] / local
        accumulate = layout.world > 1 and i < len(pieces) - 1
        with gradient_sync_paused(tr.ddp, layout) if accumulate else nullcontext():  # reduce after the last
            with tr.autocast(), hook.forward() if hook else nullcontext():
                out = tr.ddp(xm.to(tr.device, non_blocking=True), ym.to(tr.device, non_blocking=True))
            ((out.loss + out.aux_loss) * weight).backward()
        if hook:
            hook.after_backward(out, weight)
        logs["loss"] += out.loss.item() * weight
        for name, value in out.aux.items():
            logs[name] = logs.get(name, 0.0) + value.item() * weight
    return logs


def train_step(tr: Trainer, hook: StepHook | None = None) -> dict:
    """One optimiser step: the schedule's learning rate, a global batch in micro-batches with
    gradient accumulation, the expert-gradient reduction, clipping to the global norm, the
    optimiser step and the router-bias update. Returns the step's metrics row (without
    validation numbers or routing statistics: evaluate_and_log adds those to the rows it logs)."""
    t, layout, model = tr.cfg.train, tr.layout, tr.model
    t0 = time.time()
    lr = lr_at(tr.step, t)  # looked up here, once per step (the SIGKILL test hooks it)
    set_lr(tr.optimizer, lr)
    if tr.cfg.data.sampling == "epochs":  # the same on every process
        x, y = tr.train_data.epoch_batch(tr.step, t.batch_size, tr.cfg.model.block_size, t.seed)
    else:
        x, y = tr.train_data.sample_batch(t.batch_size, tr.cfg.model.block_size, tr.data_gen)
    reset_a2a_bytes(model)
    logs = all_mean(forward_backward(tr, x, y, hook), layout)
    reduce_expert_grads(model, layout)
    grad_norm = clip_grad_norm(model, layout, t.grad_clip or float("inf"))
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    sync_router_loads(model, layout)
    model.update_router_biases()
    tr.step += 1
    row = {"step": tr.step, "tokens": tr.step * tr.tokens_per_step, **logs, "lr": lr, "grad_norm": float(grad_norm),
           "tokens_per_s": tr.tokens_per_step / (time.time() - t0), **step_metrics(model, layout)}
    return row


