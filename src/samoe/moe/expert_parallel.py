"""Expert parallelism: the experts of every MoE layer spread over a group of P processes.

Process p of the group holds experts e ≡ p (mod P) of each layer, E/P of them, as local
expert j = e // P (strided, so a pyramid layer using the pool's first E_l experts still finds
E_l/P of them on every process; the SaMoE pool is sharded the same way along its expert axis
and each process combines its own shard, with the mixing coefficients replicated).

Each process routes its own tokens (capacity and balancing are per process and micro-batch,
as GShard's groups), then

    1. sorts its kept (token, expert) slots by destination process, then local expert;
    2. exchanges the per-expert slot counts (all_to_all_single on E integers);
    3. sends the slots' rows of x [T, d] with all_to_all_single (uneven splits);
    4. runs its local experts on what it received, regrouped by local expert (moe/grouped.py);
    5. sends the outputs back with the reverse all_to_all and adds the gated rows in place.

The exchanges are autograd-aware: the backward runs the same two all-to-alls in reverse, so
expert gradients on a process sum over every token of the group that reached its experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from samoe.moe.grouped import ExpertSource, gated_sum, grouped_expert_ffn
from samoe.moe.routers import Routing


@dataclass(frozen=True)
class ExpertParallel:
    """This process's place in its expert-parallel group."""

    group: dist.ProcessGroup
    rank: int  # p, in [0, size)
    size: int  # P


def local_experts(num_experts: int, ep: ExpertParallel) -> slice:
    """The global expert ids e ≡ p (mod P) this process holds, as a slice of [0, E)."""
    return slice(ep.rank, num_experts, ep.size)


def dispatch_ep(x: Tensor, routing: Routing, source: ExpertSource, activation: str, num_experts: int,
                ep: ExpertParallel) -> tuple[Tensor, int]:
    """Expert-parallel y [T, d] for x [T, d]; also the bytes this call sent to other processes
    (activations and counts, forward only; the backward sends as many again).

    `source` holds this process's E/P experts (local expert j = global expert j·P + p).
    """
    P, p = ep.size, ep.rank
    local = num_experts // P
    token, expert, gate = routing.kept_slots()
    dest_major = (expert % P) * local + expert // P  # slot order: destination, then its local expert
    order = torch.argsort(dest_major, stable=True)
    token, gate = token[order], gate[order]

    send_counts = torch.bincount(dest_major, minlength=num_experts)  # [P, local] flattened
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=ep.group)  # [source, local expert]
    send_splits = send_counts.view(P, local).sum(1).tolist()
    recv_splits = recv_counts.view(P, local).sum(1).tolist()

    received = all_to_all_single_autograd(x[token], recv_splits, send_splits, ep.group)
    # rows arrive grouped by source process, then local expert; regroup by local expert
    row_expert = torch.arange(local, device=x.device).repeat(P).repeat_interleave(recv_counts)
    regroup = torch.argsort(row_expert, stable=True)
    counts = recv_counts.view(P, local).sum(0).tolist()
    # even with no rows: the experts and coefficients stay in the graph (zero gradients), as DDP
    # and the backward all-to-alls on the other processes expect
    out = grouped_expert_ffn(received[regroup], counts, source, activation)
    out = torch.empty_like(out).index_copy(0, regroup, out)  # back to arrival order
    returned = all_to_all_single_autograd(out, send_splits, recv_splits, ep.group)

    row_bytes = x.shape[1] * x.element_size()
    sent = (sum(send_splits) - send_splits[p] + sum(recv_splits) - recv_splits[p]) * row_bytes
    sent += (P - 1) * local * send_counts.element_size()
    return gated_sum(x, token, gate, returned), sent


def take_shard(full: Tensor, axis: int, ep: ExpertParallel) -> Tensor:
    """This process's experts (p, p + P, ...) of a full tensor whose `axis` indexes experts."""
    index = [slice(None)] * full.dim()
    index[axis] = local_experts(full.shape[axis], ep)
    return full[tuple(index)].clone()


def gather_shards(shard: Tensor, axis: int, ep: ExpertParallel) -> Tensor | None:
    """The full tensor on the group's first process (None on the others): take_shard reversed."""
    parts = [torch.empty_like(shard) for _ in range(ep.size)] if ep.rank == 0 else None
    dist.gather(shard.contiguous(), parts, group=ep.group, group_dst=0)
    if parts is None:
        return None
    # local expert j of process p is global expert j·P + p: interleave along `axis`
    return torch.stack(parts, dim=axis + 1).flatten(axis, axis + 1)
