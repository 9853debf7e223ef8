"""FLOPs accounting: agreement with torch's FlopCounterMode on the tiny preset, hand-checked
PF-days and all-to-all bytes, FLOPs-matched dense configs, the CLI and summary.json."""

import json
import random
from unittest import mock

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from samoe.cli import main
from samoe.config_load import load_config
from samoe.model.flops import PF_DAY, flops_report, forward_flops, match_dense
from samoe.model.gpt import GPT
from samoe.model.params import count_config_params
from samoe.moe import grouped

B = 2  # sequences in the measured forward pass


def tiny(*overrides):
    return load_config(preset="tiny", overrides=list(overrides))


def counted_flops_per_token(cfg) -> float:
    """FlopCounterMode's matmul FLOPs per token of one eval forward over B full windows.

    The MATH attention backend: FlopCounterMode has no formula for the fused CPU kernel and
    would count no attention scores at all; the math path's two bmms it counts over the full
    S×S window, as flops.py does. Likewise the experts' GEMMs run as the loop of per-expert mm
    (GROUPED_GEMM emptied): FlopCounterMode has no formula for torch._grouped_mm.
    """
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    idx = torch.randint(0, cfg.model.vocab_size, (B, cfg.model.block_size))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), mock.patch.dict(grouped.GROUPED_GEMM, clear=True), counter:
        model(idx)
    return counter.get_total_flops() / idx.numel()


CASES = {  # dropless: no capacity drops, so every token visits its k experts as counted
    "dense": ("model.moe.enabled=false",),
    "moe": ("model.moe.sharing=private", "model.moe.dropless=true"),
    "samoe": ("model.moe.dropless=true",),
    "samoe-expert-gshard-swiglu": ("model.moe.pool.granularity=expert", "model.moe.router=gshard",
                                   "model.activation=swiglu", "model.moe.dropless=true"),
    "moe-every2-residual-hash": ("model.moe.sharing=private", "model.moe.every=2", "model.moe.residual=true",
                                 "model.moe.router=hash", "model.moe.dropless=true", "model.n_layers=4"),
    # a narrow sigmoid-gated dense branch beside fine-grained experts (the default preset's layer)
    "samoe-shared-expert-sigmoid": ("model.moe.residual=true", "model.moe.residual_hidden=40",
                                    "model.moe.residual_gate=sigmoid", "model.moe.ffn_hidden=32",
                                    "model.moe.router=topk", "model.moe.top_k=2", "model.moe.dropless=true"),
    "shared-expert-choice": ("model.moe.sharing=shared", "model.moe.shared_experts=6",
                             "model.moe.router=expert_choice"),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_flops_agree_with_flop_counter_mode(case):
    cfg = tiny(*CASES[case])
    comps = forward_flops(cfg.model, B * cfg.model.block_size)
    # FlopCounterMode sees matmuls only: the SaMoE pool combination is elementwise, so compare without it
    ours = sum(comps.values()) - comps["pool_combination"]
    assert ours == pytest.approx(counted_flops_per_token(cfg), rel=0.02)
    if case.startswith("samoe"):
        assert comps["pool_combination"] > 0
    else:
        assert comps["pool_combination"] == 0


def test_pool_combination_is_amortised_over_the_forward_tokens():
    cfg = tiny()  # K = 2, E = 4, d = 64, f = 256, 2 MoE layers
    per_expert = 64 * 256 + 256 + 256 * 64 + 64
    for T in (128, 512):
        assert forward_flops(cfg.model, T)["pool_combination"] == pytest.approx(2 * 2 * 2 * 4 * per_expert / T)
    # default: one micro-batch of train.batch_size x block_size tokens
    assert flops_report(cfg)["batch_tokens"] == 8 * 64
    assert flops_report(tiny("train.micro_batch_size=2"))["batch_tokens"] == 2 * 64


def test_pf_days_by_hand():
    # tiny dense: L=2, d=64, S=64, V=512, f=256
    #   2·8·64² + 2·4·64·64 + 2·(2·64·256·2) + 2·64·512 = 65,536 + 32,768 + 131,072 + 65,536 = 294,912
    cfg = tiny("model.moe.enabled=false")
    r = flops_report(cfg, tokens=10**12)
    assert r["forward_flops_per_token"] == 294_912
    assert r["train_flops_per_token"] == 3 * 294_912
    assert r["pf_days"] == pytest.approx(3 * 294_912 * 1e12 / 8.64e19)
    assert PF_DAY == 8.64e19
    assert r["a2a_bytes_per_token_per_layer"] == 0


def test_a2a_bytes_350m_moe128():
    r = flops_report(load_config(preset="350m-moe128"))
    assert r["a2a_bytes_per_token_per_layer_by_dtype"] == {"float32": 2 * 1 * 1024 * 4, "bfloat16": 2 * 1 * 1024 * 2}
    assert r["moe_layers"] == 12
    top2 = flops_report(load_config(preset="350m-moe128",
                                    overrides=["model.moe.router=gshard", "train.dtype=bfloat16"]))
    assert top2["a2a_bytes_per_token_per_layer"] == 2 * 2 * 1024 * 2


@pytest.mark.parametrize("overrides", [(), ("model.moe.router=gshard",), ("model.moe.every=2", "model.n_layers=4"),
                                       ("model.activation=swiglu", "model.moe.router=topk", "model.moe.top_k=3"),
                                       ("model.moe.ffn_hidden=64", "model.moe.num_experts=16")])
def test_match_dense_flops_and_params(overrides):
    cfg = tiny(*overrides)
    by_flops, by_params = match_dense(cfg)
    assert not by_flops.model.moe.enabled and not by_params.model.moe.enabled
    moe = flops_report(cfg)["train_flops_per_token"]
    assert flops_report(by_flops)["train_flops_per_token"] == pytest.approx(moe, rel=0.02)
    assert count_config_params(by_params.model)["total"] == pytest.approx(count_config_params(cfg.model)["total"],
                                                                          rel=0.02)


def test_match_dense_at_paper_scale():
    cfg = load_config(preset="350m-moe128")
    by_flops, by_params = match_dense(cfg)
    assert flops_report(by_flops)["train_flops_per_token"] == pytest.approx(flops_report(cfg)["train_flops_per_token"],
                                                                            rel=0.02)
    assert by_flops.model.ffn_hidden == pytest.approx(4096, rel=0.01)  # top-1: the base dense model, plus routers
    assert count_config_params(by_params.model)["total"] == pytest.approx(13.15e9, rel=0.01)


def test_cli_flops_json_and_table(capsys):
    assert main(["flops", "tiny", "--json", "--tokens", "1000000", "--batch-tokens", "256"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("forward_flops_per_token", "train_flops_per_token", "pf_days", "a2a_bytes_per_token_per_layer"):
        assert key in r
    assert r["pf_days"] == pytest.approx(r["train_flops_per_token"] * 1e6 / 8.64e19)
    assert main(["flops", "350m-moe128"]) == 0
    out = capsys.readouterr().out
    assert "PF-days" in out and "attention_scores" in out and "4,096 at bfloat16" in out


def test_cli_match_dense_writes_loadable_configs(tmp_path, capsys):
    assert main(["match-dense", "tiny", "model.moe.router=gshard", "--out", str(tmp_path)]) == 0
    moe = flops_report(tiny("model.moe.router=gshard"))["train_flops_per_token"]
    by_flops = load_config(tmp_path / "tiny-dense-flops.yaml")
    assert flops_report(by_flops)["train_flops_per_token"] == pytest.approx(moe, rel=0.02)
    assert load_config(tmp_path / "tiny-dense-params.yaml").model.moe.enabled is False
    capsys.readouterr()
    assert main(["flops", str(tmp_path / "tiny-dense-flops.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_flops_per_token"] == pytest.approx(moe, rel=0.02)


@pytest.mark.parametrize("argv,message", [
    (["flops", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["flops", "missing.yaml"], "'missing.yaml' does not exist"),
    (["flops", "{tmp}/missing/config"], "does not exist"),
    (["flops", "{tmp}"], "not a samoe run directory"),
    (["flops", "tiny", "--batch-tokens", "0"], "--batch-tokens 0 is invalid"),
    (["match-dense", "tiny", "model.moe.enabled=false"], "already dense"),
    (["match-dense", "no-such-preset"], "unknown preset"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_summary_has_training_flops_and_run_dir_target(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = "the expert router sends each token to one layer of a pool shared across depth".split()
    (tmp_path / "c.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(80)) for _ in range(40)))
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "c.txt"), "--out", str(run), "--quiet",
                 "train.max_steps=2", "train.batch_size=4", "train.eval_tokens=256", "data.tokenizer=byte"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_flops"] == pytest.approx(summary["train_flops_per_token"] * summary["tokens"])
    assert summary["pf_days"] == pytest.approx(summary["train_flops"] / 8.64e19)
    capsys.readouterr()
    assert main(["flops", str(run), "--json", "--tokens", str(summary["tokens"])]) == 0
    assert json.loads(capsys.readouterr().out)["pf_days"] == pytest.approx(summary["pf_days"])
