"""`samoe plan`: per-rank memory of each layout, against the real tensors of a built model."""

import json

import pytest
import torch

from helpers import assert_user_error, run_cli
from samoe.analysis.plan import activation_elements, parse_memory, plan
from samoe.config_load import load_config
from samoe.model.gpt import GPT
from samoe.model.params import component, count_config_params


@pytest.mark.parametrize("overrides", [[], ["model.moe.sharing=private"], ["model.moe.enabled=false"]])
def test_the_plan_holds_the_real_tensors_bytes(overrides):
    cfg = load_config(preset="tiny", overrides=overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    seen, expert, rest = set(), 0, 0
    for name, p in model.named_parameters():  # tied tensors once
        if id(p) in seen:
            continue
        seen.add(id(p))
        if component(name) == "expert":
            expert += p.numel() * p.element_size()
        else:
            rest += p.numel() * p.element_size()
    report = plan(cfg, gpus=4, gpu_mem=80e9, dtype="float32")
    assert report["params"]["total"] * 4 == expert + rest == count_config_params(cfg.model)["total"] * 4
    by_layout = {(r["ep"], r["fsdp"]): r for r in report["layouts"]}
    for (ep, fsdp), r in by_layout.items():
        held = expert / ep + rest / (4 if fsdp else 1)  # bytes of fp32 weights this rank holds
        assert r["weights"] == pytest.approx(held) and r["gradients"] == pytest.approx(held)
        assert r["optimizer"] == pytest.approx(2 * held)
    assert set(by_layout) == ({(1, False), (1, True)} if "model.moe.enabled=false" in overrides else
                              {(e, f) for e in (1, 2, 4) for f in (False, True)})  # tiny: 4 experts a layer


def test_activations_follow_the_stated_formula():
    cfg = load_config(preset="tiny", overrides=["model.moe.sharing=private", "model.moe.router=topk",
                                                "model.moe.top_k=2"])
    m = cfg.model
    d, f, E = m.d_model, m.moe.ffn_hidden or m.ffn_hidden or 4 * m.d_model, m.moe.num_experts
    per_token = m.n_layers * (10 * d + 2 * (2 * d + 2 * f) + E)  # every block MoE (tiny: every = 1), k = 2
    assert activation_elements(cfg, 1000) == 1000 * per_token


def test_it_says_which_layouts_fit_and_recommends_one():
    cfg = load_config(preset="tiny")
    report = plan(cfg, gpus=2, gpu_mem=1e12)
    assert all(r["fits"] for r in report["layouts"]) and report["recommended"]["fsdp"] is False
    tight = plan(cfg, gpus=2, gpu_mem=1e3)
    assert not any(r["fits"] for r in tight["layouts"]) and tight["recommended"] is None


def test_the_verb_prints_a_table_and_json_and_refuses_bad_sizes():
    code, out, _ = run_cli("plan", "tiny", "--gpus", "2", "--gpu-mem", "80GB")
    assert code == 0 and "| ep | fsdp |" in out and "recommended:" in out and "days at 40% MFU" in out
    code, out, _ = run_cli("plan", "tiny", "--gpus", "2", "--gpu-mem", "80GB", "--ep", "2", "--no-fsdp", "--json")
    report = json.loads(out)
    assert code == 0 and [(r["ep"], r["fsdp"]) for r in report["layouts"]] == [(2, False)]
    assert parse_memory("141GB") == 141e9 and parse_memory("80GiB") == 80 * 2 ** 30
    assert_user_error(run_cli("plan", "tiny", "--gpus", "2", "--gpu-mem", "lots"), "--gpu-mem", "lots")
    assert_user_error(run_cli("plan", "tiny", "--gpus", "2", "--gpu-mem", "80GB", "--ep", "3"), "--ep 3")
