"""Checkpoints that load without executing code and survive a kill at any moment.

Layout under a run directory:

    checkpoints/step-000200/model.safetensors   weights and persistent buffers
    checkpoints/step-000200/state.pt            optimiser, RNG states, step (weights_only load)
    checkpoints/latest                          name of the newest complete checkpoint

A checkpoint is written into a temporary directory, renamed into place, and only then does
`latest` (replaced atomically) point at it, so a kill during a write leaves the previous
checkpoint loadable. Older checkpoints beyond `keep` are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from samoe.errors import CheckpointError
from samoe.fileio import write_text_atomic

WEIGHTS, STATE, LATEST = "model.safetensors", "state.pt", "latest"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict, keep: int = 2) -> Path:
    """Write weights + `state` (tensors, numbers, strings, dicts of those) for `step`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        save_model(model, str(tmp / WEIGHTS))
        torch.save({**state, "step": step}, tmp / STATE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    """The directory `latest` points at; CheckpointError if there is none."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"run directory '{run_dir}' has no checkpoint (no {pointer.relative_to(run_dir)})")
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' named by '{pointer}' does not exist")
    return path


def load_checkpoint(path: Path, model: nn.Module, device: torch.device | str = "cpu") -> dict:
    """Load weights into model (strictly: same keys and shapes) and return the state dict."""
    path = Path(path)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights '{path / WEIGHTS}' are corrupt or unreadable: {first_line(e)}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{path}' does not match the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    try:
        return torch.load(path / STATE, map_location=device, weights_only=True)
    except Exception as e:  # truncated pickle, zip errors, not a torch file
        raise CheckpointError(f"checkpoint state '{path / STATE}' is corrupt or unreadable: {first_line(e)}") from None


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
