"""`samoe analyze gradflow`: the SNR definition, the recording hook (effective-expert gradients
consistent with the stored parameters' gradients), a tiny resumable grid with its JSON and PNGs,
and the bad-input errors."""

import json
import math
import random

import pytest
import torch

import samoe.analysis.gradflow as gf
import samoe.analysis.gradstats as gradstats
from helpers import assert_user_error, run_cli
from samoe.config_load import load_config
from samoe.model.gpt import GPT
from samoe.moe.dispatch import record_moe

WORDS = "the expert router sends each token to one layer of a pool shared across depth while gradients flow".split()
GRID_OVERRIDES = ["model.block_size=16", "train.batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1",
                  "train.eval_tokens=64", "data.tokenizer=byte"]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(30)), encoding="utf-8")
    return path


def test_snr_accumulator_follows_its_definition():
    torch.manual_seed(0)
    n, U, P = 4, 3, 50
    gs = [torch.randn(U, P) + torch.tensor([[0.0], [1.0], [5.0]]) for _ in range(n)]
    gs[0][0] = gs[1][0] = gs[2][0] = gs[3][0] = 0  # unit 0: no token in the step -> SNR undefined
    acc = gradstats._SNRAccumulator(U, P)
    for g in gs:
        acc.add(g)
    acc.end_step()
    r = acc.result()
    G = torch.stack(gs).double()  # [n, U, P]
    mean = G.mean(0)
    noise = (G - mean).square().sum(-1).mean(0)  # (1/n) Σ_i ‖g_i − ḡ‖²
    expected = mean.norm(dim=-1) / noise.sqrt()
    assert r["snr"][0] is None and r["snr_undefined_frac"] == pytest.approx(1 / 3)
    assert r["snr"][1:] == pytest.approx(expected[1:].tolist(), rel=1e-6)
    assert r["grad_norm_per_param"] == pytest.approx((mean.norm(dim=-1) / math.sqrt(P)).tolist(), rel=1e-6)
    sigma2 = noise * n / (n - 1)
    debiased = (mean.norm(dim=-1).square() - sigma2 / n).clamp_min(0).sqrt() / sigma2.sqrt()
    assert r["snr_debiased"][1:] == pytest.approx(debiased[1:].tolist(), rel=1e-6)
    assert r["snr"][2] > 2 and r["snr_debiased"][2] > 2  # a strong signal: both large


def test_snr_of_pure_noise_sits_at_its_floor():
    torch.manual_seed(1)
    n = 4
    acc = gradstats._SNRAccumulator(200, 400)
    for _ in range(n):
        acc.add(torch.randn(200, 400))
    acc.end_step()
    r = acc.result()
    assert sum(r["snr"]) / 200 == pytest.approx(1 / math.sqrt(n - 1), rel=0.05)
    assert sum(r["snr_debiased"]) / 200 < 0.1


@pytest.mark.parametrize("granularity", ["layer", "expert"])
def test_effective_expert_gradients_add_up_to_the_pool_gradient(granularity):
    """With the hook, ∂L/∂W_l[e] of each layer's combined experts satisfies
    ∂L/∂P[k,e] = Σ_l c_l[e,k]·∂L/∂W_l[e], and the forward pass is unchanged."""
    cfg = load_config(preset="tiny", overrides=["model.n_layers=3", "model.moe.pool.size=2",
                                                f"model.moe.pool.granularity={granularity}"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    ref = model(idx, idx).loss
    originals = [layer.dispatcher for layer in model.moe_layers()]
    with record_moe(model) as rec:
        out = model(idx, idx)
    assert [layer.dispatcher for layer in model.moe_layers()] == originals and len(rec.calls) == 3
    torch.testing.assert_close(out.loss, ref)
    weights = [w for _, ws, _ in rec.calls for w in ws]
    pool = model.expert_pool
    grads = torch.autograd.grad(out.loss, [pool.w1, pool.w2, *weights])
    eff = grads[2:]
    for which, g_pool in ((0, grads[0]), (2, grads[1])):
        total = torch.zeros_like(g_pool)
        for li, layer in enumerate(model.moe_layers()):
            c = layer.experts.coefficients()
            c = c.t() if c.dim() == 2 else c[:, None].expand(-1, g_pool.shape[1])  # [K, E]
            total += c[:, :, None, None] * eff[4 * li + which][None]
        torch.testing.assert_close(total, g_pool, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_tiny_grid_writes_json_and_plots_and_resumes(tmp_path, corpus, monkeypatch):
    out = tmp_path / "grid"
    args = ["analyze", "gradflow", "--preset", "tiny", "--data", corpus, "--routers", "switch,hash", "--experts", "2,4",
            "--sharing", "private,pool", "--steps", "2", "--measure", "1", "--out", out, "--quiet", *GRID_OVERRIDES]
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    grid = json.loads((out / "gradflow.json").read_text())
    assert len(grid["cells"]) == 8 and len(list((out / "cells").glob("*.json"))) == 8
    cell = next(c for c in grid["cells"] if c["cell"] == {"router": "switch", "num_experts": 4, "sharing": "pool"})
    s = cell["summary"]
    for key in gf.STATS:
        assert key in s
    assert 0 <= s["dead_frac"] <= 1 and s["grad_norm_per_param"] > 0 and cell["measured_steps"] == 2
    assert len(cell["per_layer"]) == 2 and len(cell["per_layer"][0]["tokens_per_step"]) == 4
    assert cell["stored"]["groups"][0]["grad_norm_per_param"].__len__() == 2 * 4  # pool entries K x E
    hash_cell = next(c for c in grid["cells"] if c["cell"]["router"] == "hash")
    assert hash_cell["summary"]["router_entropy"] == 0.0
    for stat in gf.STATS:
        assert (out / f"gradflow-{stat}.png").stat().st_size > 1000
    assert (out / "gradflow.png").exists()

    def no_training(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(gf, "run_cell", no_training)  # a rerun only reads the cells and redraws
    code, _, err = run_cli(*args)
    assert code == 0, err
    # other settings in the same directory: refused, not mixed
    assert_user_error(run_cli(*[a if a != "2" else "3" for a in args]), str(out))


@pytest.mark.parametrize("flag, value, names", [
    ("--routers", "switch,nosuch", ["nosuch", "--routers"]),
    ("--routers", " , ", ["--routers", "empty"]),
    ("--experts", "", ["--experts", "empty"]),
    ("--experts", "4,x", ["--experts"]),
    ("--sharing", "private,global", ["global", "--sharing"]),
    ("--experts", "0", ["0", "--experts"]),
])
def test_bad_grid_is_one_line_and_exit_2(tmp_path, flag, value, names):
    assert_user_error(run_cli("analyze", "gradflow", flag, value, "--out", tmp_path / "g", "--quiet"), *names)
    assert not (tmp_path / "g").exists()


def test_a_cell_with_an_invalid_config_fails_before_training(tmp_path):
    # gshard needs two experts: the grid is checked whole before any cell runs
    result = run_cli("analyze", "gradflow", "--routers", "gshard", "--experts", "1", "--out", tmp_path / "g", "--quiet")
    assert_user_error(result, "gshard-E1-")
    assert not (tmp_path / "g").exists()


def test_one_micro_batch_per_step_is_refused(tmp_path):
    # the tiny preset has one micro-batch per step
    result = run_cli("analyze", "gradflow", "--preset", "tiny", "--out", tmp_path / "g", "--quiet")
    assert_user_error(result, "train.micro_batch_size")
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_existing_runs_are_measured_from_their_latest_checkpoint_without_changing_them(tmp_path, corpus):
    """`samoe analyze gradflow-runs RUN_DIR...`: the run's next steps through the same train step,
    measured; the run directory is left as it was."""
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--preset", "tiny", "--data", corpus, "--out", run, "--quiet", "train.max_steps=4",
                           "train.ckpt_every=2", "model.moe.router=switch", *GRID_OVERRIDES)
    assert code == 0, err
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = tmp_path / "measured"
    code, stdout, err = run_cli("analyze", "gradflow-runs", run, "--steps", "2", "--out", out, "--quiet")
    assert code == 0, err
    report = json.loads((out / "runs.json").read_text())
    (measured,) = report["runs"]
    assert measured["checkpoint_step"] == 4 and measured["measured_steps"] == 2 and measured["micro_batches"] == 2
    for key in gf.STATS:
        assert key in measured["summary"]
    assert measured["summary"]["grad_norm_per_param"] > 0
    assert "| run |" in stdout and "| run | 4 | switch |" in stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a run with one micro-batch per step: the SNR needs two; an override says how to split
    assert_user_error(run_cli("analyze", "gradflow-runs", run, "train.micro_batch_size=4", "--out", out, "--quiet"),
                      "train.micro_batch_size")
