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

from samoe.moe.dispatch import Dispatcher
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


class ExpertParallelDispatcher(Dispatcher):
    """The dispatcher of one MoE layer whose E experts are spread over an expert-parallel group
    (steps 1-5 of the module docstring). It owns the layer's all-to-all byte counter:
    `sent_bytes`, the bytes this process sent to the others in forwards since `reset()`
    (activations and counts; the backward sends as many again)."""

    def __init__(self, ep: ExpertParallel, num_experts: int):
        self.ep, self.num_experts = ep, num_experts
        self.sent_bytes = 0

    def reset(self) -> None:
        self.sent_bytes = 0

    def __call__(self, x: Tensor, routing: Routing, source: ExpertSource, activation: str) -> Tensor:
        y, sent = dispatch_ep(x, routing, source, activation, self.num_experts, self.ep)
        self.sent_bytes += sent
        return y


def dispatch_ep(x: Tensor, routing: Routing, source: ExpertSource, activation: str, num_experts: int,
                ep: ExpertParallel) -> tuple[Tensor, int]:
    """Expert-parallel y [T, d] for x [T, d]; also the bytes this call sent to other processes
    (activations and counts, forward only; the backward sends as many again).

    `source` holds this process's E/P experts (local expert j = global expert j·P + p).
    """
    P, p = ep.size, ep.rank
    local = num_experts // P
    token, expert, gate = routing.kept_slots()
    # Global expert e lives on process e mod P as its local expert e div P (the strided layout
    # of the module docstring). Sorting by dest_major = (e mod P)·local + e div P puts the slots
    # for process 0 first, then process 1, ..., and within each process's block in its local
    # expert order: one all-to-all with contiguous splits sends every process exactly its rows,
    # already grouped the way that process's experts will read them. Stable, as in dispatch().
    dest_major = (expert % P) * local + expert // P
    order = torch.argsort(dest_major, stable=True)
    token, gate = token[order], gate[order]

    # bincount over dest_major, viewed [P, local], is how many rows go to each (process, local
    # expert): its row sums are the all-to-all's send splits. Exchanging the whole [P, local]
    # table (not only the sums) tells the receiver how its incoming rows divide among its experts.
    send_counts = torch.bincount(dest_major, minlength=num_experts)  # [P, local] flattened
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=ep.group)  # [source, local expert]
    send_splits = send_counts.view(P, local).sum(1).tolist()
    recv_splits = recv_counts.view(P, local).sum(1).tolist()

    received = all_to_all_single_autograd(x.index_select(0, token), recv_splits, send_splits, ep.group)  # as dispatch()
    # Rows arrive grouped by source process, then local expert: source 0's rows for experts
    # 0..local-1, then source 1's, ... Labelling each row with its local expert
    # (arange(local) repeated per source, each label repeated by its count) and stable-sorting
    # by that label regroups them by expert, sources in order, for the grouped FFN.
    row_expert = torch.arange(local, device=x.device).repeat(P).repeat_interleave(recv_counts)
    regroup = torch.argsort(row_expert, stable=True)
    counts = recv_counts.view(P, local).sum(0).tolist()
    # even with no rows: the experts and coefficients stay in the graph (zero gradients), as DDP
    # and the backward all-to-alls on the other processes expect
    out = grouped_expert_ffn(received.index_select(0, regroup), counts, source, activation)
    # index_copy with the same permutation undoes the regrouping (out[regroup[i]] = row i), so
    # the rows go back in arrival order and the reverse all-to-all returns each to its sender
    out = torch.empty_like(out).index_copy(0, regroup, out)
    returned = all_to_all_single_autograd(out, send_splits, recv_splits, ep.group)

    # bytes that leave this process: rows to the others (not to itself) and rows back to them,
    # plus the count table's other P - 1 blocks
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
