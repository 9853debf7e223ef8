"""The training loop; it writes the run directory described in samoe/runs.py.

One optimiser step consumes `train.batch_size` sequences of `model.block_size` tokens (the
global batch), split into micro-batches of `train.micro_batch_size` for gradient accumulation.
Resuming restores weights, optimiser, RNG and data-sampler state and truncates metrics.jsonl to
the checkpoint, so a resumed run logs the same values as an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from samoe.analysis.flops import run_summary_flops
from samoe.analysis.params import count_config_params
from samoe.config import Config, micro_batch, save_config
from samoe.data.prepare import load_splits
from samoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from samoe.errors import CheckpointError
from samoe.eval.perplexity import evaluate
from samoe.fileio import write_text_atomic
from samoe.model.gpt import GPT
from samoe.runs import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, autocast_for, resolve_device
from samoe.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_error
from samoe.train.distributed import (
    Layout,
    all_mean,
    all_sum,
    clip_grad_norm,
    expert_axes,
    full_optimizer_state,
    full_weights,
    gather_rng_states,
    init_layout,
    reduce_expert_grads,
    reset_a2a_bytes,
    reshard,
    run_on_main,
    seed_process,
    shard_optimizer_state,
    shutdown,
    step_a2a_bytes,
    sync_router_loads,
    wrap_ddp,
)
from samoe.train.optim import build_optimizer, lr_at, set_lr
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
    expert noise `init_noise`."""
    joined = dist.is_initialized()
    layout, device = init_layout(cfg, resolve_device(cfg.train.device))
    try:
        return _train(cfg, Path(run_dir), resume, progress, layout, device, init_from, init_noise)
    finally:
        if not joined:
            shutdown(layout)


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool, layout: Layout, device: torch.device,
           init_from: str | Path | None = None, init_noise: float = 0.0) -> dict:
    main = layout.is_main
    source = None
    if init_from is not None and not resume:  # upcycling: the source's tokenizer, checked before any write
        source = load_dense_source(init_from)
        cfg.model.vocab_size = source.tokenizer.vocab_size
        check_upcycle_fits(cfg.model, source)
    if resume:
        tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
        ckpt = latest_checkpoint(run_dir)
    else:
        if (run_dir / CONFIG_FILE).exists():
            raise CheckpointError(f"run directory '{run_dir}' already holds a run; pass --resume to continue "
                                  "it or choose another --out")
        tokenizer = None
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
    data_gen = torch.Generator().manual_seed(cfg.train.seed)
    model = GPT(cfg.model, layout.ep).to(device)  # identical on every process but for the expert shards
    layout.expert_axes = expert_axes(model) if layout.ep is not None else {}
    if source is not None:
        upcycle(model, source, init_noise, cfg.train.seed, reshard(layout))
    if cfg.model.moe.hash_map == "balanced" and not resume:
        model.set_token_frequencies(torch.from_numpy(np.bincount(splits.train.tokens, minlength=cfg.model.vocab_size)))
    params = count_config_params(cfg.model)  # the whole model's, whatever this process holds
    if resume:
        state = load_checkpoint(ckpt, model, device, reshard(layout))
    seed_process(cfg.train.seed, layout)
    ddp = wrap_ddp(model, layout, device)
    optimizer = build_optimizer(model, cfg.train, fused=device.type == "cuda",
                                coef_lr_scale=cfg.model.moe.pool.lr_scale)
    step = 0
    metrics_path = run_dir / METRICS_FILE
    if resume:
        try:
            optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], optimizer, model, layout))
        except (KeyError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint '{ckpt}' has an unusable optimiser state: {e}") from None
        _set_rng_state(state["rng"], data_gen, layout)
        step = int(state["step"])
        if main:
            _truncate_metrics(metrics_path, step)
    elif main and metrics_path.exists():
        metrics_path.unlink()

    t = cfg.train
    autocast = autocast_for(cfg, device)
    local_batch = t.batch_size // layout.world  # this process's share of the global batch
    micro = micro_batch(t, layout.world)
    tokens_per_step = t.batch_size * cfg.model.block_size
    token_bytes = splits.tokenizer.token_bytes()
    evaluate_val = partial(evaluate, model, splits.val, token_bytes, micro, t.eval_tokens, autocast,
                           shard=(layout.rank, layout.world), all_sum=partial(all_sum, layout=layout))

    if main:  # only now: a user error above prints one line
        print(f"run directory: {run_dir}" + (f" ({layout.world} processes, ep = {t.ep})" if layout.world > 1 else ""),
              file=sys.stderr)
    model.train()
    start, wall0 = step, time.time()
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    last_val: dict = {}
    metrics = _open_metrics(metrics_path, run_dir) if main else None
    try:
        while step < t.max_steps:
            t0 = time.time()
            lr = lr_at(step, t)
            set_lr(optimizer, lr)
            x, y = splits.train.sample_batch(t.batch_size, cfg.model.block_size, data_gen)  # the same on every process
            mine = slice(layout.rank * local_batch, (layout.rank + 1) * local_batch)
            pieces = list(zip(x[mine].split(micro), y[mine].split(micro)))
            reset_a2a_bytes(model)
            logs = {"loss": 0.0}
            for i, (xm, ym) in enumerate(pieces):
                accumulate = layout.world > 1 and i < len(pieces) - 1
                with ddp.no_sync() if accumulate else nullcontext():  # DDP reduces once, after the last
                    with autocast():
                        out = ddp(xm.to(device, non_blocking=True), ym.to(device, non_blocking=True))
                    ((out.loss + out.aux_loss) * (xm.shape[0] / local_batch)).backward()
                logs["loss"] += out.loss.item() * xm.shape[0] / local_batch
                for name, value in out.aux.items():
                    logs[name] = logs.get(name, 0.0) + value.item() * xm.shape[0] / local_batch
            logs = all_mean(logs, layout)
            if layout.ep is not None:
                reduce_expert_grads(model, layout)
            grad_norm = clip_grad_norm(model, layout, t.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync_router_loads(model, layout)
            model.update_router_biases()
            step += 1
            row = {"step": step, "tokens": step * tokens_per_step, **logs, "lr": lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_step / (time.time() - t0),
                   **model.routing_stats()}
            if layout.ep is not None:
                row["a2a_bytes"] = step_a2a_bytes(model, layout)
            if step % t.eval_every == 0 or step == t.max_steps:
                last_val = evaluate_val()
                row.update({k: last_val[k] for k in ("val_loss", "val_ppl", "val_bpb")})
                if main:
                    bar.write(f"step {step}: val_loss {last_val['val_loss']:.4f}  val_ppl {last_val['val_ppl']:.2f}  "
                              f"(unigram ppl {last_val['unigram_ppl']:.1f})")
            if main and (step % t.log_every == 0 or "val_loss" in row or step == t.max_steps):
                try:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                except OSError as e:
                    raise write_error(metrics_path, e, run_dir) from None
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if step % t.ckpt_every == 0 or step == t.max_steps:
                state = {"optimizer": full_optimizer_state(optimizer, model, layout),
                         "rng": _rng_state(data_gen, layout)}
                weights = full_weights(model, layout)
                if main:
                    save_checkpoint(run_dir, step, weights, state)
                layout.barrier()
    finally:
        if metrics is not None:
            try:
                metrics.close()
            except OSError:  # every row was flushed, or the write error above says what was lost
                pass
    bar.close()
    if not last_val:  # resumed a finished run
        last_val = evaluate_val()
    summary = {
        "params": params,
        "steps": step,
        "tokens": step * tokens_per_step,
        **run_summary_flops(cfg, step * tokens_per_step),  # train_flops_per_token, train_flops, pf_days
        "wall_s": round(time.time() - wall0, 3),
        "steps_this_session": step - start,
        **{k: last_val[k] for k in ("val_loss", "val_ppl", "val_bpb", "unigram_ppl", "val_tokens")},
        "device": str(device),
        "processes": layout.world,
        "ep": t.ep,
    }
    if main:
        try:
            write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        except OSError as e:
            raise write_error(run_dir / SUMMARY_FILE, e, run_dir) from None
    return summary

