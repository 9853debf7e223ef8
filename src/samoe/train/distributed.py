"""Data + expert parallel training on torch.distributed (launched by torchrun).

Layout: W processes form W/P expert-parallel groups of P = train.ep consecutive ranks. A group
shares one copy of the experts, each process holding E/P of every layer
(moe/expert_parallel.py); the W/P copies are replicas (a "dp" group per shard). Everything
that is not an expert is replicated on all W processes.

The configured batch is the global batch: every process draws the same window offsets and
keeps its 1/W slice, so a run's data, hyperparameters and results do not depend on W (with
`train.micro_batch_size` set, even the routing groups are the same). Gradients of the global
mean loss L = (1/W) Σ_r L_r:

    non-expert:  DDP averages over all W processes;
    expert:      after backward an expert shard holds Σ_{r in its ep group} ∂L_r/∂W_e; it is
                 summed over its dp replicas and divided by W.

Clipping uses the true global norm: ‖g‖² = ‖g_replicated‖² + Σ_{ep group} ‖g_expert shard‖²
(each shard counted once). Checkpoints hold the full model, gathered on save and sliced on
load, so a run moves freely between process counts and expert-parallel sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from samoe.config import Config
from samoe.errors import ConfigError, UserError
from samoe.model.gpt import GPT
from samoe.moe.expert_parallel import ExpertParallel, ExpertParallelDispatcher, gather_shards, take_shard
from samoe.moe.experts import ExpertWeights, PoolMixture


@dataclass
class Layout:
    """Where this process sits. world = 1 is plain single-process training."""

    world: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    ep: ExpertParallel | None = None  # set when train.ep > 1
    dp_group: dist.ProcessGroup | None = None  # replicas of this process's expert shard
    expert_axes: dict[str, int] = field(default_factory=dict)  # sharded parameter -> its expert axis

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def run_on_main(layout: Layout, fn):
    """fn() on the main process only; a UserError it raises is raised on every
    process, which would otherwise wait for the main one forever. Returns fn's result on the
    main process, None on the others, once the main process is done."""
    result, error = None, None
    if layout.is_main:
        try:
            result = fn()
        except UserError as e:
            error = e
    if layout.world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result


def check_layout(cfg: Config, world: int) -> None:
    """ConfigError for a layout that cannot be built on `world` processes."""
    t = cfg.train
    if world % t.ep:
        raise ConfigError(f"train.ep = {t.ep} must divide the number of processes, {world}"
                          + (" (launch with --nproc or torchrun, or pass train.ep=1)" if world == 1 else ""))
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size = {t.batch_size} must be a multiple of the number of processes, {world}")
    local = t.batch_size // world
    if t.micro_batch_size is not None and local % t.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size = {t.micro_batch_size} must divide the per-process batch "
                          f"{local} (train.batch_size {t.batch_size} / {world} processes)")


def init_layout(cfg: Config, device: torch.device) -> tuple[Layout, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...) and make the ep and dp
    groups; nccl on GPU, gloo on CPU. Returns the layout and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(cfg, world)
    if world == 1:
        return Layout(device=device), device
    if device.type == "cuda":
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if per_machine > torch.cuda.device_count():  # every process sees this, so process 0 reports it
            raise ConfigError(f"{per_machine} processes on this machine but {torch.cuda.device_count()} GPUs; "
                              "start at most one process per GPU, or pass --device cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    P, rank = cfg.train.ep, dist.get_rank()
    # ep groups are runs of P consecutive ranks, dp groups every P-th rank. Both are new groups,
    # apart from the default one DDP reduces on: collectives on one group run in issue order,
    # and DDP's asynchronous bucket reductions must not interleave with the experts' all-to-alls.
    ep_groups = [dist.new_group(list(range(g, g + P))) for g in range(0, world, P)]
    dp_groups = [dist.new_group(list(range(p, world, P))) for p in range(P)]
    ep = ExpertParallel(ep_groups[rank // P], rank % P, P) if P > 1 else None
    return Layout(world, rank, device, ep, dp_groups[rank % P]), device


def expert_axes(model: nn.Module) -> dict[str, int]:
    """Name -> expert axis of every expert tensor (those an expert-parallel process holds a
    share of)."""
    return {f"{name}.{pname}" if name else pname: module.expert_axis
            for name, module in model.named_modules() if isinstance(module, ExpertWeights)
            for pname, _ in module.named_parameters(recurse=False)}


def parallelize(model: GPT, layout: Layout) -> GPT:
    """Apply the layout's parallelism to a model built whole (GPT(cfg), the same on every
    process): under expert parallelism every expert tensor (private experts, the SaMoE pool,
    the shared bank) keeps this process's experts p, p + P, ... along its expert axis, SaMoE
    layers combine that shard, and every MoE layer's tokens go through the expert-parallel
    dispatcher. Records the sharded tensors' expert axes in layout.expert_axes. Returns the model."""
    layout.expert_axes = expert_axes(model) if layout.ep is not None else {}
    if layout.ep is None:
        return model
    for module in model.modules():
        if isinstance(module, ExpertWeights):
            for name in ("w1", "b1", "w2", "b2"):
                t = getattr(module, name)
                shard = take_shard(t.data, module.expert_axis, layout.ep)
                if isinstance(t, nn.Parameter):
                    setattr(module, name, nn.Parameter(shard, requires_grad=t.requires_grad))
                else:  # `bias: false`: constant zero buffers
                    module.register_buffer(name, shard, persistent=False)
    for layer in model.moe_layers():
        layer.dispatcher = ExpertParallelDispatcher(layout.ep, layer.router.num_experts)
        if isinstance(layer.experts, PoolMixture):
            layer.experts.shard = (layout.ep.rank, layout.ep.size)
    return model


def reshard(layout: Layout):
    """For load_checkpoint: cut a stored (whole) expert tensor to this process's experts."""
    if layout.ep is None:
        return None
    return lambda name, t: take_shard(t, layout.expert_axes[name], layout.ep) if name in layout.expert_axes else t


def wrap_ddp(model: nn.Module, layout: Layout, device: torch.device) -> nn.Module:
    """DDP over the replicated parameters (expert shards are left to reduce_expert_grads)."""
    if layout.world == 1:
        return model
    # DDP's (private, long-standing) way to leave parameters out of its reduction
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(layout.expert_axes))
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)  # buffers change identically everywhere


def _expert_params(model: nn.Module, layout: Layout) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n in layout.expert_axes]


def reduce_expert_grads(model: nn.Module, layout: Layout) -> None:
    """Expert-shard gradients: sum over the dp replicas, divide by W (see the module doc);
    nothing without expert parallelism (DDP reduced every gradient)."""
    if layout.ep is None:
        return
    for _, p in _expert_params(model, layout):
        if p.grad is None:  # no token reached this shard: a zero gradient, same collectives everywhere
            p.grad = torch.zeros_like(p)
        if layout.world > layout.ep.size:
            dist.all_reduce(p.grad, group=layout.dp_group)
        p.grad.div_(layout.world)


def clip_grad_norm(model: nn.Module, layout: Layout, max_norm: float) -> torch.Tensor:
    """Scale all gradients so the global norm is at most max_norm; return the global norm."""
    if layout.ep is None:  # everything replicated: the local norm is the global one
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    replicated = torch.nn.utils.get_total_norm([g for n, g in grads.items() if n not in layout.expert_axes])
    sharded = torch.nn.utils.get_total_norm([g for n, g in grads.items() if n in layout.expert_axes]) ** 2
    dist.all_reduce(sharded, group=layout.ep.group)
    total = (replicated.to(sharded.dtype) ** 2 + sharded).sqrt()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total)
    return total


def sync_router_loads(model: nn.Module, layout: Layout) -> None:
    """Sum the loads the aux-loss-free bias update uses over all processes, so every replica
    of a router takes the same step."""
    if layout.world == 1:
        return
    for layer in model.moe_layers():
        load = getattr(layer.router, "recent_load", None)
        if load is not None:
            dist.all_reduce(load)


def step_metrics(model: GPT, layout: Layout) -> dict[str, int]:
    """What the layout adds to a step's metrics row: under expert parallelism `a2a_bytes`, the
    bytes all processes sent each other in all-to-alls since reset_a2a_bytes (forward and
    backward of one training step; the backward mirrors the forward)."""
    if layout.ep is None:
        return {}
    total = torch.tensor(float(sum(2 * layer.dispatcher.sent_bytes for layer in model.moe_layers())),
                         device=layout.device)
    dist.all_reduce(total)
    return {"a2a_bytes": int(total)}


def reset_a2a_bytes(model: GPT) -> None:
    """Zero the byte counters of the model's dispatchers."""
    for layer in model.moe_layers():
        layer.dispatcher.reset()


def full_weights(model: nn.Module, layout: Layout) -> nn.Module | dict[str, torch.Tensor] | None:
    """What the main process saves: the model itself, or under expert parallelism its tensors
    by name (tied ones once) with the expert shards gathered into whole tensors one at a time,
    in CPU memory. None on the other processes; the first ep group takes part."""
    if layout.ep is None:
        return model if layout.is_main else None
    if layout.rank >= layout.ep.size:
        return None
    out, taken = {}, set()
    for name, t in model.state_dict().items():
        if name in layout.expert_axes:
            t = gather_shards(t, layout.expert_axes[name], layout.ep)  # every member of the group takes part
        elif t.data_ptr() in taken:  # tied to a tensor already taken
            continue
        else:
            taken.add(t.data_ptr())
        if layout.is_main:
            out[name] = t.cpu().contiguous()
    return out if layout.is_main else None


def _map_expert_moments(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module, layout: Layout, fn) -> dict:
    """state with fn(tensor, expert axis, ep) applied to the Adam moments (exp_avg,
    exp_avg_sq; not the scalar step) of every expert parameter."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]  # state_dict's integer keys
    for i, name in enumerate(names):
        if name in layout.expert_axes and i in state["state"]:
            axis = layout.expert_axes[name]
            state["state"][i] = {k: fn(v, axis, layout.ep) if isinstance(v, torch.Tensor) and v.dim() else v
                                 for k, v in state["state"][i].items()}
    return state


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, layout: Layout) -> dict | None:
    """The optimiser state as a single process would hold it, on the main process (None
    elsewhere; the expert moments gathered whole into CPU memory); every process of the first
    ep group takes part."""
    def gather_to_cpu(t, axis, ep):  # whole moments one at a time, kept in CPU memory
        whole = gather_shards(t, axis, ep)
        return whole.cpu() if whole is not None else None

    state = optimizer.state_dict()
    if layout.ep is not None and layout.rank < layout.ep.size:
        state = _map_expert_moments(state, optimizer, model, layout, gather_to_cpu)
    return state if layout.is_main else None


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module, layout: Layout) -> dict:
    """A full optimiser state (any process count wrote it) cut to this process's experts."""
    if layout.ep is None:
        return state
    return _map_expert_moments(state, optimizer, model, layout, take_shard)


def gather_rng_states(layout: Layout) -> list[torch.Tensor] | None:
    """Every process's torch RNG state, in rank order, on the main process."""
    if layout.world == 1:
        return None
    states = [None] * layout.world if layout.is_main else None
    dist.gather_object(torch.get_rng_state(), states, dst=0)
    return states


def seed_process(seed: int, layout: Layout) -> None:
    """Distinct dropout / jitter streams per process; process 0 keeps the single-process stream."""
    if layout.rank:
        torch.manual_seed(seed + 1_000_003 * layout.rank)


def all_sum(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """t summed over all processes (a CPU tensor in, a CPU tensor out)."""
    if layout.world == 1:
        return t
    t = t.to(layout.device)
    dist.all_reduce(t)
    return t.cpu()


def all_mean(values: dict[str, float], layout: Layout) -> dict[str, float]:
    """Per-process numbers averaged over all processes (one all-reduce)."""
    total = all_sum(torch.tensor(list(values.values()), dtype=torch.float64), layout)
    return dict(zip(values, (total / layout.world).tolist()))


def shutdown(layout: Layout) -> None:
    if layout.world > 1 and dist.is_initialized():
        dist.destroy_process_group()

