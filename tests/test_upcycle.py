"""Sparse upcycling (`samoe train --init-from`): experts start as the dense FFN, routers fresh.

With no noise and gates that sum to 1 every MoE layer computes the dense FFN, so the upcycled
model's first forward equals the dense model's."""

import random
from pathlib import Path

import pytest
import torch

from helpers import assert_user_error, make_run, run_cli
from samoe.config import load_config
from samoe.data.tokenizer import load_tokenizer
from samoe.model.gpt import GPT
from samoe.train.checkpoint import latest_checkpoint, load_checkpoint
from samoe.train.upcycle import load_dense_source, upcycle

X = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(3))
DENSE = ["model.moe.enabled=false"]


def _target(overrides: list[str]) -> GPT:
    cfg = load_config(preset="tiny", overrides=["model.vocab_size=257", "data.tokenizer=byte", *overrides])
    torch.manual_seed(1)
    return GPT(cfg.model)


@pytest.mark.parametrize("overrides", [
    ["model.moe.sharing=private", "model.moe.router=topk", "model.moe.top_k=2"],
    ["model.moe.sharing=private", "model.moe.router=gshard", "model.moe.residual=true"],  # p0 + p1 = 1
    ["model.moe.sharing=private", "model.moe.router=hash", "model.moe.experts_per_layer=[2,4]"],
    ["model.moe.router=gshard", "model.moe.pool.init=sequence", "model.moe.pool.freeze=true"],  # K = L_moe = 2
])
def test_upcycled_first_forward_equals_the_dense_model(tmp_path, overrides):
    run, dense = make_run(tmp_path / "dense", DENSE)
    model = _target(overrides)
    upcycle(model, load_dense_source(run))
    with torch.no_grad():
        assert (model.eval()(X).logits - dense(X).logits).abs().max().item() < 1e-5


def test_llama_backbone_and_samoe_hf_source(tmp_path):
    llama = ["model.norm=rmsnorm", "model.bias=false", "model.activation=swiglu", "model.positions=rotary"]
    run, dense = make_run(tmp_path / "dense", DENSE + llama)
    assert run_cli("export", run, "--out", tmp_path / "hf")[0] == 0
    model = _target(llama + ["model.moe.sharing=private", "model.moe.router=topk", "model.moe.top_k=2"])
    upcycle(model, load_dense_source(tmp_path / "hf"))  # from the export, not the run
    with torch.no_grad():
        assert (model.eval()(X).logits - dense(X).logits).abs().max().item() < 1e-5


def test_noise_makes_the_experts_differ(tmp_path):
    run, dense = make_run(tmp_path / "dense", DENSE)
    model = _target(["model.moe.sharing=private", "model.moe.router=topk", "model.moe.top_k=2"])
    upcycle(model, load_dense_source(run), noise=0.1, seed=0)
    w1 = model.blocks[0].ffn.experts.w1.detach()
    base = dense.blocks[0].ffn.fc1.weight.detach().t()
    assert not torch.equal(w1[0], w1[1])
    rel = ((w1 - base).std() / base.std()).item()
    assert 0.05 < rel < 0.2
    assert torch.equal(model.blocks[0].ffn.experts.b1[1], dense.blocks[0].ffn.fc1.bias.detach())  # biases: no noise


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    words = "the pool of experts routes every token through a small layer".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)), encoding="utf-8")
    return path


@pytest.mark.slow
def test_train_init_from_a_dense_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    run, dense = make_run(tmp_path / "dense", DENSE)
    data = _corpus(tmp_path / "corpus.txt")
    code, out, err = run_cli("train", "--preset", "tiny", "--quiet", "--data", data, "--out", tmp_path / "moe",
                          "--init-from", run, "train.max_steps=1", "train.eval_every=1", "train.ckpt_every=1",
                          "train.eval_tokens=256", "train.batch_size=2", "model.moe.router=gshard")
    assert code == 0, err
    assert (tmp_path / "moe" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    cfg = load_config(tmp_path / "moe" / "config.yaml")
    assert cfg.model.vocab_size == load_tokenizer(run / "tokenizer.json").vocab_size
    moe = GPT(cfg.model)
    load_checkpoint(latest_checkpoint(tmp_path / "moe"), moe)
    # one optimiser step away from the dense weights, not a fresh initialisation
    delta = (moe.wte.weight - dense.wte.weight).abs().max().item()
    assert 0 < delta < 0.05


@pytest.mark.parametrize("source, overrides, named", [
    (DENSE, ["model.d_model=32"], "model.d_model"),
    (DENSE, ["model.moe.ffn_hidden=128"], "model.moe.ffn_hidden"),
    ([], [], "MoE model"),  # an MoE source
])
def test_init_from_that_does_not_fit(tmp_path, monkeypatch, source, overrides, named):
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    run, _ = make_run(tmp_path / "src", source)
    data = _corpus(tmp_path / "corpus.txt")
    result = run_cli("train", "--preset", "tiny", "--quiet", "--data", data, "--out", tmp_path / "new",
                  "--init-from", run, *overrides)
    assert_user_error(result, named, str(run))
    assert not (tmp_path / "new").exists()


def test_init_from_a_directory_that_is_no_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("train", "--preset", "tiny", "--out", tmp_path / "new", "--init-from", tmp_path / "empty")
    assert_user_error(result, "empty")
    assert not (tmp_path / "new").exists()
