"""UniPool's options (pool-level balance loss, NormRouter) and MoRE's depth embedding, each
against its formula written out with plain loops in float64:

    NormRouter    l_e = γ · <x, w_e> / (‖x‖ ‖w_e‖),  top-k on l,  gate_j = relu(l_j) / Σ_chosen relu(l)
    pool balance  M · Σ_e f̄_e · P̄_e,  f̄_e, P̄_e the layers' fractions and mean probabilities averaged
    depth embed.  the routed experts read x + e_l; the router and the shared expert read x
"""

import math

import pytest
import torch

from samoe.config import MoEConfig
from samoe.config_load import load_config
from samoe.errors import ConfigError
from samoe.model.gpt import GPT
from samoe.moe.routers import TopKRouter, pool_balance_loss

D, E = 10, 7


def test_norm_router_equals_its_formula():
    torch.manual_seed(0)
    cfg = MoEConfig(router="topk", top_k=3, dropless=True, norm_router=True)
    router = TopKRouter(D, E, cfg)
    with torch.no_grad():
        router.scale.fill_(4.0)
    x = torch.randn(9, D) * torch.linspace(0.1, 30, 9).unsqueeze(1)  # scales far apart: the gates must not care
    with torch.no_grad():
        r = router(x)
    xs, ws = x.double().tolist(), router.weight.double().tolist()
    for t in range(9):
        norm_x = math.sqrt(sum(v * v for v in xs[t]))
        logits = []
        for e in range(E):
            dot = sum(a * b for a, b in zip(xs[t], ws[e]))
            logits.append(4.0 * dot / (norm_x * math.sqrt(sum(v * v for v in ws[e]))))
        chosen = sorted(range(E), key=lambda e: -logits[e])[:3]
        assert sorted(r.expert[t].tolist()) == sorted(chosen)
        s = {e: max(logits[e], 0.0) for e in chosen}
        for j, e in enumerate(r.expert[t].tolist()):
            want = s[e] / (sum(s.values()) + 1e-9)
            assert abs(float(r.gate[t, j]) - want) < 1e-5
        expected_probs = torch.tensor(logits).softmax(0)
        assert torch.allclose(r.probs[t].double(), expected_probs.double(), atol=1e-5)
    assert float(r.aux["z_loss"]) == 0.0
    # the gates (and the chosen experts) do not change when a token's hidden state is scaled
    with torch.no_grad():
        r2 = router(x * 50)
    assert torch.equal(r2.expert, r.expert) and torch.allclose(r2.gate, r.gate, atol=1e-6)


def test_norm_router_learns_its_scale():
    torch.manual_seed(1)
    router = TopKRouter(D, E, MoEConfig(router="topk", top_k=2, dropless=True, norm_router=True))
    r = router(torch.randn(16, D))
    (r.gate * torch.randn_like(r.gate)).sum().backward()
    assert router.scale.grad is not None and router.weight.grad is not None


def test_pool_balance_loss_equals_its_formula_and_differs_from_the_layer_mean():
    # two layers over a bank of 4: layer 0 uses experts 0 and 1 only, layer 1 experts 2 and 3
    f = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    p = [[0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]]
    terms = [torch.tensor([fl, pl]) for fl, pl in zip(f, p)]
    f_bar = [(a + b) / 2 for a, b in zip(*f)]
    p_bar = [(a + b) / 2 for a, b in zip(*p)]
    want = 4 * sum(a * b for a, b in zip(f_bar, p_bar))  # 4 · 4 · 0.25 · 0.25 = 1: the bank is balanced
    assert float(pool_balance_loss(terms)) == pytest.approx(want, abs=1e-7)
    assert want == pytest.approx(1.0)
    per_layer = sum(4 * sum(a * b for a, b in zip(fl, pl)) for fl, pl in zip(f, p)) / 2  # 1.6: each layer skewed
    assert per_layer > want + 0.5


def test_the_model_takes_the_pool_level_balance_over_every_layer():
    cfg = load_config(preset="tiny", overrides=["model.moe.sharing=shared", "model.moe.shared_experts=8",
                                                "model.moe.router=topk", "model.moe.top_k=2",
                                                "model.moe.balance=pool", "model.moe.norm_router=true"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    fs, ps = [], []

    def grab(module, args, routing):
        fs.append(torch.bincount(routing.expert.reshape(-1), minlength=8).double() / routing.expert.numel())
        ps.append(routing.probs.detach().double().mean(0))

    hooks = [layer.router.register_forward_hook(grab) for layer in model.moe_layers()]
    out = model(idx, idx)
    for h in hooks:
        h.remove()
    want = 8 * (torch.stack(fs).mean(0) * torch.stack(ps).mean(0)).sum()
    assert out.aux["load_balance"].item() == pytest.approx(want.item(), abs=1e-6)
    assert set(out.aux) == {"load_balance", "z_loss"}  # the per-layer terms do not leak into the logs


def test_depth_embedding_feeds_the_experts_alone():
    cfg = load_config(preset="tiny", overrides=["model.moe.pool.depth_embedding=true"])
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    layer = model.moe_layers()[0]
    x = torch.randn(1, 5, cfg.model.d_model)
    ids = torch.zeros(1, 5, dtype=torch.long)
    y0, _ = layer(x, ids)
    with torch.no_grad():
        layer.depth_embedding.copy_(torch.randn(cfg.model.d_model))
    y1, _ = layer(x, ids)
    # the reference: the same layer without the embedding, its experts fed x + e_l, its router x
    routing = layer.router(x.reshape(5, -1), ids.reshape(-1))
    shifted = x.reshape(5, -1) + layer.depth_embedding
    want = layer.dispatcher(shifted, routing, layer.experts.source(), layer.activation).view(1, 5, -1)
    assert layer.residual is None  # tiny has no shared expert: the layer is the routed experts alone
    assert torch.allclose(y1, want, atol=1e-6)
    assert not torch.allclose(y0, y1)


@pytest.mark.parametrize("override, field", [
    (["model.moe.balance=pool"], "model.moe.balance"),  # private experts are no pool
    (["model.moe.norm_router=true", "model.moe.router=switch"], "model.moe.norm_router"),
    (["model.moe.pool.depth_embedding=true", "model.moe.sharing=private"], "model.moe.pool.depth_embedding"),
])
def test_the_options_are_refused_where_they_mean_nothing(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(preset="tiny", overrides=["model.moe.sharing=private", *override])
