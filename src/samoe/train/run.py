"""A training run: it writes the run directory described in samoe/runs.py.

One optimiser step consumes `train.batch_size` sequences of `model.block_size` tokens (the
global batch), split into micro-batches of `train.micro_batch_size` for gradient accumulation.
Resuming restores weights, optimiser, RNG and data-sampler state and truncates metrics.jsonl to
the checkpoint, so a resumed run logs the same values as an uninterrupted one.

A run is five steps: set_up (data, model, optimiser, resume), then per optimiser step
train_step (samoe.train.loop), evaluate_and_log and (when due) save, and at the end summarise.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from samoe.checkpoint import (
    is_sharded,
    latest_checkpoint,
    load_sharded,
    open_checkpoint,
    read_full_tensors,
    save_checkpoint,
    save_sharded,
    write_error,
)
from samoe.config import Config
from samoe.config_load import save_config
from samoe.data.prepare import Splits, load_splits
from samoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from samoe.errors import CheckpointError
from samoe.fileio import write_text_atomic
from samoe.malloc import release_freed_memory
from samoe.model.flops import run_summary_flops
from samoe.model.gpt import GPT
from samoe.model.params import count_config_params
from samoe.runs import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, resolve_device
from samoe.train.distributed import (
    Layout,
    all_sum,
    expert_axes,
    gather_rng_states,
    init_layout,
    parallelize,
    run_on_main,
    seed_process,
    shutdown,
)
from samoe.train.loop import Trainer, new_trainer, train_step
from samoe.train.optim import param_groups
from samoe.train.perplexity import evaluate
from samoe.train.state import checkpoint_tensors, init_optimizer_state, load_full_checkpoint
from samoe.train.tracking import Trackers, check_installed, model_extras
from samoe.train.upcycle import check_fits as check_upcycle_fits
from samoe.train.upcycle import load_dense_source, upcycle


def _rng_state(gen: torch.Generator, layout: Layout) -> dict:
    state = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    by_rank = gather_rng_states(layout)
    if by_rank is not None:
        state["torch_by_rank"] = by_rank
    if torch.cuda.is_available() and layout.world == 1:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator, layout: Layout) -> None:
    """Restore the data sampler (the same on every process) and this process's torch RNG: its
    own when the run had as many processes, else process 0's stream on process 0."""
    by_rank = state.get("torch_by_rank")
    if by_rank is not None and len(by_rank) == layout.world:
        torch.set_rng_state(by_rank[layout.rank].cpu())
    elif layout.is_main:
        torch.set_rng_state(state["torch"].cpu())
    gen.set_state(state["data"].cpu())
    if "cuda" in state and torch.cuda.is_available() and layout.world == 1:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _open_metrics(path: Path, run_dir: Path):
    try:
        return open(path, "a")
    except OSError as e:
        raise write_error(path, e, run_dir) from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metrics rows of steps <= step (those the checkpoint has seen)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        try:
            write_text_atomic(path, "".join(r + "\n" for r in rows))
        except OSError as e:
            raise write_error(path, e, path.parent) from None


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True,
          init_from: str | Path | None = None, init_noise: float = 0.0) -> dict:
    """Train (or resume) the run in run_dir; return the summary written to summary.json.

    Under torchrun (WORLD_SIZE > 1) this is one process of a data + expert parallel run
    (train/distributed.py); the main process writes the run directory. `init_from`: a dense
    run or samoe-hf export to upcycle the new model from (train/upcycle.py), with relative
    expert noise `init_noise`.

    The run is five steps: set_up (data, model, optimiser, resume), then per optimiser step
    train_step, evaluate_and_log and (when due) save, and at the end summarise."""
    check_installed(cfg.train.loggers)  # a missing extra is one line, before any process starts work
    joined = dist.is_initialized()
    layout, device = init_layout(cfg, resolve_device(cfg.train.device))
    try:
        run = set_up(cfg, Path(run_dir), resume, layout, device, init_from, init_noise)
        release_freed_memory()  # what reading the data freed: training never needs that much again
        return _run(run, progress)
    finally:
        if not joined:
            shutdown(layout)


# --------------------------------------------------------------------------- a run


@dataclass
class Run:
    """A run being trained: its directory, trainer, data splits, and what the summary needs."""

    run_dir: Path
    trainer: Trainer
    splits: Splits
    params: dict
    token_bytes: np.ndarray  # [V] UTF-8 bytes per token, for bits per byte
    trackers: Trackers | None = None  # TensorBoard / W&B, on the main process (train.loggers)

    def evaluate(self) -> dict:
        """Validation loss, perplexity and bits per byte, shared over the processes."""
        tr = self.trainer
        return evaluate(tr.model, self.splits.val, self.token_bytes, tr.micro,
                        tr.cfg.train.eval_tokens, tr.autocast, shard=(tr.layout.rank, tr.layout.world),
                        all_sum=partial(all_sum, layout=tr.layout), spread=tr.cfg.train.eval_windows == "spread")


def restore(tr: Trainer, ckpt: Path) -> None:
    """Continue from checkpoint `ckpt`, of either format and any layout: the weights and
    optimiser state (each process reading its share), the RNG and data-sampler state, the step."""
    init_optimizer_state(tr.optimizer)
    tensors = checkpoint_tensors(tr.model, tr.optimizer, tr.layout)
    if is_sharded(ckpt):
        state = load_sharded(ckpt, tensors)
    else:
        state = open_checkpoint(ckpt)
        try:
            with read_full_tensors(ckpt) as weights:
                order = [p for g in param_groups(tr.model, tr.cfg.train, tr.cfg.model.moe.pool.lr_scale)
                         for p in g["params"]]
                load_full_checkpoint(tensors, weights, state["optimizer"], tr.model, order)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint '{ckpt}' does not match the model: {e}") from None
    _set_rng_state(state["rng"], tr.data_gen, tr.layout)
    tr.step = int(state["step"])


def set_up(cfg: Config, run_dir: Path, resume: bool, layout: Layout, device: torch.device,
           init_from: str | Path | None = None, init_noise: float = 0.0) -> Run:
    """Read or start the run directory, load the data, build the model (upcycled from
    `init_from`, or restored from the latest checkpoint when resuming) and its trainer."""
    main = layout.is_main
    source = None
    if init_from is not None and not resume:  # upcycling: the source's tokenizer, checked before any write
        source = load_dense_source(init_from)
        cfg.model.vocab_size = source.tokenizer.vocab_size
        check_upcycle_fits(cfg.model, source)
    if resume:
        tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
        ckpt = latest_checkpoint(run_dir)
    elif (run_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"run directory '{run_dir}' already holds a run; pass --resume to continue "
                              "it or choose another --out")
    if cfg.data.path is not None:
        cfg.data.path = str(Path(cfg.data.path).resolve())
    layout.barrier()  # every process has looked at run_dir before the main one writes to it

    def load_data(tokenizer):
        splits = load_splits(cfg.data, cfg.model.vocab_size, tokenizer)
        for stream in (splits.train, splits.val):  # too little data: fail before writing anything
            stream.num_eval_windows(cfg.model.block_size)
        return splits

    def start_run():  # the main process trains the tokenizer and writes the run's first files
        splits = load_data(source.tokenizer if source is not None else None)
        cfg.model.vocab_size = splits.tokenizer.vocab_size
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            splits.tokenizer.save(run_dir / TOKENIZER_FILE)
            save_config(cfg, run_dir / CONFIG_FILE)
        except OSError as e:
            raise write_error(run_dir, e, run_dir) from None
        return splits

    if resume:
        splits = load_data(tokenizer)
    else:  # the other processes wait for the main one, then read its tokenizer
        splits = run_on_main(layout, start_run)
        if not main:
            splits = load_data(load_tokenizer(run_dir / TOKENIZER_FILE))
    cfg.model.vocab_size = splits.tokenizer.vocab_size

    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)  # drawn whole on every process, then sharded
    if source is not None:
        upcycle(model, source, init_noise, cfg.train.seed)
    if cfg.model.moe.hash_map == "balanced" and not resume:
        model.set_token_frequencies(torch.from_numpy(np.bincount(splits.train.tokens, minlength=cfg.model.vocab_size)))
    model = parallelize(model, layout)
    seed_process(cfg.train.seed, layout)
    tr = new_trainer(cfg, model, splits.train, layout)
    metrics_path = run_dir / METRICS_FILE
    if resume:
        restore(tr, ckpt)
        if main:
            _truncate_metrics(metrics_path, tr.step)
    elif main and metrics_path.exists():
        metrics_path.unlink()
    params = count_config_params(cfg.model)  # the whole model's, whatever this process holds
    return Run(run_dir, tr, splits, params, splits.tokenizer.token_bytes())


def evaluate_and_log(run: Run, row: dict, metrics, bar: tqdm) -> dict | None:
    """Evaluate when due (adding val_* to the row) and append the row to metrics.jsonl when due
    (the main process holds `metrics`, the open file). Returns the evaluation, or None."""
    tr, t = run.trainer, run.trainer.cfg.train
    step, val = tr.step, None
    due = step % t.eval_every == 0 or step == t.max_steps
    logged = metrics is not None and (due or step % t.log_every == 0)
    extras = None
    if due or step % t.log_every == 0:  # the training step's routing: taken before evaluation routes other tokens
        row.update(tr.model.routing_stats())
        if run.trackers.wants_extras:  # on every process: the coefficients may be sharded
            extras = model_extras(tr.model)
    if due:
        val = run.evaluate()
        row.update({k: val[k] for k in ("val_loss", "val_ppl", "val_bpb")})
        if tr.layout.is_main:
            bar.write(f"step {step}: val_loss {val['val_loss']:.4f}  val_ppl {val['val_ppl']:.2f}  "
                      f"(unigram ppl {val['unigram_ppl']:.1f})")
    if logged:
        try:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        except OSError as e:
            raise write_error(Path(metrics.name), e, run.run_dir) from None
        run.trackers.log(step, row, extras)
    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
    bar.update(1)
    return val


def save(run: Run) -> None:
    """A checkpoint of the step just taken: weights, optimiser, RNG and sampler state. One
    process writes today's one-file format; more write a sharded checkpoint, each its share."""
    tr, layout = run.trainer, run.trainer.layout
    rng = _rng_state(tr.data_gen, layout)
    if layout.world == 1:
        save_checkpoint(run.run_dir, tr.step, tr.model, {"optimizer": tr.optimizer.state_dict(), "rng": rng})
        return
    init_optimizer_state(tr.optimizer)  # a parameter no token has reached yet: its zero state, stored too
    meta = {"layout": {"processes": layout.world, "ep": tr.cfg.train.ep, "fsdp": layout.fsdp is not None},
            "expert_axes": expert_axes(tr.model)}
    save_sharded(run.run_dir, tr.step, checkpoint_tensors(tr.model, tr.optimizer, layout), {"rng": rng}, meta)


def summarise(run: Run, val: dict, start: int, wall_s: float) -> dict:
    """summary.json (written by the main process): parameters, tokens, FLOPs, wall time and the
    final validation numbers."""
    tr, t = run.trainer, run.trainer.cfg.train
    tokens = tr.step * tr.tokens_per_step
    summary = {
        "params": run.params,
        "steps": tr.step,
        "tokens": tokens,
        **run_summary_flops(tr.cfg, tokens),  # train_flops_per_token, train_flops, pf_days
        "wall_s": round(wall_s, 3),
        "steps_this_session": tr.step - start,
        **{k: val[k] for k in ("val_loss", "val_ppl", "val_bpb", "unigram_ppl", "val_tokens")},
        "device": str(tr.device),
        "processes": tr.layout.world,
        "ep": t.ep,
        "fsdp": t.fsdp and tr.layout.world > 1,
    }
    coefficients = tr.model.pool_coefficients()
    if coefficients is not None:
        summary["pool_coefficients"] = coefficients
    if tr.layout.is_main:
        try:
            write_text_atomic(run.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        except OSError as e:
            raise write_error(run.run_dir / SUMMARY_FILE, e, run.run_dir) from None
    return summary


def _run(run: Run, progress: bool) -> dict:
    tr, t, main = run.trainer, run.trainer.cfg.train, run.trainer.layout.is_main
    if main:  # only now: a user error above prints one line
        print(f"run directory: {run.run_dir}"
              + (f" ({tr.layout.world} processes, ep = {t.ep})" if tr.layout.world > 1 else ""), file=sys.stderr)
    tr.model.train()
    start, wall0 = tr.step, time.time()
    bar = tqdm(total=t.max_steps, initial=tr.step, desc="train", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    last_val: dict = {}
    metrics = _open_metrics(run.run_dir / METRICS_FILE, run.run_dir) if main else None
    run.trackers = Trackers(tr.cfg, run.run_dir, tr.step, main)
    try:
        while tr.step < t.max_steps:
            row = train_step(tr)
            last_val = evaluate_and_log(run, row, metrics, bar) or last_val
            if tr.step % t.ckpt_every == 0 or tr.step == t.max_steps:
                save(run)
    finally:
        run.trackers.close()
        if metrics is not None:
            try:
                metrics.close()
            except OSError:  # every row was flushed, or the write error above says what was lost
                pass
    bar.close()
    if not last_val:  # resumed a finished run
        last_val = run.evaluate()
    return summarise(run, last_val, start, time.time() - wall0)


def format_summary(summary: dict, run_dir: str | Path) -> str:
    """The one line `samoe train` ends with."""
    return (f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.0f}s; "
            f"val_loss {summary['val_loss']:.4f}, val_ppl {summary['val_ppl']:.2f}, val_bpb {summary['val_bpb']:.3f} "
            f"(unigram ppl {summary['unigram_ppl']:.1f}); results in {run_dir}")
