"""Parameter accounting: totals by component from hand formulas, shared tensors counted once,
and the paper-scale claim (SaMoE K = 2 vs the 13B standard MoE) on the meta device."""

import pytest
import torch

from samoe.config_load import load_config
from samoe.model.gpt import GPT
from samoe.model.params import COMPONENTS, count_config_params, count_params, format_params


def tiny(*overrides):
    return load_config(preset="tiny", overrides=list(overrides)).model


# tiny preset: V = 512, block 64, d = 64, 2 layers (both MoE), E = 4 experts of width f = 4d
V, S, d, L, E, f = 512, 64, 64, 2, 4, 256


def expert_size(activation="gelu"):
    """One expert: W1 [d, h] + b1 [h] + W2 [f, d] + b2 [d], h = f (gelu) or 2f (swiglu)."""
    h = 2 * f if activation == "swiglu" else f
    return d * h + h + f * d + d


def shared_part(activation="gelu"):
    """Everything but experts and coefficients, by component."""
    return {
        "embedding": V * d + S * d,  # wte (tied with lm_head: counted once) + learned positions
        "attention": L * (d * 3 * d + 3 * d + d * d + d),  # qkv and proj, weights and biases
        "norm": L * 2 * (2 * d) + 2 * d,  # ln_1, ln_2 per block and ln_f
        "router": L * E * d,
        "dense_ffn": 0,
    }


def test_tiny_private_count_matches_hand_formula():
    counts = count_config_params(tiny("model.moe.sharing=private"))
    expected = shared_part() | {"expert": L * E * expert_size(), "coefficient": 0}
    for name in COMPONENTS:
        assert counts[name] == expected[name], name
    assert counts["total"] == sum(expected.values())
    assert counts["active"] == counts["total"] - L * E * expert_size() + L * 1 * expert_size()  # top-1


@pytest.mark.parametrize("granularity,coefs", [("layer", L * 2), ("expert", L * E * 2)])
def test_pool_is_counted_once(granularity, coefs):
    counts = count_config_params(tiny("model.moe.sharing=pool", "model.moe.pool.size=2",
                                      f"model.moe.pool.granularity={granularity}"))
    assert counts["expert"] == 2 * E * expert_size()  # K = 2 pool entries, not L copies
    assert counts["coefficient"] == coefs
    assert counts["total"] == sum(shared_part().values()) + 2 * E * expert_size() + coefs
    # active: k of the layer's combined experts, as for the standard MoE of the same shapes
    private = count_config_params(tiny("model.moe.sharing=private"))
    assert counts["active"] == private["active"] + coefs


def test_frozen_pool_coefficients_are_not_parameters():
    counts = count_config_params(tiny("model.moe.pool.freeze=true", "model.moe.pool.init=cycle"))
    assert counts["coefficient"] == 0


def test_shared_bank_counted_once_and_variants():
    counts = count_config_params(tiny("model.moe.sharing=shared", "model.moe.shared_experts=6",
                                      "model.moe.router=gshard", "model.activation=swiglu"))
    part = shared_part("swiglu") | {"router": L * 6 * d}
    assert counts["expert"] == 6 * expert_size("swiglu")
    assert counts["total"] == sum(part.values()) + 6 * expert_size("swiglu")
    assert counts["active"] == counts["total"] - 6 * expert_size("swiglu") + L * 2 * expert_size("swiglu")


def test_residual_rotary_untied_and_hash_counts():
    counts = count_config_params(tiny("model.moe.sharing=private", "model.moe.residual=true",
                                      "model.positions=rotary", "model.tie_embeddings=false",
                                      "model.moe.router=hash"))
    assert counts["embedding"] == 2 * V * d  # wte and lm_head, no positions
    assert counts["router"] == 0  # hash routing has no parameters
    assert counts["dense_ffn"] == L * (expert_size() + d * 2 + 2)  # dense branch + its mixing coefficients


def test_meta_count_equals_count_of_a_real_model():
    cfg = tiny("model.moe.sharing=pool", "model.moe.residual=true")
    torch.manual_seed(0)
    model = GPT(cfg)
    counts = count_params(model)
    assert counts == count_config_params(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # parameters() dedups
    assert "total" in format_params(counts)


def test_350m_moe128_is_about_13b():
    counts = count_config_params(load_config(preset="350m-moe128").model)
    assert abs(counts["total"] - 13e9) <= 0.03 * 13e9, counts["total"]


def test_samoe_k2_is_5x_smaller_at_the_same_active_params():
    moe = count_config_params(load_config(preset="350m-moe128").model)
    samoe = count_config_params(load_config(preset="350m-samoe128-k2").model)
    assert moe["total"] >= 5 * samoe["total"], (moe["total"], samoe["total"])
    # same active expert compute per token; SaMoE adds only its 12 x 2 coefficient logits
    assert samoe["active"] - samoe["coefficient"] == moe["active"]
    assert samoe["coefficient"] == 12 * 2
