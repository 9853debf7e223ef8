"""Routers and the MoE layer, specified by naive per-token reference loops.

Each reference below is written from docs/design.md and the routers.py docstring with plain Python
loops over tokens and experts (no sorting tricks, no batched scatter), computed in float64 from
the same fp32 weights and inputs as the fast path, and compared to 1e-5:

    C = max(min_capacity, ceil(cf · T · k / E))
    slots claim capacity slot-major: every token's 1st choice (token order), then every 2nd ...
    dropped slot: gate 0, keep False
    load balance = E · Σ_e f_e · P_e   (f_e: fraction of chosen slots, before capacity, on e)
    z-loss = mean_t logsumexp(logits_t)²
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from samoe.config import MoEConfig
from samoe.moe.dispatch import dispatch
from samoe.moe.experts import ExpertWeights
from samoe.moe.layer import MoEFeedForward
from samoe.moe.routers import BaseRouter, ExpertChoiceRouter, HashRouter, TopKRouter, balanced_assignment, build_router

D = 12
VOCAB = 50
ATOL = 1e-5


# --------------------------------------------------------------------------- naive references


def ref_logits(x, W):
    """logits[t][e] = <x_t, W_e>, one dot product at a time, in float64."""
    x, W = x.detach(), W.detach()
    return [[sum(float(x[t, i]) * float(W[e, i]) for i in range(x.shape[1])) for e in range(W.shape[0])]
            for t in range(x.shape[0])]


def softmax(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    return [v / sum(ex) for v in ex]


def logsumexp(row):
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def cap_of(T, E, k, cf, min_capacity):
    return max(min_capacity, math.ceil(cf * T * k / E))


def claim_capacity(expert, keep, E, C):
    """Slot-major: slot j of every token (in token order) before slot j + 1 of any token."""
    T, k = len(expert), len(expert[0])
    used = [0] * E
    out = [row[:] for row in keep]
    for j in range(k):
        for t in range(T):
            if not out[t][j]:
                continue
            e = expert[t][j]
            if used[e] < C:
                used[e] += 1
            else:
                out[t][j] = False
    return out


def ref_token_choice(x, W, k, cfg, training, bias=None, second_kept=None):
    """switch / gshard / topk: top-k of softmax (selection by probs + bias), gates renormalised
    over the k chosen when k > 1, capacity unless dropless (or evaluating with eval_dropless).
    second_kept: gshard's random routing."""
    logits = ref_logits(x, W)
    T, E = len(logits), len(logits[0])
    probs = [softmax(row) for row in logits]
    expert, gate = [], []
    for t in range(T):
        score = [probs[t][e] + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        chosen = sorted(range(E), key=lambda e: -score[e])[:k]
        g = [probs[t][e] for e in chosen]
        if k > 1:
            g = [v / sum(g) for v in g]
        expert.append(chosen)
        gate.append(g)
    keep = [[True] * k for _ in range(T)]
    if second_kept is not None:
        for t in range(T):
            keep[t][1] = bool(second_kept[t])
    if not (cfg.dropless or (not training and cfg.eval_dropless)):
        cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
        keep = claim_capacity(expert, keep, E, cap_of(T, E, k, cf, cfg.min_capacity))
    gate = [[gate[t][j] if keep[t][j] else 0.0 for j in range(k)] for t in range(T)]
    f = [sum(expert[t][j] == e for t in range(T) for j in range(k)) / (T * k) for e in range(E)]
    P = [sum(probs[t][e] for t in range(T)) / T for e in range(E)]
    aux = {"load_balance": E * sum(f[e] * P[e] for e in range(E)),
           "z_loss": sum(logsumexp(row) ** 2 for row in logits) / T}
    return dict(expert=expert, gate=gate, keep=keep, probs=probs, aux=aux)


def ref_expert_choice(x, W, cfg):
    """Each expert e takes the C tokens with the highest probs[t][e]; gate = that probability."""
    logits = ref_logits(x, W)
    T, E = len(logits), len(logits[0])
    probs = [softmax(row) for row in logits]
    C = min(T, cap_of(T, E, cfg.top_k, cfg.capacity_factor, cfg.min_capacity))
    keep = [[False] * E for _ in range(T)]
    for e in range(E):
        for t in sorted(range(T), key=lambda t: -probs[t][e])[:C]:
            keep[t][e] = True
    gate = [[probs[t][e] if keep[t][e] else 0.0 for e in range(E)] for t in range(T)]
    expert = [list(range(E)) for _ in range(T)]
    aux = {"load_balance": 0.0, "z_loss": sum(logsumexp(row) ** 2 for row in logits) / T}
    return dict(expert=expert, gate=gate, keep=keep, probs=probs, aux=aux)


def ref_hash(token_ids, table, E, cfg, training):
    expert = [[int(table[int(i)])] for i in token_ids]
    keep = [[True] for _ in expert]
    if not (cfg.dropless or (not training and cfg.eval_dropless)):
        cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
        keep = claim_capacity(expert, keep, E, cap_of(len(expert), E, 1, cf, cfg.min_capacity))
    gate = [[1.0 if kp[0] else 0.0] for kp in keep]
    return dict(expert=expert, gate=gate, keep=keep, probs=None, aux={"load_balance": 0.0, "z_loss": 0.0})


def balanced_caps(T, E):
    """Expert e takes T // E tokens, the first T % E experts one more (routers.py docstring)."""
    return [T // E + (1 if e < T % E else 0) for e in range(E)]


def brute_force_assignment(scores, caps):
    """The best balanced assignment by exhaustive search (small T only)."""
    T, E = len(scores), len(caps)
    best = (-math.inf, None)
    room = list(caps)
    chosen = []

    def go(t, total):
        nonlocal best
        if t == T:
            if total > best[0]:
                best = (total, list(chosen))
            return
        for e in range(E):
            if room[e]:
                room[e] -= 1
                chosen.append(e)
                go(t + 1, total + scores[t][e])
                chosen.pop()
                room[e] += 1

    go(0, 0.0)
    return best


def greedy_assignment(scores, caps):
    """Greedy balanced: all (token, expert) pairs by score, best first; take if both are free."""
    T, E = len(scores), len(caps)
    pairs = sorted(((scores[t][e], t, e) for t in range(T) for e in range(E)), reverse=True)
    owner, room = [None] * T, list(caps)
    for _, t, e in pairs:
        if owner[t] is None and room[e]:
            owner[t], room[e] = e, room[e] - 1
    return owner


def ref_expert_ffn(x_t, w1, b1, w2, b2, e, activation):
    """expert_e(x) = act(x · W1[e] + b1[e]) · W2[e] + b2[e], one hidden unit at a time."""
    d, h = w1.shape[1], w1.shape[2]
    u = [sum(float(x_t[i]) * float(w1[e, i, j]) for i in range(d)) + float(b1[e, j]) for j in range(h)]
    if activation == "swiglu":  # h = 2f: silu(gate half) * up half
        f = h // 2
        a = [u[j] / (1 + math.exp(-u[j])) * u[f + j] for j in range(f)]
    else:  # exact (erf) GELU
        a = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in u]
    return [sum(a[j] * float(w2[e, j, o]) for j in range(len(a))) + float(b2[e, o]) for o in range(w2.shape[2])]


def ref_moe_output(x, ref, weights, activation):
    """y[t] = Σ_{kept slots j} gate[t][j] · expert_{e[t][j]}(x_t)."""
    w1, b1, w2, b2 = (w.detach() for w in weights)
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(ref["expert"][t]):
            if ref["keep"][t][j]:
                out = ref_expert_ffn(x[t], w1, b1, w2, b2, e, activation)
                y[t] += ref["gate"][t][j] * torch.tensor(out, dtype=torch.float64)
    return y


# --------------------------------------------------------------------------- helpers


def assert_matches(routing, ref):
    assert torch.equal(routing.keep, torch.tensor(ref["keep"])), "kept / dropped slots differ"
    assert torch.equal(routing.expert, torch.tensor(ref["expert"])), "chosen experts differ"
    torch.testing.assert_close(routing.gate.double(), torch.tensor(ref["gate"], dtype=torch.float64),
                               atol=ATOL, rtol=0)
    if ref["probs"] is not None:
        torch.testing.assert_close(routing.probs.double(), torch.tensor(ref["probs"], dtype=torch.float64),
                                   atol=ATOL, rtol=0)
    assert set(routing.aux) == set(ref["aux"])
    for name, value in ref["aux"].items():
        assert abs(routing.aux[name].item() - value) < ATOL * max(1.0, abs(value)), name  # fp32: relative


def make_router(router, E, seed=0, scale=0.5, **kw):
    cfg = MoEConfig(router=router, num_experts=E, **kw)
    torch.manual_seed(seed)
    r = build_router(cfg, D, E, VOCAB)
    if hasattr(r, "weight"):
        with torch.no_grad():
            r.weight.copy_(torch.randn(E, D) * scale)
    return r, cfg


def inputs(T, seed=1, skew_to=None):
    """Random router inputs; skew_to=e makes every token prefer expert e (with make_skewed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    if skew_to is not None:
        x[:, 0] = x[:, 0].abs() + 2.0
    return x


def make_skewed(router, e):
    """Router weights under which every token from inputs(skew_to=e) prefers expert e by a logit
    margin of about 3 to 6 (clear, yet without fp32 probabilities saturating at 1)."""
    with torch.no_grad():
        router.weight[:, 1:] *= 0.2
        router.weight[:, 0] = 0.0
        router.weight[e, 0] = 1.5


# (T, E, capacity_factor, min_capacity, skew): drops, fewer tokens than experts, capacity larger
# than T, and every token preferring one expert.
CASES = {
    "drops": (40, 8, 1.0, 0, False),
    "few_tokens": (3, 8, 1.0, 0, False),
    "capacity_gt_tokens": (10, 4, 8.0, 0, False),
    "min_capacity": (24, 4, 0.2, 5, False),
    "one_expert_preferred": (32, 4, 1.25, 0, True),
}
TOKEN_CHOICE = [("switch", 1), ("gshard", 2), ("topk", 3)]


# --------------------------------------------------------------------------- token-choice routers


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("router,k", TOKEN_CHOICE)
@pytest.mark.parametrize("dropless", [False, True])
def test_token_choice_router_equals_naive_reference(router, k, case, dropless):
    T, E, cf, min_cap, skew = CASES[case]
    r, cfg = make_router(router, E, top_k=k, capacity_factor=cf, min_capacity=min_cap, dropless=dropless)
    assert r.k == k
    x = inputs(T, skew_to=1 if skew else None)
    if skew:
        make_skewed(r, 1)
    ref = ref_token_choice(x, r.weight, k, cfg, training=True)
    assert_matches(r.train()(x), ref)
    if skew:
        assert all(row[0] == 1 for row in ref["expert"])
    if dropless:
        assert all(all(row) for row in ref["keep"])


@pytest.mark.parametrize("router,k", TOKEN_CHOICE)
def test_token_choice_router_uses_eval_capacity_factor_when_not_eval_dropless(router, k):
    r, cfg = make_router(router, 4, top_k=k, capacity_factor=0.5, eval_capacity_factor=1.0, min_capacity=0,
                         eval_dropless=False)
    x = inputs(32, skew_to=0)
    make_skewed(r, 0)
    routing = r.eval()(x)
    assert_matches(routing, ref_token_choice(x, r.weight, k, cfg, training=False))
    assert routing.keep[:, 0].sum() == cap_of(32, 4, k, 1.0, 0)  # expert 0 full at the eval capacity


@pytest.mark.parametrize("router,k", TOKEN_CHOICE)
def test_token_choice_router_evaluates_dropless_by_default(router, k):
    """Quality is judged without drops: eval mode keeps every slot; training still drops."""
    r, cfg = make_router(router, 4, top_k=k, capacity_factor=0.5, eval_capacity_factor=1.0, min_capacity=0)
    x = inputs(32, skew_to=0)
    make_skewed(r, 0)
    evaluated = r.eval()(x)
    assert evaluated.keep.all()
    assert_matches(evaluated, ref_token_choice(x, r.weight, k, cfg, training=False))
    assert not r.train()(x).keep.all()


def test_capacity_is_claimed_slot_major():
    """A token's 2nd choice never displaces a later token's 1st choice."""
    r, cfg = make_router("gshard", 4, capacity_factor=1.0, min_capacity=0)
    x = inputs(8, skew_to=0)
    make_skewed(r, 0)  # every token's 1st choice is expert 0, C = 4
    routing = r.train()(x)
    assert routing.keep[:, 0].tolist() == [True] * 4 + [False] * 4
    assert_matches(routing, ref_token_choice(x, r.weight, 2, cfg, training=True))


def test_uniform_routing_has_load_balance_one():
    """E · Σ f_e P_e = 1 when routing and probabilities are uniform (all-zero router)."""
    r, _ = make_router("switch", 4)
    with torch.no_grad():
        r.weight.zero_()
    routing = r(torch.randn(8, D))
    assert routing.aux["load_balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert routing.aux["z_loss"].item() == pytest.approx(math.log(4) ** 2, abs=1e-5)


# --------------------------------------------------------------------------- gshard random routing


def test_gshard_random_routing_equals_reference_with_the_same_draws():
    """In training the 2nd slot is kept iff u_t < 2·g2_t, u_t the router's torch.rand draw."""
    r, cfg = make_router("gshard", 4, random_routing=True, capacity_factor=1.0, min_capacity=0)
    x = inputs(40)
    torch.manual_seed(123)
    routing = r.train()(x)
    torch.manual_seed(123)
    u = torch.rand(40)
    g2 = ref_token_choice(x, r.weight, 2, MoEConfig(router="gshard", num_experts=4, dropless=True),
                          training=True)["gate"]  # the renormalised gates, before any drop
    second = [float(u[t]) < 2 * g2[t][1] for t in range(40)]
    assert not all(second), "the test needs some second slots dropped by random routing"
    assert_matches(routing, ref_token_choice(x, r.weight, 2, cfg, training=True, second_kept=second))


def test_gshard_random_routing_keep_rate_is_min_one_2g2():
    T = 20000
    r, _ = make_router("gshard", 8, random_routing=True, dropless=True, scale=0.3)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    routing = r.train()(x)
    probs = routing.probs
    top2 = probs.topk(2, dim=-1).values
    g2 = top2[:, 1] / top2.sum(-1)
    expected = torch.clamp(2 * g2, max=1).mean().item()
    assert 0.1 < 1 - expected, "the test needs g2 < 1/2 often enough to matter"
    assert routing.keep[:, 1].float().mean().item() == pytest.approx(expected, abs=0.02)  # ~6 sigma
    assert torch.all(routing.gate[~routing.keep] == 0)
    assert torch.all(routing.keep[:, 0])


def test_gshard_random_routing_is_off_in_eval():
    r, _ = make_router("gshard", 8, random_routing=True, dropless=True)
    assert r.eval()(inputs(200)).keep.all()


@pytest.mark.parametrize("aux_free_bias", [False, True])
def test_the_z_loss_taken_from_the_softmax_has_logsumexps_value_and_gradient(aux_free_bias):
    """The top-k router takes logsumexp(l) as l_j - log p_j at each token's most probable expert
    (not its selected one: a selection bias of 2 makes them differ here)."""
    r, _ = make_router("topk", 4, top_k=2, aux_free_bias=aux_free_bias, dropless=True, scale=3.0)
    with torch.no_grad():
        r.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
    x = inputs(16)
    z = r.train()(x).aux["z_loss"]
    (g,) = torch.autograd.grad(z, [r.weight])
    z_ref = torch.logsumexp(x @ r.weight.t(), dim=-1).square().mean()
    (g_ref,) = torch.autograd.grad(z_ref, [r.weight])
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(g, g_ref)


# --------------------------------------------------------------------------- aux-free bias


def test_aux_free_bias_changes_selection_but_not_gates():
    r, cfg = make_router("switch", 4, aux_free_bias=True, dropless=True)
    x = inputs(16)
    with torch.no_grad():
        r.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))  # more than any prob gap
    routing = r.eval()(x)
    assert routing.expert.eq(3).all()
    torch.testing.assert_close(routing.gate[:, 0], routing.probs[:, 3])  # gate: the unbiased prob
    assert_matches(routing, ref_token_choice(x, r.weight, 1, cfg, training=False, bias=r.selection_bias))


@pytest.mark.parametrize("dropless", [True, False])
def test_update_bias_moves_toward_balance(dropless):
    """The load is the slots chosen for each expert (before capacity): with capacity factor 0.5
    every expert is full, yet expert 0 is the one overloaded."""
    r, _ = make_router("topk", 4, top_k=2, aux_free_bias=True, dropless=dropless, capacity_factor=0.5,
                       min_capacity=0, bias_update_rate=0.1)
    x = inputs(32, skew_to=0)
    make_skewed(r, 0)
    r.eval()(x)
    r.update_bias()
    assert torch.equal(r.selection_bias, torch.zeros(4)), "eval forwards do not count load"
    routing = r.train()(x)
    load = torch.bincount(routing.expert.reshape(-1), minlength=4).float()
    assert load[0] == 32 and load.min() < load.mean()
    r.update_bias()
    expected = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(r.selection_bias, expected)
    assert r.selection_bias[0] < 0  # the overloaded expert is pushed down
    assert r.recent_load.sum() == 0
    r.update_bias()  # nothing routed since: no change
    torch.testing.assert_close(r.selection_bias, expected)


# --------------------------------------------------------------------------- BASE


@pytest.mark.parametrize("T,E,skew", [(12, 3, False), (8, 4, False), (6, 2, True), (7, 3, False), (3, 5, False)])
def test_base_training_equals_brute_force_optimum(T, E, skew):
    r, _ = make_router("base", E)
    x = inputs(T, skew_to=0 if skew else None)
    if skew:
        make_skewed(r, 0)
    routing = r.train()(x)
    logits = ref_logits(x, r.weight)
    _, best = brute_force_assignment(logits, balanced_caps(T, E)) if T <= 8 else (None, None)
    chosen = routing.expert[:, 0].tolist()
    assert torch.bincount(routing.expert[:, 0], minlength=E).tolist() == balanced_caps(T, E)
    if best is not None:
        assert chosen == best
    ref = dict(expert=[[e] for e in chosen], keep=[[True]] * T,
               gate=[[1 / (1 + math.exp(-logits[t][e]))] for t, e in enumerate(chosen)],
               probs=[softmax(row) for row in logits],
               aux={"load_balance": 0.0, "z_loss": sum(logsumexp(row) ** 2 for row in logits) / T})
    assert_matches(routing, ref)


@pytest.mark.parametrize("case", ["drops", "few_tokens", "one_expert_preferred"])
def test_base_eval_is_greedy_top1_with_sigmoid_gate(case):
    T, E, _, _, skew = CASES[case]
    r, _ = make_router("base", E)
    x = inputs(T, skew_to=1 if skew else None)
    if skew:
        make_skewed(r, 1)
    logits = ref_logits(x, r.weight)
    chosen = [max(range(E), key=lambda e: row[e]) for row in logits]
    ref = dict(expert=[[e] for e in chosen], keep=[[True]] * T,
               gate=[[1 / (1 + math.exp(-logits[t][e]))] for t, e in enumerate(chosen)],
               probs=[softmax(row) for row in logits],
               aux={"load_balance": 0.0, "z_loss": sum(logsumexp(row) ** 2 for row in logits) / T})
    assert_matches(r.eval()(x), ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T,E", [(64, 8), (48, 3), (50, 8), (5, 8), (100, 7), (256, 16)])
@pytest.mark.parametrize("kind", ["random", "skewed", "similar", "ties"])
def test_balanced_assignment_is_balanced_and_beats_greedy(T, E, seed, kind):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=g)
    if kind == "skewed":  # every token prefers expert 0, by different margins
        scores[:, 0] += 3 + torch.rand(T, generator=g)
    elif kind == "similar":  # near-identical tokens (repeated ids, say): one preference order
        scores = scores[:1] + 1e-3 * torch.randn(T, E, generator=g)
    elif kind == "ties":
        scores = torch.randint(0, 3, (T, E), generator=g).float()
    owner = balanced_assignment(scores)
    counts = torch.bincount(owner, minlength=E).tolist()
    assert counts == balanced_caps(T, E)
    assert max(counts) - min(counts) <= 1 and (T % E or max(counts) == T // E)
    rows = scores.double().tolist()
    total = sum(rows[t][e] for t, e in enumerate(owner.tolist()))
    greedy = greedy_assignment(rows, balanced_caps(T, E))
    assert total >= sum(rows[t][e] for t, e in enumerate(greedy)) - 1e-6


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["random", "similar", "ties"])
def test_balanced_assignment_is_within_t_eps_of_the_optimum(seed, kind):
    g = torch.Generator().manual_seed(seed)
    T, E = 8, 4
    scores = torch.randn(T, E, generator=g)
    if kind == "similar":
        scores = scores[:1] + 1e-3 * torch.randn(T, E, generator=g)
    elif kind == "ties":
        scores = torch.randint(0, 3, (T, E), generator=g).float()
    rows = scores.double().tolist()
    best, _ = brute_force_assignment(rows, balanced_caps(T, E))
    owner = balanced_assignment(scores, eps=1e-6)
    assert torch.bincount(owner, minlength=E).tolist() == balanced_caps(T, E)
    assert sum(rows[t][e] for t, e in enumerate(owner.tolist())) >= best - T * 1e-6 - 1e-6


# --------------------------------------------------------------------------- hash


@pytest.mark.parametrize("eval_dropless", [False, True])
@pytest.mark.parametrize("dropless", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_hash_router_is_a_table_lookup(dropless, training, eval_dropless):
    r, cfg = make_router("hash", 4, dropless=dropless, capacity_factor=1.0, eval_capacity_factor=1.0,
                         min_capacity=0, eval_dropless=eval_dropless)
    ids = torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(3))  # few ids: drops
    routing = r.train(training)(torch.randn(30, D), ids)
    ref = ref_hash(ids, r.table, 4, cfg, training)
    assert_matches(routing, ref)
    assert routing.probs is None
    drops = not (dropless or (eval_dropless and not training))
    assert drops == (not all(row[0] for row in ref["keep"])), "the test needs drops"


def test_hash_router_needs_token_ids():
    r, _ = make_router("hash", 4)
    with pytest.raises(ValueError, match="token ids"):
        r(torch.randn(3, D))


def test_hash_default_table_is_balanced_over_the_vocabulary():
    r, _ = make_router("hash", 4)
    counts = torch.bincount(r.table, minlength=4)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("E", [3, 8])
def test_frequency_balanced_hash_table(E):
    g = torch.Generator().manual_seed(E)
    counts = (1000 / torch.arange(1, VOCAB + 1).float() ** 1.1).long() + torch.randint(0, 5, (VOCAB,), generator=g)
    r, _ = make_router("hash", E)
    r.set_token_frequencies(counts)
    load = torch.zeros(E, dtype=torch.long).index_add_(0, r.table, counts)
    assert load.max() - load.min() <= counts.max()
    assert load.max() < counts.sum() / E + counts.max()
    ids = torch.arange(VOCAB).repeat(2)
    routing = r(torch.zeros(2 * VOCAB, D), ids)
    assert torch.equal(routing.expert[:VOCAB], routing.expert[VOCAB:])  # same id, same expert


# --------------------------------------------------------------------------- expert choice


@pytest.mark.parametrize("case", ["drops", "few_tokens", "capacity_gt_tokens", "one_expert_preferred"])
@pytest.mark.parametrize("k", [1, 2])
def test_expert_choice_equals_naive_reference(case, k):
    T, E, cf, min_cap, skew = CASES[case]
    r, cfg = make_router("expert_choice", E, top_k=k, capacity_factor=cf, min_capacity=min_cap)
    x = inputs(T, skew_to=1 if skew else None)
    if skew:
        make_skewed(r, 1)
    routing = r.train()(x)
    assert_matches(routing, ref_expert_choice(x, r.weight, cfg))
    C = min(T, cap_of(T, E, k, cf, min_cap))
    assert routing.keep.sum(0).tolist() == [C] * E  # each expert exactly C tokens
    assert_matches(r.eval()(x), ref_expert_choice(x, r.weight, cfg))  # same capacity in eval


def test_expert_choice_is_not_causal():
    """Documented: a later token can take an earlier token's place in an expert."""
    r, _ = make_router("expert_choice", 4, capacity_factor=1.0, min_capacity=0)
    x = inputs(8)
    before = r.eval()(x)
    e = int((~before.keep[-1]).nonzero()[0])  # an expert that did not take the last token
    x2 = x.clone()
    x2[-1] = r.weight[e].detach() * 10  # now the last token has the highest prob for expert e
    after = r.eval()(x2)
    assert after.keep[-1, e]
    assert not torch.equal(before.keep[:-1, e], after.keep[:-1, e])  # an earlier token lost its place


# --------------------------------------------------------------------------- the MoE layer


ROUTER_KW = {"switch": {}, "gshard": {}, "topk": {"top_k": 3}, "base": {}, "hash": {},
             "expert_choice": {"top_k": 2}}


def reference_routing(router, r, cfg, x, ids, training):
    if router in ("switch", "gshard", "topk"):
        return ref_token_choice(x, r.weight, r.k, cfg, training)
    if router == "hash":
        return ref_hash(ids, r.table, r.num_experts, cfg, training)
    if router == "expert_choice":
        return ref_expert_choice(x, r.weight, cfg)
    logits = ref_logits(x, r.weight)  # base
    if training:
        chosen = brute_force_assignment(logits, balanced_caps(len(logits), r.num_experts))[1]
    else:
        chosen = [max(range(r.num_experts), key=lambda e: row[e]) for row in logits]
    return dict(expert=[[e] for e in chosen], keep=[[True]] * len(chosen),
                gate=[[1 / (1 + math.exp(-logits[t][e]))] for t, e in enumerate(chosen)])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("router", list(ROUTER_KW))
@pytest.mark.parametrize("training", [True, False])
def test_moe_layer_equals_naive_per_token_loop(router, activation, training):
    E, hidden = 4, 6
    r, cfg = make_router(router, E, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
                         eval_dropless=False, **ROUTER_KW[router])
    torch.manual_seed(7)
    experts = ExpertWeights((), E, D, hidden, activation, n_layers=2)
    with torch.no_grad():  # non-zero biases and O(1) weights, so every term matters
        for p in experts.parameters():
            p.normal_(0, 0.5)
    layer = MoEFeedForward(r, experts, activation).train(training)
    x = torch.randn(2, 4, D)  # B = 2, S = 4: T = 8 tokens
    ids = torch.randint(0, VOCAB, (2, 4))
    y, _ = layer(x, ids)
    flat = x.reshape(8, D)
    ref = reference_routing(router, r, cfg, flat, ids.reshape(-1), training)
    y_ref = ref_moe_output(flat, ref, experts(), activation)
    torch.testing.assert_close(y.reshape(8, D).double(), y_ref, atol=ATOL, rtol=0)
    if router in ("switch", "gshard", "topk"):
        assert not all(all(row) for row in ref["keep"]), "the test needs drops"
    dropped = [t for t in range(8) if not any(ref["keep"][t])]
    for t in dropped:
        assert torch.all(y.reshape(8, D)[t] == 0), "a token dropped everywhere gets a zero row"


def test_dispatch_with_nothing_kept_returns_zeros():
    r, _ = make_router("switch", 4)
    routing = r(torch.randn(5, D))
    routing.keep[:] = False
    experts = ExpertWeights((), 4, D, 6, "gelu", n_layers=1)
    assert torch.equal(dispatch(torch.randn(5, D), routing, experts(), "gelu"), torch.zeros(5, D))


def test_moe_layer_gradients_match_naive_reference():
    """Gradients through dispatch (experts and router gates) equal those of the naive loop."""
    E, hidden, activation = 4, 5, "swiglu"
    r, _ = make_router("gshard", E, capacity_factor=1.0, min_capacity=0)
    torch.manual_seed(2)
    experts = ExpertWeights((), E, D, hidden, activation, n_layers=1)
    layer = MoEFeedForward(r, experts, activation)
    x = torch.randn(1, 10, D)
    y, _ = layer(x, torch.zeros(1, 10, dtype=torch.long))
    (y * torch.arange(D)).sum().backward()
    fast = [p.grad.clone() for p in (r.weight, *experts.parameters())]
    for p in (r.weight, *experts.parameters()):
        p.grad = None
    routing = r(x[0])  # same routing; naive combine with autograd, one token and slot at a time
    w1, b1, w2, b2 = experts()
    out = []
    for t in range(10):
        acc = torch.zeros(D)
        for j in range(2):
            if routing.keep[t, j]:
                e = int(routing.expert[t, j])
                u = x[0, t] @ w1[e] + b1[e]
                a = F.silu(u[:hidden]) * u[hidden:]
                acc = acc + routing.gate[t, j] * (a @ w2[e] + b2[e])
        out.append(acc)
    (torch.stack(out) * torch.arange(D)).sum().backward()
    for g_fast, p in zip(fast, (r.weight, *experts.parameters())):
        torch.testing.assert_close(g_fast, p.grad, atol=ATOL, rtol=1e-5)


def test_build_router_kinds():
    kinds = {"switch": TopKRouter, "gshard": TopKRouter, "topk": TopKRouter, "base": BaseRouter,
             "hash": HashRouter, "expert_choice": ExpertChoiceRouter}
    for name, cls in kinds.items():
        assert type(build_router(MoEConfig(router=name, num_experts=4), D, 4, VOCAB)) is cls


def test_stats_report_dropped_fraction_and_entropy():
    r, _ = make_router("switch", 4, capacity_factor=1.0, min_capacity=0)
    x = inputs(8, skew_to=0)
    make_skewed(r, 0)
    stats = r(x).stats()
    assert stats["dropped_frac"].item() == pytest.approx(6 / 8)  # C = 2 of the 8 tokens kept
    assert 0 <= stats["router_entropy"].item() <= math.log(4)


def test_brute_force_reference_is_exhaustive():
    """brute_force_assignment agrees with itertools enumeration on a tiny case."""
    scores = [[0.1, 0.9], [0.8, 0.3], [0.5, 0.4], [0.2, 0.7]]
    best = max((p for p in itertools.product(range(2), repeat=4) if list(p).count(0) == 2),
               key=lambda p: sum(scores[t][e] for t, e in enumerate(p)))
    assert brute_force_assignment(scores, [2, 2])[1] == list(best)
