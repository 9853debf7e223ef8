"""SaMoE: every MoE layer's experts are a soft combination of one global pool (docs/design.md).

    c_l = softmax(a_l / τ) over K,   W_l[e] = Σ_k c_l[e, k] · P[k, e]

Specified by: (1) K = L_moe with frozen one-hot coefficients is exactly the standard MoE
holding the same weights, outputs and gradients; (2) K = 1 makes every layer's experts the
pool's; (3) with trainable coefficients gradients reach every pool tensor and coefficient.
"""

import copy

import pytest
import torch

from samoe.config import Config, ModelConfig, MoEConfig, PoolConfig, moe_layer_ids
from samoe.config_load import validate
from samoe.model.gpt import GPT
from samoe.moe.experts import PoolMixture, initial_coefficient_logits

WEIGHTS = ("w1", "b1", "w2", "b2")


def model_cfg(sharing="pool", n_layers=4, every=1, router="gshard", activation="gelu", **pool) -> ModelConfig:
    moe = MoEConfig(every=every, num_experts=4, router=router, sharing=sharing, capacity_factor=1.0,
                    min_capacity=0, pool=PoolConfig(**pool))
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layers=n_layers, n_heads=2, d_model=16,
                      activation=activation, moe=moe)
    return validate(Config(model=cfg)).model


def one_hot_index(init: str, layer: int, K: int, n_moe: int) -> int:
    """The pool entry layer l uses: cycle -> l mod K; sequence -> floor(l · K / L_moe)."""
    return layer % K if init == "cycle" else layer * K // n_moe


def batch(seed=0, B=2, S=16, V=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


def loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    out = model(idx, targets)
    (out.loss + out.aux_loss).backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def private_copy(pool_model: GPT, init: str) -> tuple[GPT, list[int]]:
    """A standard MoE (sharing = private) holding the pool model's weights: layer l's experts
    are pool[k_l] per the one-hot map; every other tensor is copied by name."""
    cfg = copy.deepcopy(pool_model.cfg)
    cfg.moe.sharing = "private"
    torch.manual_seed(99)  # different init, so nothing matches unless copied
    private = GPT(cfg)
    n_moe = len(pool_model.moe_layers())
    K = cfg.moe.pool.size
    ks = [one_hot_index(init, pos, K, n_moe) for pos in range(n_moe)]
    pool_state = pool_model.state_dict()
    new_state = {}
    for name in private.state_dict():
        if ".ffn.experts." in name:
            block = int(name.split(".")[1])
            pos = moe_layer_ids(cfg).index(block)
            new_state[name] = pool_state[f"expert_pool.{name.rsplit('.', 1)[1]}"][ks[pos]]
        else:
            new_state[name] = pool_state[name]
    private.load_state_dict(new_state)
    return private, ks


@pytest.mark.parametrize("granularity", ["layer", "expert"])
@pytest.mark.parametrize("init", ["sequence", "cycle"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_frozen_one_hot_pool_with_k_equal_layers_is_standard_moe(granularity, init, activation):
    cfg = model_cfg(activation=activation, size=4, granularity=granularity, init=init, freeze=True)
    torch.manual_seed(0)
    samoe = GPT(cfg)
    for pos, layer in enumerate(samoe.moe_layers()):  # the coefficients are exactly one-hot
        c = layer.experts.coefficients()
        expected = torch.zeros_like(c)
        expected[..., one_hot_index(init, pos, 4, 4)] = 1.0
        assert torch.equal(c, expected)
    assert not any("coef_logits" in n for n, _ in samoe.named_parameters()), "frozen: not trained"
    private, ks = private_copy(samoe, init)
    assert sorted(ks) == [0, 1, 2, 3]  # K = L_moe: each pool entry serves exactly one layer

    idx, targets = batch()
    out_s, grads_s = loss_and_grads(samoe, idx, targets)
    out_p, grads_p = loss_and_grads(private, idx, targets)
    torch.testing.assert_close(out_s.logits, out_p.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_s.loss, out_p.loss, atol=1e-6, rtol=0)
    for name in out_s.aux:
        torch.testing.assert_close(out_s.aux[name], out_p.aux[name], atol=1e-6, rtol=0)

    for name, g in grads_p.items():
        if ".ffn.experts." in name:
            continue
        torch.testing.assert_close(grads_s[name], g, atol=1e-6, rtol=1e-5, msg=name)
    moe_ids = moe_layer_ids(cfg)
    for w in WEIGHTS:
        for pos, block in enumerate(moe_ids):
            torch.testing.assert_close(grads_s[f"expert_pool.{w}"][ks[pos]], grads_p[f"blocks.{block}.ffn.experts.{w}"],
                                       atol=1e-6, rtol=1e-5, msg=f"{w} of layer {pos}")


@pytest.mark.parametrize("init,layer_to_pool", [("cycle", [0, 1, 0, 1]), ("sequence", [0, 0, 1, 1])])
def test_frozen_one_hot_with_fewer_pool_entries_is_hard_layer_sharing(init, layer_to_pool):
    """Hard cross-layer sharing (K = 2 < L_moe = 4): the standard MoE whose layers hold copies of
    the pool entry they share; pool[k]'s gradient is the sum of the gradients of its layers."""
    cfg = model_cfg(size=2, init=init, freeze=True)
    torch.manual_seed(1)
    samoe = GPT(cfg)
    for pos, layer in enumerate(samoe.moe_layers()):
        assert layer.experts.coefficients().tolist() == [float(k == layer_to_pool[pos]) for k in range(2)]
    private, ks = private_copy(samoe, init)
    assert ks == layer_to_pool
    idx, targets = batch(1)
    out_s, grads_s = loss_and_grads(samoe, idx, targets)
    out_p, grads_p = loss_and_grads(private, idx, targets)
    torch.testing.assert_close(out_s.logits, out_p.logits, atol=1e-6, rtol=0)
    for w in WEIGHTS:
        for k in range(2):
            total = sum(grads_p[f"blocks.{b}.ffn.experts.{w}"] for pos, b in enumerate(moe_layer_ids(cfg))
                        if ks[pos] == k)
            torch.testing.assert_close(grads_s[f"expert_pool.{w}"][k], total, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["layer", "expert"])
def test_pool_of_one_gives_every_layer_the_same_experts(granularity):
    torch.manual_seed(0)
    model = GPT(model_cfg(size=1, granularity=granularity, init="noisy"))
    pool = model.expert_pool()
    for layer in model.moe_layers():
        for mixed, p in zip(layer.experts(), pool):
            assert torch.equal(mixed, p[0])


@pytest.mark.parametrize("granularity", ["layer", "expert"])
def test_mixture_is_the_softmax_weighted_sum_of_the_pool(granularity):
    """W_l[e] = Σ_k softmax(a_l / τ)[e, k] · P[k, e], written out one expert at a time."""
    torch.manual_seed(0)
    model = GPT(model_cfg(size=3, granularity=granularity, init="noisy", init_noise=1.0, temperature=0.7))
    pool = model.expert_pool()
    for layer in model.moe_layers():
        a = layer.experts.coef_logits.detach()
        assert a.shape == ((3,) if granularity == "layer" else (4, 3))
        mixed = layer.experts()
        for e in range(4):
            row = a if granularity == "layer" else a[e]
            c = torch.exp(row / 0.7) / torch.exp(row / 0.7).sum()
            for got, p in zip(mixed, pool):
                expected = sum(c[k] * p[k, e] for k in range(3))
                torch.testing.assert_close(got[e], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["layer", "expert"])
@pytest.mark.parametrize("init", ["noisy", "uniform", "cycle"])
def test_trainable_coefficients_give_gradients_to_every_pool_tensor_and_coefficient(granularity, init):
    cfg = model_cfg(router="switch", size=2, granularity=granularity, init=init)
    cfg.moe.dropless = True
    torch.manual_seed(0)
    model = GPT(cfg)
    idx, targets = batch(2, B=4, S=16)
    _, grads = loss_and_grads(model, idx, targets)
    for w in WEIGHTS:
        g = grads[f"expert_pool.{w}"]
        for k in range(2):
            assert torch.isfinite(g[k]).all()
            assert g[k].abs().sum() > 0, f"pool {w}[{k}] got no gradient"
    coefs = [n for n in grads if n.endswith("coef_logits")]
    assert len(coefs) == len(model.moe_layers())
    for n in coefs:
        assert torch.all(grads[n] != 0), f"{n}: every coefficient gets a gradient"


def test_trainable_one_hot_init_is_soft_not_exact():
    """Trainable cycle/sequence init uses logits 0 / -4 (so gradients flow), frozen uses -inf."""
    pool = PoolConfig(size=3, init="sequence")
    a = initial_coefficient_logits(pool, (3,), layer=5, n_moe_layers=6)
    assert a.tolist() == [-4.0, -4.0, 0.0]
    pool.freeze = True
    a = initial_coefficient_logits(pool, (2, 3), layer=0, n_moe_layers=6)
    assert a.tolist() == [[0.0, float("-inf"), float("-inf")]] * 2
    pool.init = "uniform"
    assert torch.equal(initial_coefficient_logits(pool, (3,), 0, 6), torch.zeros(3))


def test_pool_is_one_tensor_set_shared_by_every_layer():
    torch.manual_seed(0)
    model = GPT(model_cfg(size=2))
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if "w1" in n] == ["expert_pool.w1"]  # held once, by the model
    assert model.expert_pool.w1.shape == (2, 4, 16, 64)  # [K, E, d, f]
    for layer in model.moe_layers():
        assert isinstance(layer.experts, PoolMixture)
        assert layer.experts._pool[0] is model.expert_pool


def test_pyramid_layers_use_the_pools_first_experts():
    cfg = model_cfg(size=1)
    cfg.moe.experts_per_layer = [2, 2, 4, 4]
    validate(Config(model=cfg))
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.expert_pool.w1.shape[1] == 4
    for layer, E in zip(model.moe_layers(), [2, 2, 4, 4]):
        w1 = layer.experts()[0]
        assert w1.shape[0] == E and layer.router.num_experts == E
        assert torch.equal(w1, model.expert_pool.w1[0, :E])
