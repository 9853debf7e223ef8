"""Checkpoints that load without executing code and survive a kill at any moment.

Layout under a run directory:

    checkpoints/step-000200/model.safetensors   weights and persistent buffers
    checkpoints/step-000200/state.pt            optimiser, RNG states, step (weights_only load)
    checkpoints/latest                          name of the newest complete checkpoint

A checkpoint is written into a temporary directory, renamed into place, and only then does
`latest` (replaced atomically) point at it, so a kill during a write leaves the previous
checkpoint loadable. Older checkpoints beyond `keep` are removed afterwards. A write that
fails (a full disk, a directory that cannot be written) is a CheckpointError naming the path
and the checkpoint that was kept.

Loading verifies both files before using either: state.pt's zip CRC-32s and the SHA-256 of
model.safetensors that state.pt records, so flipped or missing bytes give a CheckpointError
rather than silently wrong weights (safetensors and torch.load check neither).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, save_model
from torch import Tensor, nn

from samoe.errors import CheckpointError
from samoe.fileio import write_text_atomic

WEIGHTS, STATE, LATEST = "model.safetensors", "state.pt", "latest"


def save_checkpoint(run_dir: Path, step: int, weights: nn.Module | dict[str, Tensor], state: dict,
                    keep: int = 2) -> Path:
    """Write weights (a model, or its tensors by name with tied ones once) + `state` (tensors,
    numbers, strings, dicts of those) for `step`. CheckpointError if it cannot be written."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    try:
        return _save(root, final, step, weights, state, keep)
    except (OSError, SafetensorError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tensors = weights.state_dict() if isinstance(weights, nn.Module) else weights
        raise write_error(final, e, run_dir, _nbytes(tensors) + _nbytes(state)) from None


def _nbytes(obj) -> int:
    """Bytes of the tensors in obj (a tensor, or dicts, lists and tuples of them)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem of path's nearest existing ancestor (None if unknown)."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def write_error(path: Path, e: Exception, run_dir: Path, needed: int | None = None) -> CheckpointError:
    """The one-line error for a failed write under run_dir: the path, the reason, what was kept.
    A full disk is named as such whichever layer reported it (an OSError's ENOSPC, or torch.save's
    zip writer, which says only "unexpected pos"), with the free space and, when known, what the
    checkpoint needs."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    try:
        kept = f"the previous checkpoint '{pointer.parent / pointer.read_text().strip()}' is kept"
    except OSError:
        kept = "no checkpoint had been written yet"
    reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
    free = _free_bytes(Path(path))
    full = ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e)
            or (needed is not None and free is not None and free < needed))
    if full:
        reason = os.strerror(errno.ENOSPC) + ("" if free is None else f" ({free / 1e6:,.0f} MB free") + (
            "" if free is None else (f"; the checkpoint needs about {needed / 1e6:,.0f} MB)" if needed else ")"))
    return CheckpointError(f"could not write '{path}': {reason}; {kept}")


def _save(root: Path, final: Path, step: int, weights: nn.Module | dict[str, Tensor], state: dict,
          keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for debris in root.glob(".step-*.tmp"):  # left by a writer that was killed
        shutil.rmtree(debris, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if isinstance(weights, nn.Module):
            save_model(weights, str(tmp / WEIGHTS))
        else:
            save_file(weights, str(tmp / WEIGHTS))
        torch.save({**state, "step": step, "weights_sha256": _sha256(tmp / WEIGHTS)}, tmp / STATE)
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


def load_checkpoint(path: Path, model: nn.Module, device: torch.device | str = "cpu",
                    reshard: Callable[[str, Tensor], Tensor] | None = None) -> dict:
    """Verify the checkpoint, load weights into model (strictly: same keys and shapes) and
    return the state dict. CheckpointError if either file is corrupt, truncated or missing.

    Weights are read one tensor at a time; `reshard(name, tensor)` may cut each to what this
    process holds (expert parallelism)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path / STATE) as z:  # torch.load does not check the CRC-32s
            bad = z.testzip()
        if bad is not None:
            raise ValueError(f"CRC-32 mismatch in {bad}")
        state = torch.load(path / STATE, map_location=device, weights_only=True)
    except Exception as e:  # truncated or flipped bytes, zip errors, not a torch file
        raise CheckpointError(f"checkpoint state '{path / STATE}' is corrupt or unreadable: {first_line(e)}") from None
    try:
        expected = state.get("weights_sha256") if isinstance(state, dict) else None
        if expected is not None and _sha256(path / WEIGHTS) != expected:
            raise ValueError("SHA-256 differs from the one recorded in state.pt")
        _load_weights(path / WEIGHTS, model, reshard or (lambda name, t: t))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights '{path / WEIGHTS}' are corrupt or unreadable: "
                              f"{first_line(e)}") from None
    return state


def _load_weights(file: Path, model: nn.Module, reshard: Callable[[str, Tensor], Tensor]) -> None:
    """Copy each stored tensor into the model's. A model tensor the file lacks is fine when it
    shares storage with a stored one (tied weights are stored once)."""
    own = model.state_dict()  # parameters (detached, same storage) and persistent buffers
    with safe_open(str(file), framework="pt") as f:
        stored = set(f.keys())
        ptrs = {own[n].data_ptr() for n in stored if n in own}
        missing = sorted(n for n in own if n not in stored and own[n].data_ptr() not in ptrs)
        unexpected = sorted(stored - own.keys())
        if missing or unexpected:
            raise CheckpointError(f"checkpoint '{file.parent}' does not match the model: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        for name in sorted(stored):
            tensor = reshard(name, f.get_tensor(name))
            if tensor.shape != own[name].shape:
                raise CheckpointError(f"checkpoint '{file.parent}' does not match the model: {name} has shape "
                                      f"{list(tensor.shape)}, the model {list(own[name].shape)}")
            own[name].copy_(tensor)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
