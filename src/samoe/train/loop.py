"""The training loop and its run directory.

    run_dir/config.yaml        resolved config (vocab size set from the tokenizer, data path absolute)
    run_dir/tokenizer.json     the tokenizer trained on the training split
    run_dir/metrics.jsonl      one JSON object per logged step (val_* on evaluation steps)
    run_dir/checkpoints/       see train/checkpoint.py
    run_dir/summary.json       parameter counts, tokens, training FLOPs and PF-days, wall time, final
                               validation metrics

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
from tqdm import tqdm

from samoe.analysis.flops import run_summary_flops
from samoe.analysis.params import count_params
from samoe.config import Config, load_config, save_config
from samoe.data.prepare import load_splits
from samoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from samoe.errors import CheckpointError
from samoe.eval.perplexity import evaluate
from samoe.fileio import write_text_atomic
from samoe.model.gpt import GPT
from samoe.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from samoe.train.optim import build_optimizer, lr_at

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("train.device = 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def autocast_for(cfg: Config, device: torch.device):
    """A context-manager factory: bf16 autocast when train.dtype = bfloat16, else a no-op."""
    if cfg.train.dtype == "bfloat16":
        return partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return nullcontext


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a samoe run directory (no {CONFIG_FILE})")
    return load_config(path, overrides=overrides)


def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    gen.set_state(state["data"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metrics rows of steps <= step (those the checkpoint has seen)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(r + "\n" for r in rows))


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) the run in run_dir; return the summary written to summary.json."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
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
    splits = load_splits(cfg.data, cfg.model.vocab_size, tokenizer)
    for stream in (splits.train, splits.val):  # too little data: fail before writing anything
        stream.num_eval_windows(cfg.model.block_size)
    cfg.model.vocab_size = splits.tokenizer.vocab_size
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        splits.tokenizer.save(run_dir / TOKENIZER_FILE)
        save_config(cfg, run_dir / CONFIG_FILE)

    torch.manual_seed(cfg.train.seed)
    data_gen = torch.Generator().manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    if cfg.model.moe.hash_map == "balanced" and not resume:
        model.set_token_frequencies(torch.from_numpy(np.bincount(splits.train.tokens, minlength=cfg.model.vocab_size)))
    optimizer = build_optimizer(model, cfg.train, fused=device.type == "cuda")
    step = 0
    metrics_path = run_dir / METRICS_FILE
    if resume:
        state = load_checkpoint(ckpt, model, device)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint '{ckpt}' has an unusable optimiser state: {e}") from None
        _set_rng_state(state["rng"], data_gen)
        step = int(state["step"])
        _truncate_metrics(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()

    t = cfg.train
    autocast = autocast_for(cfg, device)
    micro = t.micro_batch_size or t.batch_size
    tokens_per_step = t.batch_size * cfg.model.block_size
    token_bytes = splits.tokenizer.token_bytes()
    params = count_params(model)
    evaluate_val = partial(evaluate, model, splits.val, token_bytes, micro, t.eval_tokens, autocast)

    print(f"run directory: {run_dir}", file=sys.stderr)  # only now: a user error above prints one line
    model.train()
    start, wall0 = step, time.time()
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    last_val: dict = {}
    with open(metrics_path, "a") as metrics:
        while step < t.max_steps:
            t0 = time.time()
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = splits.train.sample_batch(t.batch_size, cfg.model.block_size, data_gen)
            logs = {"loss": 0.0}
            for xm, ym in zip(x.split(micro), y.split(micro)):
                with autocast():
                    out = model(xm.to(device, non_blocking=True), ym.to(device, non_blocking=True))
                ((out.loss + out.aux_loss) * (xm.shape[0] / t.batch_size)).backward()
                logs["loss"] += out.loss.item() * xm.shape[0] / t.batch_size
                for name, value in out.aux.items():
                    logs[name] = logs.get(name, 0.0) + value.item() * xm.shape[0] / t.batch_size
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_router_biases()
            step += 1
            row = {"step": step, "tokens": step * tokens_per_step, **logs, "lr": lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_step / (time.time() - t0),
                   **model.routing_stats()}
            if step % t.eval_every == 0 or step == t.max_steps:
                last_val = evaluate_val()
                row.update({k: last_val[k] for k in ("val_loss", "val_ppl", "val_bpb")})
                bar.write(f"step {step}: val_loss {last_val['val_loss']:.4f}  val_ppl {last_val['val_ppl']:.2f}  "
                          f"(unigram ppl {last_val['unigram_ppl']:.1f})")
            if step % t.log_every == 0 or "val_loss" in row or step == t.max_steps:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if step % t.ckpt_every == 0 or step == t.max_steps:
                save_checkpoint(run_dir, step, model,
                                {"optimizer": optimizer.state_dict(), "rng": _rng_state(data_gen)})
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
    }
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def load_trained(run_dir: str | Path, device: str = "auto", overrides: list[str] = ()):
    """(config, model in eval mode, tokenizer) of a run directory, from its latest checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    dev = resolve_device(device)
    model = GPT(cfg.model).to(dev)
    load_checkpoint(latest_checkpoint(run_dir), model, dev)
    return cfg, model.eval(), tokenizer
