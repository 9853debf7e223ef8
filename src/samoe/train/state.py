"""What one process holds of a run's state, by the names a sharded checkpoint stores it under
(checkpoint.py): the model's tensors and AdamW's, expert tensors one expert at a time. Loading a
checkpoint of either format means filling these tensors in place, whatever layout wrote it."""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from samoe.checkpoint import expert_pieces, first_line
from samoe.errors import CheckpointError
from samoe.train.distributed import Layout, expert_axes


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW state (zero moments, step 0) that has none, as its first step
    would: the tensors a checkpoint is loaded into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _held(t: Tensor, axis: int, layout: Layout, ep_sharded: bool) -> tuple[Tensor, list[int]]:
    """This process's part of an expert tensor and the global experts it holds along `axis`."""
    if isinstance(t, DTensor):  # FSDP2: a contiguous run of experts
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), list(range(offset[axis], offset[axis] + shape[axis]))
    if ep_sharded:  # experts p, p + P, ...
        return t, list(range(layout.ep.rank, t.shape[axis] * layout.ep.size, layout.ep.size))
    return t, list(range(t.shape[axis]))


def checkpoint_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, layout: Layout) -> dict[str, Tensor]:
    """What this process holds of the model and its AdamW state, by the names a sharded
    checkpoint uses (checkpoint.py): `model.<name>`, `optim.<name>.<moment>`, expert tensors one
    expert at a time. The tensors are the model's and optimiser's own (views), so loading into
    them loads the run."""
    axes = expert_axes(model)
    out: dict[str, Tensor] = {}

    def add(key: str, name: str, t: Tensor) -> None:
        if name in axes and t.dim():
            local, experts = _held(t, axes[name], layout, name in layout.ep_axes)
            out.update(expert_pieces(key, local, axes[name], experts))
        else:
            out[key] = t

    for name, t in model.state_dict().items():
        add(f"model.{name}", name, t)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for moment, t in optimizer.state[p].items():
                    add(f"optim.{names[id(p)]}.{moment}", names[id(p)], t)
    return out


def copy_from_full(target: Tensor, full: Tensor, key: str) -> None:
    """Copy into `target` (a plain tensor, or this process's shard of a DTensor) its part of the
    whole tensor `full`."""
    if tuple(full.shape) != tuple(target.shape):
        raise CheckpointError(f"checkpoint tensor {key} has shape {list(full.shape)}, the model {list(target.shape)}")
    if isinstance(target, DTensor):
        shape, offset = compute_local_shape_and_global_offset(full.shape, target.device_mesh, target.placements)
        full = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        target = target.to_local()
    target.copy_(full)


def load_full_checkpoint(tensors: dict[str, Tensor], weights, optimizer_state: dict, model: nn.Module,
                         order: list[nn.Parameter]) -> None:
    """Fill checkpoint_tensors' `tensors` from a one-process checkpoint: `weights` (a safe_open
    handle, tied tensors stored once) and its optimiser state_dict, whose parameters are
    numbered in `order` (optim.param_groups'). A parameter without optimiser state (no gradient
    yet) keeps the zero state init_optimizer_state gave it."""
    axes = expert_axes(model)
    stored = set(weights.keys())
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    alias = {n: next((a for a in names if a in stored), n) for names in aliases.values() for n in names}
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(order)}
    cache: dict[str, Tensor] = {}  # the whole tensor behind consecutive expert pieces
    for key, target in tensors.items():
        base, _, expert = key.partition("@")
        kind, rest = base.split(".", 1)
        name, moment = (rest, None) if kind == "model" else rest.rsplit(".", 1)
        if moment is not None and index[name] not in optimizer_state["state"]:
            continue
        if base not in cache:
            cache.clear()
            try:
                cache[base] = (weights.get_tensor(alias.get(name, name)) if moment is None
                               else optimizer_state["state"][index[name]][moment])
            except (KeyError, IndexError, TypeError, SafetensorError) as e:
                raise CheckpointError(f"checkpoint has no {base} ({first_line(e)})") from None
        full = cache[base].select(axes[name], int(expert)) if expert else cache[base]
        copy_from_full(target, full, key)
