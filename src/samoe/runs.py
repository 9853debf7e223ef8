"""A run directory: its file names and readers, its config, the device and autocast it runs
with, and loading a trained run. It sits below train, eval, analysis and study (which all
read runs) and above model and checkpoint.py (the checkpoint format).

    run_dir/config.yaml        resolved config (vocab size set from the tokenizer, data path absolute)
    run_dir/tokenizer.json     the tokenizer trained on the training split
    run_dir/metrics.jsonl      one JSON object per logged step (val_* on evaluation steps)
    run_dir/checkpoints/       see checkpoint.py
    run_dir/summary.json       parameter counts, tokens, training FLOPs and PF-days, wall time, final
                               validation metrics
"""

from __future__ import annotations

import gzip
import json
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from samoe.checkpoint import latest_checkpoint, load_checkpoint
from samoe.config import Config
from samoe.config_load import load_config
from samoe.data.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, load_tokenizer
from samoe.errors import CheckpointError
from samoe.model.gpt import GPT

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"


def read_json(path: str | Path) -> dict:
    """A JSON file of a run directory; CheckpointError naming it when missing or damaged."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"'{path}' does not exist") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' cannot be read as JSON: {e}") from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, or of its gzipped copy metrics.jsonl.gz (one per logged
    step), in order. A last line without
    its newline is a row being written by a run in flight (a study reads its runs while they
    train) and is left out."""
    path = Path(run_dir) / METRICS_FILE
    packed = path.with_name(METRICS_FILE + ".gz")  # a committed record of a finished run (results/)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif packed.is_file():
        text = gzip.decompress(packed.read_bytes()).decode("utf-8")
    else:
        raise CheckpointError(f"'{run_dir}' has no {METRICS_FILE}: not a samoe run directory")
    lines = text.split("\n")[:-1]  # the piece after the last newline is empty or half-written
    return [json.loads(line) for line in lines if line.strip()]


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The run's resolved config.yaml, with `overrides` applied; CheckpointError if there is none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a samoe run directory (no {CONFIG_FILE})")
    return load_config(path, overrides=overrides)


def resolve_device(name: str) -> torch.device:
    """auto: cuda when available, else cpu; cuda without a CUDA device is a CheckpointError."""
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


def load_trained(run_dir: str | Path, device: str = "auto",
                 overrides: list[str] = ()) -> tuple[Config, GPT, BPETokenizer | ByteTokenizer]:
    """(config, model in eval mode, tokenizer) of a run directory, from its latest checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    dev = resolve_device(device)
    model = GPT(cfg.model).to(dev)
    load_checkpoint(latest_checkpoint(run_dir), model, dev)
    return cfg, model.eval(), tokenizer
