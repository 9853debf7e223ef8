"""Routers: which experts each token goes to, with what gate weight, and the auxiliary losses.

Every router maps router inputs x [T, d] (and token ids [T], for hash routing) to a `Routing`
holding k slots per token:

    expert [T, k]  expert id of each slot
    gate   [T, k]  weight of that expert's output (0 where the slot was dropped)
    keep   [T, k]  False where the slot was dropped (over capacity, or not chosen)

Token-choice routers (switch, gshard, topk, base, hash) fill k = 1, 2 or top_k slots; expert
choice fills k = E slots, slot e saying whether expert e took the token. Router math runs in
fp32 whatever the autocast dtype.

Capacity: C = max(min_capacity, ceil(capacity_factor · T · k / E)). Slots claim capacity in
slot-major order (every token's first choice before any second choice, earlier tokens first,
as in GShard); slots past C are dropped and the residual stream carries those tokens.

Losses (docs/design.md): load balance E · Σ_e f_e · P_e with f_e the fraction of routed slots
choosing e (before capacity) and P_e the mean router probability of e; router z-loss
mean(logsumexp(logits)²).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samoe.config import ROUTER_KINDS, MoEConfig, router_top_k


@dataclass
class Routing:
    expert: Tensor  # [T, k] long
    gate: Tensor  # [T, k] fp32, zero where dropped
    keep: Tensor  # [T, k] bool
    probs: Tensor | None  # [T, E] fp32 router probabilities (None for hash routing)
    aux: dict[str, Tensor] = field(default_factory=dict)  # scalar losses

    def kept_slots(self) -> tuple[Tensor, Tensor, Tensor]:
        """(token, expert, gate) of every kept slot, each [N], in token-major order."""
        T, k = self.expert.shape
        token = torch.arange(T, device=self.expert.device).unsqueeze(1).expand(T, k)
        if bool(self.keep.all()):  # dropless: plain views, and the gate's backward is no scatter
            return token.reshape(-1), self.expert.reshape(-1), self.gate.reshape(-1)
        return token[self.keep], self.expert[self.keep], self.gate[self.keep]

    def counts(self, num_experts: int) -> Tensor:
        """Kept (token, expert) slots per expert: [E] int64."""
        return torch.bincount(self.expert[self.keep].reshape(-1), minlength=num_experts)

    def dropped(self) -> Tensor:
        """[T] bool: the tokens none of whose slots was kept (the residual stream carries them)."""
        return ~self.keep.any(dim=1)

    def entropy(self) -> Tensor | None:
        """Mean over tokens of the router distribution's entropy -Σ_e p_e ln p_e (nats); None
        without a distribution (hash routing)."""
        if self.probs is None:
            return None
        p = self.probs.detach().float()
        return -(p * p.clamp_min(1e-20).log()).sum(-1).mean()

    def stats(self) -> dict[str, Tensor]:
        """Detached routing statistics: dropped-token fraction and mean router entropy."""
        with torch.no_grad():
            out = {"dropped_frac": self.dropped().float().mean()}
            entropy = self.entropy()
            if entropy is not None:
                out["router_entropy"] = entropy
            return out


def capacity(tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """C = max(min_capacity, ceil(cf · T · k / E)), the most slots one expert takes."""
    return max(min_capacity, math.ceil(capacity_factor * tokens * k / num_experts))


def layer_capacity(cfg: MoEConfig, training: bool, tokens: int, num_experts: int, k: int) -> int:
    """capacity() with the layer's factor: capacity_factor in training, eval_capacity_factor in
    evaluation (which applies only when eval_dropless is off: drops_nothing)."""
    cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
    return capacity(tokens, num_experts, k, cf, cfg.min_capacity)


def within_capacity(expert: Tensor, keep: Tensor, num_experts: int, cap: int) -> Tensor:
    """keep [T, k] narrowed to the first `cap` kept slots of each expert, in slot-major order.

    A slot's position in its expert's queue comes from a stable sort of the slot-major list of
    expert ids (dropped slots sort last under the sentinel id E).
    """
    T, k = expert.shape
    flat = torch.where(keep, expert, num_experts).t().reshape(-1)  # [k*T], slot-major
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(flat)
    pos[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return keep & (pos.view(k, T).t() < cap)


def drops_nothing(cfg: MoEConfig, training: bool) -> bool:
    """Token-choice routing without capacity: always when dropless, and in evaluation (eval
    mode) unless eval_dropless is off. Quality is judged dropless: an eval-time capacity drop
    changes a token's loss by what the rest of the batch did, not by what the model knows."""
    return cfg.dropless or (not training and cfg.eval_dropless)


def expert_fractions(expert: Tensor, num_experts: int) -> Tensor:
    """f [E]: the fraction of all chosen slots (before capacity) that chose each expert."""
    return torch.bincount(expert.reshape(-1), minlength=num_experts).float() / expert.numel()


def load_balance_loss(probs: Tensor, expert: Tensor, num_experts: int) -> Tensor:
    """E · Σ_e f_e · P_e; f_e over all chosen slots (before capacity). Equals 1 when uniform."""
    return num_experts * (expert_fractions(expert, num_experts) * probs.mean(0)).sum()


BALANCE_TERMS = "balance_terms"  # aux key of a layer's [2, E] stack (f, P) under balance = "pool"
NORM_ROUTER_SCALE = 10.0  # γ at initialisation: cosines in [-1, 1] become logits in [-10, 10]


def pool_balance_loss(terms: list[Tensor]) -> Tensor:
    """UniPool's pool-level balance over L layers routing into one bank of M experts:

        M · Σ_e f̄_e · P̄_e,   f̄_e = (1/L) Σ_l f_le,   P̄_e = (1/L) Σ_l P_le

    from each layer's [2, M] stack (f_l, P_l). Layers may specialise on different experts as
    long as the bank as a whole is used evenly; 1 when it is uniform."""
    f, p = torch.stack(terms).mean(0)
    return f.numel() * (f * p).sum()


def z_loss(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits, dim=-1).square().mean()


def z_loss_from_softmax(logits: Tensor, probs: Tensor, j: Tensor) -> Tensor:
    """z_loss(logits) from their softmax: logsumexp(l) = l_j - log p_j for any expert j [T, 1];
    at a row's most probable j, p_j >= 1/E, so the log loses nothing. It reuses the softmax's
    pass where logsumexp makes its own (forward + backward at [2048, 64]: the top-4 router went
    from 4.46 to 3.54 ms)."""
    return (logits.gather(1, j) - probs.gather(1, j).log()).square().mean()


class LinearRouter(nn.Module):
    """Shared part of the learned routers: fp32 logits x·W_rᵀ with optional input jitter."""

    def __init__(self, d_model: int, num_experts: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = num_experts
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.training and self.cfg.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter)
        with torch.autocast(x.device.type, enabled=False):
            return x @ self.weight.float().t()

    def capacity(self, tokens: int, k: int) -> int:
        return layer_capacity(self.cfg, self.training, tokens, self.num_experts, k)


class TopKRouter(LinearRouter):
    """switch (k = 1), gshard (k = 2) and topk (any k): each token picks its k best experts.

    Gates are the router probabilities of the chosen experts, renormalised over the k chosen
    when k > 1 (GShard, Mixtral). gshard's random routing keeps the second expert with
    probability min(1, 2·g2) in training. With `aux_free_bias` a per-expert bias, used only
    for selection, is nudged toward balance after each optimiser step (`update_bias`).

    With `norm_router` (UniPool's NormRouter) the logits are a learned scale γ times the cosine
    of x and each expert's router row, and the gates are their ReLU renormalised over the k chosen:

        l_e = γ · (x / ‖x‖) · (w_e / ‖w_e‖),   s_e = relu(l_e),   gate_j = s_j / (Σ_chosen s + ε)

    so a token's routing weight does not grow with the scale of its hidden state, which differs
    from layer to layer when every layer routes into one bank. p = softmax(l) feeds the balance
    loss and the statistics; no z-loss (|l| <= γ by construction, reported as 0).
    """

    def __init__(self, d_model: int, num_experts: int, cfg: MoEConfig):
        super().__init__(d_model, num_experts, cfg)
        self.k = router_top_k(cfg)
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        self.register_buffer("recent_load", torch.zeros(num_experts), persistent=False)
        if cfg.norm_router:
            self.scale = nn.Parameter(torch.tensor(NORM_ROUTER_SCALE))

    def logits(self, x: Tensor) -> Tensor:
        if not self.cfg.norm_router:
            return super().logits(x)
        x = x.float()
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight.float()
            return self.scale * (F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).t())

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        scores = probs + self.selection_bias if self.cfg.aux_free_bias else probs
        expert = scores.topk(self.k, dim=-1).indices  # [T, k]
        if self.cfg.norm_router:
            gate = logits.gather(1, expert).relu()
            gate = gate / (gate.sum(dim=-1, keepdim=True) + 1e-9)
        else:
            gate = probs.gather(1, expert)
            if self.k > 1:
                gate = gate / gate.sum(dim=-1, keepdim=True)
        keep = torch.ones_like(expert, dtype=torch.bool)
        if self.cfg.random_routing and self.training and self.k == 2:
            keep[:, 1] = torch.rand(gate.shape[0], device=gate.device) < 2 * gate[:, 1]
        if self.training and self.cfg.aux_free_bias:  # the load chosen, before capacity clips it
            with torch.no_grad():
                self.recent_load += torch.bincount(expert[keep], minlength=self.num_experts).float()
        if not drops_nothing(self.cfg, self.training):
            keep = within_capacity(expert, keep, self.num_experts, self.capacity(x.shape[0], self.k))
        top = probs.argmax(dim=-1, keepdim=True) if self.cfg.aux_free_bias else expert[:, :1]
        z = logits.new_zeros(()) if self.cfg.norm_router else z_loss_from_softmax(logits, probs, top)
        aux = {"load_balance": load_balance_loss(probs, expert, self.num_experts), "z_loss": z}
        if self.cfg.balance == "pool":  # the model balances the bank over every layer (pool_balance_loss)
            aux[BALANCE_TERMS] = torch.stack([expert_fractions(expert, self.num_experts), probs.mean(0)])
        return Routing(expert, gate * keep, keep, probs, aux)

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_e += rate · sign(mean load − load_e) from the load since the last update (slots
        chosen for e, before capacity: capped counts would hide how overloaded e is)."""
        if self.recent_load.sum() > 0:
            self.selection_bias += self.cfg.bias_update_rate * torch.sign(self.recent_load.mean() - self.recent_load)
        self.recent_load.zero_()


def balanced_assignment(scores: Tensor, eps: float | None = None, max_rounds: int = 10_000) -> Tensor:
    """Assign each of T tokens one expert, expert e taking exactly cap_e = T//E (+1 for the
    first T % E experts) tokens, maximising Σ_t scores[t, expert_t] (BASE layers).

    An auction (Bertsekas) for "similar objects": each free token bids for its best expert at
    its current price, raising the price by its margin over the second best plus ε; each
    expert keeps its cap_e highest bids and its price becomes its lowest kept bid once full.
    ε-scaling: phases with ε shrinking 8x down to `eps`, each starting from the last phase's
    prices; a single small ε lets near-identical tokens outbid each other by ε for
    (score range / ε) rounds. The result is within T·eps of the optimum. [T, E] -> ids [T].
    """
    T, E = scores.shape
    scores = scores.detach().float()
    if T < E:  # only the first T experts have a place (one each); the others take no part
        return balanced_assignment(scores[:, :T], eps, max_rounds)
    if E == 1:
        return torch.zeros(T, dtype=torch.long, device=scores.device)
    cap = torch.full((E,), T // E, device=scores.device)
    cap[: T % E] += 1
    if eps is None:
        eps = 1e-4 * max(scores.std().item(), 1e-6)
    price = torch.zeros(E, device=scores.device)
    step = max(eps, (scores.max() - scores.min()).item() / 4)
    while True:
        owner, price = _auction(scores, cap, price, step, max_rounds)
        if step <= eps:
            return owner
        step = max(eps, step / 8)


def _auction(scores: Tensor, cap: Tensor, price: Tensor, eps: float, max_rounds: int) -> tuple[Tensor, Tensor]:
    """One auction phase from all tokens free at the given prices: (owner [T], prices [E])."""
    T, E = scores.shape
    owner = torch.full((T,), -1, dtype=torch.long, device=scores.device)
    held_bid = torch.zeros(T, device=scores.device)
    for _ in range(max_rounds):
        free = (owner < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return owner, price
        value = scores[free] - price
        top2 = value.topk(2, dim=1)
        best = top2.indices[:, 0]
        bid = price[best] + (top2.values[:, 0] - top2.values[:, 1]) + eps
        held = (owner >= 0).nonzero().squeeze(1)
        tok = torch.cat([held, free])
        exp = torch.cat([owner[held], best])
        b = torch.cat([held_bid[held], bid])
        order = torch.argsort(-b, stable=True)
        order = order[torch.argsort(exp[order], stable=True)]  # by expert, then highest bid
        counts = torch.bincount(exp, minlength=E)
        rank = torch.arange(tok.numel(), device=tok.device) - (torch.cumsum(counts, 0) - counts)[exp[order]]
        win = order[rank < cap[exp[order]]]
        owner.fill_(-1)
        owner[tok[win]] = exp[win]
        held_bid[tok[win]] = b[win]
        full = torch.bincount(exp[win], minlength=E) == cap
        lowest = torch.full((E,), float("inf"), device=scores.device).scatter_reduce(0, exp[win], b[win], "amin")
        price = torch.where(full, lowest, price)
    free = (owner < 0).nonzero().squeeze(1)
    if free.numel():  # out of rounds: fill the remaining places in token order
        room = cap - torch.bincount(owner[owner >= 0], minlength=E)
        owner[free] = torch.repeat_interleave(torch.arange(E, device=scores.device), room)
    return owner, price


class BaseRouter(LinearRouter):
    """BASE layers: balanced assignment in training (each expert exactly T/E tokens when E
    divides T), greedy top-1 at inference; gate = sigmoid(score of the chosen expert).
    Balanced by construction, so no load-balancing loss (reported as 0); z-loss as usual.
    """

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.logits(x)
        if self.training:
            expert = balanced_assignment(logits).unsqueeze(1)
        else:
            expert = logits.argmax(dim=-1, keepdim=True)
        gate = torch.sigmoid(logits.gather(1, expert))
        aux = {"load_balance": logits.new_zeros(()), "z_loss": z_loss(logits)}
        return Routing(expert, gate, torch.ones_like(expert, dtype=torch.bool), logits.softmax(-1), aux)


class HashRouter(nn.Module):
    """Hash layers: the expert is a fixed function of the token id; gate 1; no parameters.

    The table maps every vocabulary id to an expert: a seeded random balanced map
    (randperm mod E) until `set_token_frequencies` builds the frequency-balanced one (most
    frequent ids first, each to the currently least-loaded expert). Capacity applies unless
    dropless, as for the other token-choice routers.
    """

    def __init__(self, vocab_size: int, num_experts: int, cfg: MoEConfig, seed: int = 0):
        super().__init__()
        self.num_experts = num_experts
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randperm(vocab_size, generator=g) % num_experts)

    @torch.no_grad()
    def set_token_frequencies(self, counts: Tensor) -> None:
        """Greedy longest-processing-time balance of token counts [V] over the experts."""
        counts = counts.tolist()
        heap = [(0, e) for e in range(self.num_experts)]  # (load, expert), least loaded on top
        table = [0] * len(counts)
        for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
            load, e = heapq.heappop(heap)
            table[i] = e
            heapq.heappush(heap, (load + counts[i], e))
        self.table.copy_(torch.tensor(table))

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError("hash routing needs the token ids")
        expert = self.table[token_ids.reshape(-1)].unsqueeze(1)
        keep = torch.ones_like(expert, dtype=torch.bool)
        if not drops_nothing(self.cfg, self.training):
            cap = layer_capacity(self.cfg, self.training, expert.shape[0], self.num_experts, 1)
            keep = within_capacity(expert, keep, self.num_experts, cap)
        zero = x.new_zeros((), dtype=torch.float32)
        return Routing(expert, keep.float(), keep, None, {"load_balance": zero, "z_loss": zero})


class ExpertChoiceRouter(LinearRouter):
    """Expert choice: each expert takes its C = ceil(cf · T · k / E) highest-probability tokens
    (probabilities softmax over experts, per token); a token may be taken by several experts or
    by none. Balanced by construction (no load-balancing loss).

    Not causal: whether a token is taken depends on the other tokens of the batch, later ones
    included, so inference scores depend on the future. Use it for analysis, not generation.
    The same capacity factor applies in training and evaluation.
    """

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        T = x.shape[0]
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        k = router_top_k(self.cfg)
        cap = min(T, capacity(T, self.num_experts, k, self.cfg.capacity_factor, self.cfg.min_capacity))
        taken = probs.t().topk(cap, dim=1).indices  # [E, C] token ids
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[taken, torch.arange(self.num_experts, device=x.device).unsqueeze(1)] = True
        expert = torch.arange(self.num_experts, device=x.device).expand(T, -1)
        aux = {"load_balance": logits.new_zeros(()), "z_loss": z_loss(logits)}
        return Routing(expert, probs * keep, keep, probs, aux)


ROUTER_CLASSES = {"switch": TopKRouter, "gshard": TopKRouter, "topk": TopKRouter, "base": BaseRouter,
                  "hash": HashRouter, "expert_choice": ExpertChoiceRouter}
assert set(ROUTER_CLASSES) == set(ROUTER_KINDS), "every router kind has a class, and no class lacks its kind"


def build_router(cfg: MoEConfig, d_model: int, num_experts: int, vocab_size: int) -> nn.Module:
    """The router config.ROUTER_KINDS names (its properties are there)."""
    cls = ROUTER_CLASSES[cfg.router]
    return cls(vocab_size, num_experts, cfg) if cls is HashRouter else cls(d_model, num_experts, cfg)
