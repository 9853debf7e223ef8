"""Data, expert and fully sharded parallel training on torch.distributed (launched by torchrun).

Layout: W processes form W/P expert-parallel groups of P = train.ep consecutive ranks. A group
shares one copy of the experts, each process holding E/P of every layer
(moe/expert_parallel.py); the W/P copies are replicas (a "dp" group per shard). Everything
that is not an expert is replicated on all W processes (DDP), or with train.fsdp sharded over
all W of them by FSDP2 (`fully_shard`: each block one unit, a SaMoE pool or shared bank its
own, the embeddings and head the root's), the experts too when P = 1.

The configured batch is the global batch: every process draws the same window offsets and
keeps its 1/W slice, so a run's data, hyperparameters and results do not depend on W (with
`train.micro_batch_size` set, even the routing groups are the same). Gradients of the global
mean loss L = (1/W) Σ_r L_r:

    non-expert:  DDP averages over all W processes (FSDP2 reduce-scatters the average);
    expert:      after backward an expert shard holds Σ_{r in its ep group} ∂L_r/∂W_e; it is
                 summed over its dp replicas and divided by W.

Clipping uses the true global norm: ‖g‖² = ‖g_replicated‖² + ‖g_FSDP‖² (over all shards) +
Σ_{ep group} ‖g_expert shard‖² (each shard counted once). Checkpoints of more than one process
are sharded (checkpoint.py): each process writes what it holds, and a checkpoint of any layout
loads under any other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from samoe.config import Config
from samoe.errors import ConfigError, UserError
from samoe.model.gpt import GPT
from samoe.moe.expert_parallel import ExpertParallel, ExpertParallelDispatcher, take_shard
from samoe.moe.experts import ExpertWeights, PoolMixture


@dataclass
class Layout:
    """Where this process sits. world = 1 is plain single-process training."""

    world: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    ep: ExpertParallel | None = None  # set when train.ep > 1
    dp_group: dist.ProcessGroup | None = None  # replicas of this process's expert shard
    ep_axes: dict[str, int] = field(default_factory=dict)  # expert-parallel sharded tensor -> its expert axis
    fsdp: DeviceMesh | None = None  # all W processes, when train.fsdp shards the rest over them
    bf16: bool = False  # train.dtype = bfloat16: FSDP2 computes and gathers in bf16, reduces in fp32

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
    if world == 1:  # train.fsdp and train.ep = 1 are no-ops on one process
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
    mesh = init_device_mesh(device.type, (world,)) if cfg.train.fsdp else None
    return Layout(world, rank, device, ep, dp_groups[rank % P], fsdp=mesh, bf16=cfg.train.dtype == "bfloat16"), device


def expert_axes(model: nn.Module) -> dict[str, int]:
    """Name -> expert axis of every expert tensor (those an expert-parallel process holds a
    share of), parameters and buffers (`bias: false` keeps zero buffers) alike."""
    return {f"{name}.{tname}" if name else tname: module.expert_axis
            for name, module in model.named_modules() if isinstance(module, ExpertWeights)
            for tname in ("w1", "b1", "w2", "b2")}


def parallelize(model: GPT, layout: Layout) -> GPT:
    """Apply the layout's parallelism to a model built whole (GPT(cfg), the same on every
    process). Under expert parallelism every expert tensor (private experts, the SaMoE pool,
    the shared bank) keeps this process's experts p, p + P, ... along its expert axis, SaMoE
    layers combine that shard, and every MoE layer's tokens go through the expert-parallel
    dispatcher (layout.ep_axes records the sharded tensors). Then it moves the model to the
    layout's device and, with layout.fsdp, FSDP2 shards the rest (apply_fsdp). Returns the model."""
    layout.ep_axes = {n: a for n, a in expert_axes(model).items() if n in dict(model.named_parameters())} \
        if layout.ep is not None else {}
    if layout.ep is not None:
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
    model.to(layout.device)  # this process's share only, and before FSDP2 (which shards on the mesh's device)
    if layout.fsdp is not None:
        apply_fsdp(model, layout)
    return model


def apply_fsdp(model: GPT, layout: Layout) -> None:
    """FSDP2 over all processes: each block one unit, a SaMoE pool or shared bank its own (read
    through its forward by every layer, so kept gathered from its first use until the backward
    is done), the root the embeddings, final norm and head. Expert tensors are sharded along
    their expert axis, so a process holds whole experts; under expert parallelism they are left
    to it (ignored here). bf16: compute and all-gathers in bf16, gradients reduced in fp32."""
    params = dict(model.named_parameters())
    axis_of = {params[n]: a for n, a in expert_axes(model).items() if n in params}
    ignored = {params[n] for n in layout.ep_axes}
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if layout.bf16 \
        else MixedPrecisionPolicy()

    def shard(module: nn.Module, **kw) -> None:
        fully_shard(module, mesh=layout.fsdp, mp_policy=mp, ignored_params=ignored,
                    shard_placement_fn=lambda p: Shard(axis_of.get(p, 0)), **kw)

    for block in model.blocks:
        shard(block)
    for shared in (model.expert_pool, model.expert_bank):
        if shared is not None and layout.ep is None:
            shard(shared, reshard_after_forward=False)
    shard(model)


def wrap_ddp(model: nn.Module, layout: Layout, device: torch.device) -> nn.Module:
    """DDP over the replicated parameters (expert shards are left to reduce_expert_grads); the
    model itself on one process or under FSDP2 (which reduces in its backward hooks)."""
    if layout.world == 1 or layout.fsdp is not None:
        return model
    # DDP's (private, long-standing) way to leave parameters out of its reduction
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(layout.ep_axes))
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)  # buffers change identically everywhere


@contextmanager
def gradient_sync_paused(wrapped: nn.Module, layout: Layout) -> Iterator[None]:
    """A micro-batch whose gradients only accumulate: no reduction until the step's last one."""
    if layout.fsdp is not None:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    elif layout.world > 1:
        with wrapped.no_sync():
            yield
    else:
        yield


def _ep_params(model: nn.Module, layout: Layout) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n in layout.ep_axes]


def reduce_expert_grads(model: nn.Module, layout: Layout) -> None:
    """Expert-shard gradients: sum over the dp replicas, divide by W (see the module doc);
    nothing without expert parallelism (DDP or FSDP2 reduced every gradient)."""
    if layout.ep is None:
        return
    for p in _ep_params(model, layout):
        if p.grad is None:  # no token reached this shard: a zero gradient, same collectives everywhere
            p.grad = torch.zeros_like(p)
        if layout.world > layout.ep.size:
            dist.all_reduce(p.grad, group=layout.dp_group)
        p.grad.div_(layout.world)


def clip_grad_norm(model: nn.Module, layout: Layout, max_norm: float) -> torch.Tensor:
    """Scale all gradients so the global norm is at most max_norm; return the global norm."""
    if layout.world == 1 or (layout.ep is None and layout.fsdp is None):  # the local norm is the global one
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    with_grad = [p for p in model.parameters() if p.grad is not None]
    ep_ids = {id(p) for p in _ep_params(model, layout)}
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]  # FSDP2's shards
    expert = [p for p in with_grad if id(p) in ep_ids]
    replicated = [p for p in with_grad if id(p) not in ep_ids and not isinstance(p.grad, DTensor)]
    squares = torch.zeros((), dtype=torch.float64, device=layout.device)
    if sharded:  # a norm over all processes' shards (the same parameters on every process)
        squares += torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor().double() ** 2
    if expert:
        part = torch.nn.utils.get_total_norm([p.grad for p in expert]).double() ** 2
        dist.all_reduce(part, group=layout.ep.group)
        squares += part
    if replicated:
        squares += torch.nn.utils.get_total_norm([p.grad for p in replicated]).double() ** 2
    total = squares.sqrt().float()
    for group in (sharded, expert + replicated):  # DTensor and plain gradients scale separately
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def sync_router_loads(model: GPT, layout: Layout) -> None:
    """Sum the loads the aux-loss-free bias update uses over all processes, so every replica
    of a router takes the same step."""
    if layout.world == 1:
        return
    for load in model.router_loads():
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

