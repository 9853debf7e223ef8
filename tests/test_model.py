"""The GPT decoder with MoE FFN blocks: every router × sharing × residual combination trains
(finite loss and gradients), the variants build, the decoder is causal for causal routers, and
hash routing is a fixed function of the token id in every layer."""

import pytest
import torch

from samoe.config import ROUTERS, SHARING
from samoe.config_load import load_config
from samoe.model.gpt import GPT
from samoe.moe.layer import MoEFeedForward
from samoe.moe.routers import HashRouter

ROUTER_OVERRIDES = {"topk": ["model.moe.top_k=2"], "expert_choice": ["model.moe.top_k=2"]}


def tiny(*overrides):
    return load_config(preset="tiny", overrides=list(overrides)).model


def tokens(cfg, B=2, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, S), generator=g), torch.randint(0, cfg.vocab_size, (B, S), generator=g)


def train_step(cfg, seed=0):
    """One forward and backward of LM loss + auxiliary loss; returns the model and its output."""
    torch.manual_seed(seed)
    model = GPT(cfg).train()
    idx, targets = tokens(cfg)
    out = model(idx, targets)
    (out.loss + out.aux_loss).backward()
    return model, out


def assert_trains(model, out):
    assert out.logits.shape == (2, 32, model.cfg.vocab_size)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    assert all(torch.isfinite(v) for v in out.aux.values())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_sharing_residual_combination_trains(router, sharing, residual):
    cfg = tiny(f"model.moe.router={router}", f"model.moe.sharing={sharing}", f"model.moe.residual={residual}",
               "model.moe.shared_experts=6", *ROUTER_OVERRIDES.get(router, []))
    model, out = train_step(cfg)
    assert_trains(model, out)
    assert set(out.aux) == {"load_balance", "z_loss"}
    assert len(model.moe_layers()) == 2
    assert all((layer.residual is not None) == residual for layer in model.moe_layers())
    assert (model.expert_pool is not None) == (sharing == "pool")
    assert (model.expert_bank is not None) == (sharing == "shared")


def test_the_dense_branch_takes_its_own_width():
    """model.moe.residual_hidden sizes the dense branch beside the experts; unset, it is model.ffn_hidden."""
    narrow = tiny("model.moe.residual=true", "model.moe.residual_hidden=40", "model.moe.residual_gate=sigmoid")
    model, out = train_step(narrow)
    assert_trains(model, out)
    assert all(layer.residual.fc1.out_features == 40 for layer in model.moe_layers())
    assert all(layer.residual_coef.out_features == 1 for layer in model.moe_layers())  # one sigmoid gate
    wide = GPT(tiny("model.moe.residual=true", "model.ffn_hidden=200"))
    assert all(layer.residual.fc1.out_features == 200 for layer in wide.moe_layers())


@pytest.mark.parametrize("overrides", [
    ["model.activation=swiglu"],
    ["model.positions=rotary"],
    ["model.activation=swiglu", "model.positions=rotary", "model.moe.sharing=private"],
    ["model.moe.experts_per_layer=[2, 4]", "model.moe.sharing=private"],
    ["model.moe.experts_per_layer=[4, 2]", "model.moe.sharing=pool"],
    ["model.moe.every=2", "model.n_layers=4", "model.tie_embeddings=false"],
    ["model.moe.aux_free_bias=true", "model.moe.router=gshard"],
    ["model.moe.jitter=0.1", "model.moe.router=gshard", "model.moe.random_routing=true"],
], ids=lambda o: ",".join(o))
def test_model_variants_train(overrides):
    model, out = train_step(tiny(*overrides))
    assert_trains(model, out)


def test_pyramid_gives_each_layer_its_expert_count():
    model = GPT(tiny("model.moe.experts_per_layer=[2, 4]", "model.moe.sharing=private"))
    assert [layer.experts.w1.shape[0] for layer in model.moe_layers()] == [2, 4]
    assert [layer.router.num_experts for layer in model.moe_layers()] == [2, 4]


def test_moe_every_places_moe_blocks():
    model = GPT(tiny("model.moe.every=2", "model.n_layers=4"))
    assert [isinstance(b.ffn, MoEFeedForward) for b in model.blocks] == [False, True, False, True]


def test_dense_model_has_no_moe_and_no_aux_loss():
    model, out = train_step(tiny("model.moe.enabled=false"))
    assert_trains(model, out)
    assert model.moe_layers() == [] and model.expert_pool is None and model.expert_bank is None
    assert out.aux == {} and out.aux_loss.item() == 0.0
    assert not any("router" in n or "expert" in n for n, _ in model.named_parameters())


def test_aux_loss_is_the_weighted_mean_over_moe_layers():
    cfg = tiny("model.moe.load_balance_weight=0.5", "model.moe.z_loss_weight=0.25")
    torch.manual_seed(0)
    model = GPT(cfg)
    captured = []
    for layer in model.moe_layers():
        layer.register_forward_hook(lambda mod, inp, out: captured.append(out[1]))
    out = model(*tokens(cfg))
    for name in ("load_balance", "z_loss"):
        torch.testing.assert_close(out.aux[name], sum(a[name] for a in captured) / len(captured))
    torch.testing.assert_close(out.aux_loss, 0.5 * out.aux["load_balance"] + 0.25 * out.aux["z_loss"])


def test_lm_loss_is_mean_cross_entropy_with_ignore_index():
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx, targets = tokens(cfg)
    targets[0, :5] = -100
    out = model(idx, targets)
    logp = out.logits.log_softmax(-1)
    picked = [-logp[b, s, targets[b, s]] for b in range(2) for s in range(32) if targets[b, s] != -100]
    torch.testing.assert_close(out.loss, torch.stack(picked).mean())


def test_tied_embeddings_share_one_tensor():
    tied = GPT(tiny())
    assert tied.lm_head.weight is tied.wte.weight
    untied = GPT(tiny("model.tie_embeddings=false"))
    assert untied.lm_head.weight is not untied.wte.weight


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_routing_stats_and_bias_update():
    cfg = tiny("model.moe.router=switch", "model.moe.aux_free_bias=true", "model.moe.bias_update_rate=0.5",
               "model.moe.capacity_factor=0.5", "model.moe.min_capacity=0")
    torch.manual_seed(0)
    model = GPT(cfg).train()
    model(tokens(cfg)[0])
    stats = model.routing_stats()
    assert set(stats) == {"dropped_frac", "router_entropy"}
    assert 0 < stats["dropped_frac"] < 1  # capacity 0.5: some tokens dropped
    model.update_router_biases()
    for layer in model.moe_layers():
        assert layer.router.selection_bias.abs().sum() > 0


def test_greedy_generation_appends_tokens_and_crops_to_block_size():
    cfg = tiny("model.moe.dropless=true")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = tokens(cfg, B=2, S=60)[0]
    out = model.generate(idx, 8, temperature=0)
    assert out.shape == (2, 68) and torch.equal(out[:, :60], idx)
    with torch.no_grad():  # each new token is the argmax after the last block_size tokens
        assert torch.equal(out[:, 60], model(idx).logits[:, -1].argmax(-1))
        assert torch.equal(out[:, 67], model(out[:, 3:67]).logits[:, -1].argmax(-1))
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(idx, 4, temperature=1.0, top_k=5, generator=g)
    assert sampled.shape == (2, 64) and int(sampled.max()) < cfg.vocab_size


# --------------------------------------------------------------------------- causality

CAUSAL = [("switch", "train"), ("gshard", "train"), ("topk", "train"), ("hash", "train"), ("base", "eval")]


@pytest.mark.parametrize("router,mode", CAUSAL)
def test_decoder_is_causal_for_dropless_token_choice_routing(router, mode):
    """Changing tokens from position 20 on leaves the logits of positions 0..19 unchanged.
    (With capacity, a later token can take an earlier token's place; BASE's balanced training
    assignment looks at the whole batch; so: dropless, and BASE at inference.)"""
    cfg = tiny(f"model.moe.router={router}", "model.moe.dropless=true", *ROUTER_OVERRIDES.get(router, []))
    torch.manual_seed(0)
    model = GPT(cfg).train(mode == "train")
    idx, _ = tokens(cfg)
    idx2 = idx.clone()
    idx2[:, 20:] = (idx2[:, 20:] + 7) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(idx).logits, model(idx2).logits
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_expert_choice_decoder_is_not_causal():
    """Expert choice is documented as not causal: future tokens compete for the experts'
    capacity, so they change the outputs at earlier positions."""
    cfg = tiny("model.moe.router=expert_choice")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx, _ = tokens(cfg)
    idx2 = idx.clone()
    idx2[:, 20:] = (idx2[:, 20:] + 7) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(idx).logits, model(idx2).logits
    assert not torch.allclose(a[:, :20], b[:, :20], atol=1e-5)


# --------------------------------------------------------------------------- hash routing in the model


def _capture_routing(model):
    seen = {}
    for i, layer in enumerate(model.moe_layers()):
        layer.router.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, out))
    return seen


@pytest.mark.parametrize("frequencies", [False, True])
def test_hash_routing_follows_the_token_id_in_every_layer(frequencies):
    cfg = tiny("model.moe.router=hash", "model.moe.dropless=true", "model.n_layers=3")
    torch.manual_seed(0)
    model = GPT(cfg)
    routers = [layer.router for layer in model.moe_layers()]
    assert len(routers) == 3 and all(isinstance(r, HashRouter) for r in routers)
    counts = None
    if frequencies:
        counts = torch.randint(0, 1000, (cfg.vocab_size,), generator=torch.Generator().manual_seed(1))
        model.set_token_frequencies(counts)
    seen = _capture_routing(model)
    idx = torch.randint(0, 20, (3, 40), generator=torch.Generator().manual_seed(2))  # many repeats
    model(idx)
    flat = idx.reshape(-1)
    for i, r in enumerate(routers):
        assert r.table.shape == (cfg.vocab_size,)
        assert int(r.table.min()) >= 0 and int(r.table.max()) < 4
        expert = seen[i].expert[:, 0]
        assert torch.equal(expert, r.table[flat])  # a table lookup ...
        for tok in flat.unique():
            assert expert[flat == tok].unique().numel() == 1  # ... so one expert per token id
        assert torch.equal(seen[i].gate, torch.ones(flat.numel(), 1))
        if counts is not None:
            load = torch.zeros(4, dtype=torch.long).index_add_(0, r.table, counts)
            assert load.max() - load.min() <= counts.max()


def test_one_expert_dropless_moe_is_the_dense_model():
    """E = 1, top-1, dropless: every gate is softmax over one expert = 1, so the MoE model with the
    dense model's FFN weights copied into its expert computes the same loss and gradients."""
    moe_cfg = load_config(preset="tiny", overrides=["model.moe.num_experts=1", "model.moe.dropless=true",
                                                    "model.moe.sharing=private"])
    dense_cfg = load_config(preset="tiny", overrides=["model.moe.enabled=false"])
    torch.manual_seed(0)
    dense = GPT(dense_cfg.model)
    moe = GPT(moe_cfg.model)
    state = {}
    for name, value in dense.state_dict().items():
        if ".ffn.fc1.weight" in name:
            state[name.replace("fc1.weight", "experts.w1")] = value.t().unsqueeze(0)
        elif ".ffn.fc1.bias" in name:
            state[name.replace("fc1.bias", "experts.b1")] = value.unsqueeze(0)
        elif ".ffn.fc2.weight" in name:
            state[name.replace("fc2.weight", "experts.w2")] = value.t().unsqueeze(0)
        elif ".ffn.fc2.bias" in name:
            state[name.replace("fc2.bias", "experts.b2")] = value.unsqueeze(0)
        else:
            state[name] = value
    for name, value in moe.state_dict().items():
        state.setdefault(name, value)  # the routers (irrelevant with one expert)
    moe.load_state_dict(state)
    idx = torch.randint(0, dense_cfg.model.vocab_size, (2, 32))
    out_d, out_m = dense(idx, idx), moe(idx, idx)
    torch.testing.assert_close(out_m.loss, out_d.loss)
    out_d.loss.backward()
    out_m.loss.backward()
    grads_m = dict(moe.named_parameters())
    for name, p in dense.named_parameters():
        if ".ffn.fc1.weight" in name:
            torch.testing.assert_close(grads_m[name.replace("fc1.weight", "experts.w1")].grad[0], p.grad.t())
        elif ".ffn." not in name:
            torch.testing.assert_close(grads_m[name].grad, p.grad, msg=name)
