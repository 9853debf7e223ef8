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

A run of more than one process writes a *sharded* checkpoint instead: a torch.distributed.checkpoint
directory in the same place, every process writing its own shards (no process gathers the model):

    checkpoints/step-000200/__0_0.distcp ...    the tensors by name, each process's pieces
    checkpoints/step-000200/.metadata           DCP's index: which file holds which piece
    checkpoints/step-000200/state.pt            RNG states, step (weights_only load)
    checkpoints/step-000200/manifest.json       the layout that wrote it, expert axes, SHA-256 of every file

Tensor names are the model's (`model.<name>`) and the optimiser's (`optim.<name>.exp_avg`, ...);
an expert tensor is stored one expert at a time (`<name>@<e>`, e the global expert id), so the
pieces a process needs are found whichever experts another layout gave each process. DCP's
planner matches pieces to what the loading processes hold: a sharded checkpoint loads under any
process count, expert-parallel size or FSDP setting, and into a whole model (load_checkpoint).
Its `.metadata` is read by an unpickler that admits only DCP's own metadata classes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, save_model
from torch import Tensor, nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.tensor import DTensor

from samoe.errors import CheckpointError
from samoe.fileio import write_text_atomic

WEIGHTS, STATE, LATEST, MANIFEST = "model.safetensors", "state.pt", "latest", "manifest.json"


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
    if isinstance(obj, DTensor):  # this process's shard
        obj = obj.to_local()
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


def _begin(root: Path, final: Path) -> Path:
    """A fresh temporary directory beside `final` (debris of a killed writer removed first)."""
    root.mkdir(parents=True, exist_ok=True)
    for debris in root.glob(".step-*.tmp"):  # left by a writer that was killed
        shutil.rmtree(debris, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    return tmp


def _commit(root: Path, tmp: Path, final: Path, keep: int) -> Path:
    """fsync tmp's files, rename tmp to final, then point `latest` at it and drop old checkpoints."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save(root: Path, final: Path, step: int, weights: nn.Module | dict[str, Tensor], state: dict,
          keep: int) -> Path:
    tmp = _begin(root, final)
    try:
        if isinstance(weights, nn.Module):
            save_model(weights, str(tmp / WEIGHTS))
        else:
            save_file(weights, str(tmp / WEIGHTS))
        torch.save({**state, "step": step, "weights_sha256": _sha256(tmp / WEIGHTS)}, tmp / STATE)
        return _commit(root, tmp, final, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- sharded checkpoints


def expert_pieces(key: str, local: Tensor, axis: int, experts: list[int]) -> dict[str, Tensor]:
    """A tensor holding experts `experts` (global ids, in order) along `axis`, as one view per
    expert named `key@e`: the names a sharded checkpoint stores expert tensors under."""
    return {f"{key}@{e}": local.select(axis, j) for j, e in enumerate(experts)}


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint directory `path` is a sharded (torch.distributed.checkpoint) one."""
    return (Path(path) / MANIFEST).is_file()


def save_sharded(run_dir: Path, step: int, tensors: dict[str, Tensor], state: dict, meta: dict,
                 keep: int = 2) -> Path:
    """Write a sharded checkpoint for `step`; every process calls this with the tensors it holds
    (DTensors, and expert pieces named by expert_pieces). The main process adds `state` (its
    tensors, numbers and strings) and the manifest (`meta`, the step and every file's SHA-256)
    and makes the directory visible, as save_checkpoint does. CheckpointError on every process
    if any of them could not write."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp, error = None, None
    if rank == 0:
        try:
            tmp = _begin(root, final)
        except OSError as e:
            error = str(write_error(final, e, run_dir))
    tmp, error = _from_main([tmp, error])
    if error:
        raise CheckpointError(error)
    try:
        dcp.save(tensors, storage_writer=FileSystemWriter(tmp, sync_files=False))
        files = sorted(f.name for f in tmp.iterdir())  # each process hashes a share of the files
        hashes = {f: _sha256(tmp / f) for f in files[rank::world]}
    except BaseException as e:  # dcp.save raises on every process when any one failed
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if any(isinstance(x, KeyboardInterrupt) for x in (e, *_dcp_failures(e))):  # Ctrl-C, wrapped by DCP
            raise KeyboardInterrupt from None
        if not isinstance(e, Exception):
            raise
        raise write_error(final, e, run_dir, _nbytes(tensors)) from None
    every = [None] * world if rank == 0 else None
    dist.gather_object(hashes, every, dst=0)
    if rank == 0:
        try:
            torch.save({**state, "step": step}, tmp / STATE)
            files = {k: v for h in every for k, v in h.items()} | {STATE: _sha256(tmp / STATE)}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, **meta, "files": files}, indent=1) + "\n")
            _commit(root, tmp, final, keep)
        except (OSError, RuntimeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = str(write_error(final, e, run_dir))
    _, error = _from_main([None, error])
    if error:
        raise CheckpointError(error)
    return final


def _from_main(values: list) -> list:
    """values as the main process has them (every process calls this)."""
    dist.broadcast_object_list(values, src=0)
    return values


def read_manifest(path: Path) -> dict:
    """A sharded checkpoint's manifest.json; CheckpointError if it is missing or unreadable."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
        manifest["files"], manifest["expert_axes"]  # noqa: B018 (both must be there)
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint manifest '{Path(path) / MANIFEST}' is unreadable: {first_line(e)}") from None


def _verify_files(path: Path, manifest: dict) -> None:
    """CheckpointError naming the first file of the manifest that is missing or whose SHA-256
    differs; under torch.distributed the processes check a share each and agree on the answer."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    error = None
    for name in sorted(manifest["files"])[rank::world]:
        f = Path(path) / name
        if not f.is_file():
            error = f"checkpoint shard '{f}' is missing"
        elif _sha256(f) != manifest["files"][name]:
            error = f"checkpoint shard '{f}' is corrupt: its SHA-256 differs from the manifest's"
        if error:
            break
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: only its own dataclasses, torch sizes and dtypes may be built."""

    ALLOWED = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension"}

    def find_class(self, module: str, name: str):
        torch_value = (module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)))
        ) or (module, name) in (("torch.serialization", "_get_layout"),  # how torch pickles a layout
                                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"))  # the id it was saved under
        if module in self.ALLOWED or (module == "collections" and name == "OrderedDict") or torch_value:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _dcp_failures(e: BaseException) -> list[BaseException]:
    """The processes' own errors inside DCP's CheckpointException ((error, stack) by rank)."""
    return [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]


def _dcp_reason(e: Exception) -> str:
    """The first process's own error inside DCP's CheckpointException (whose message names only ranks)."""
    e = next(iter(_dcp_failures(e)), e)
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


def load_sharded(path: Path, tensors: dict[str, Tensor], partial: bool = False) -> dict:
    """Verify a sharded checkpoint and load it into `tensors` (in place: DTensors, expert pieces,
    plain tensors, named as save_sharded names them); return its state. With `partial`, names the
    checkpoint has but `tensors` lacks are skipped (the weights without the optimiser).
    CheckpointError for a missing or corrupt file, or names or shapes that do not match."""
    path = Path(path)
    _verify_files(path, read_manifest(path))
    state = _read_state(path)
    try:
        with warnings.catch_warnings():  # a whole model in one process reads every shard: intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=_SafeReader(path), planner=DefaultLoadPlanner(allow_partial_load=partial),
                     no_dist=not dist.is_initialized())
    except Exception as e:  # a name or shape the checkpoint lacks (raised on every process)
        raise CheckpointError(f"checkpoint '{path}' does not match the model: {_dcp_reason(e)}") from None
    return state


def latest_checkpoint(run_dir: Path) -> Path:
    """The directory `latest` points at; CheckpointError if there is none."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"run directory '{run_dir}' has no checkpoint (no {pointer.relative_to(run_dir)})")
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' named by '{pointer}' does not exist")
    return path


def _read_state(path: Path, device: torch.device | str = "cpu") -> dict:
    """state.pt, its zip CRC-32s checked (torch.load checks none); CheckpointError if corrupt."""
    try:
        with zipfile.ZipFile(path / STATE) as z:
            bad = z.testzip()
        if bad is not None:
            raise ValueError(f"CRC-32 mismatch in {bad}")
        return torch.load(path / STATE, map_location=device, weights_only=True)
    except Exception as e:  # truncated or flipped bytes, zip errors, not a torch file
        raise CheckpointError(f"checkpoint state '{path / STATE}' is corrupt or unreadable: {first_line(e)}") from None


def load_checkpoint(path: Path, model: nn.Module, device: torch.device | str = "cpu") -> dict:
    """Verify the checkpoint (either format), load its weights into the whole model `model`
    (strictly: same names and shapes) and return its state. CheckpointError if a file is corrupt,
    truncated or missing. Weights are read one tensor at a time."""
    path = Path(path)
    if is_sharded(path):
        axes = read_manifest(path)["expert_axes"]
        tensors = {}
        for name, t in model.state_dict().items():
            if name in axes:
                tensors |= expert_pieces(f"model.{name}", t, axes[name], list(range(t.shape[axes[name]])))
            else:
                tensors[f"model.{name}"] = t
        return load_sharded(path, tensors, partial=True)
    state = open_checkpoint(path, device)
    try:
        _load_weights(path / WEIGHTS, model)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights '{path / WEIGHTS}' are corrupt or unreadable: "
                              f"{first_line(e)}") from None
    return state


def open_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A one-process checkpoint's state, both files verified (read_full_tensors reads the weights)."""
    path = Path(path)
    state = _read_state(path, device)
    try:
        expected = state.get("weights_sha256") if isinstance(state, dict) else None
        if expected is not None and _sha256(path / WEIGHTS) != expected:
            raise ValueError("SHA-256 differs from the one recorded in state.pt")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights '{path / WEIGHTS}' are corrupt or unreadable: "
                              f"{first_line(e)}") from None
    return state


def read_full_tensors(path: Path):
    """A one-process checkpoint's weights, read lazily: a context manager giving a safetensors
    handle (keys(), get_tensor(name))."""
    return safe_open(str(Path(path) / WEIGHTS), framework="pt")


def _load_weights(file: Path, model: nn.Module) -> None:
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
            tensor = f.get_tensor(name)
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
