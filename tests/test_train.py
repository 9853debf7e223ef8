"""The training loop: exact resume after SIGKILL, checkpoints that survive a kill mid-write,
the learning-rate schedule, weight-decay groups and the golden loss curve."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_user_error, read_metrics, run_cli, tiny_args
from samoe import checkpoint
from samoe.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from samoe.cli import main
from samoe.config_load import load_config
from samoe.errors import CheckpointError
from samoe.model.gpt import GPT
from samoe.train.optim import build_optimizer, decays, lr_at, set_lr

GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"
KILL_AT = 25  # steps done when the child stops: after checkpoint 20, before the next one and the end

# The child trains as `samoe train` does, but when step KILL_AT + 1 begins it says so on stdout and
# waits: the parent kills it there, mid-run, whatever the machine's speed.
STOP_AT_STEP = f"""
import sys, time
from samoe.cli import main
from samoe.train import loop
real_lr_at = loop.lr_at
def lr_at(step, t):
    if step == {KILL_AT}:
        print("stopped", flush=True)
        time.sleep(600)
    return real_lr_at(step, t)
loop.lr_at = lr_at
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_then_resume_logs_the_same_metrics_as_an_uninterrupted_run(tmp_path, corpus):
    steps = 60
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the gshard router with random routing and jitter exercises the global RNG too
    extra = ("model.moe.router=gshard", "model.moe.random_routing=true", "model.moe.jitter=0.01")
    assert main(tiny_args(corpus, full, steps, *extra)) == 0

    proc = subprocess.Popen([sys.executable, "-c", STOP_AT_STEP, *tiny_args(corpus, killed, steps, *extra)],
                            env={**os.environ, "SAMOE_CACHE": str(tmp_path / "cache")},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the evaluation lines, then "stopped" when the child reaches step KILL_AT + 1
        if line.strip() == "stopped":
            break
    else:
        pytest.fail("the training process ended before step KILL_AT")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000020"
    logged = read_metrics(killed)
    assert logged and logged[-1]["step"] < steps, "the run must be killed mid-training"

    assert main(["train", "--resume", "--out", str(killed), "--quiet"]) == 0
    assert read_metrics(killed) == read_metrics(full)
    assert json.loads((killed / "summary.json").read_text())["val_loss"] == \
        json.loads((full / "summary.json").read_text())["val_loss"]


KILL_DURING_SAVE = """
import os, signal, sys, torch
from samoe.config_load import load_config
from samoe.errors import CheckpointError
from samoe.model.gpt import GPT
from samoe import checkpoint
model = GPT(load_config(preset="tiny").model)
real_save = torch.save
def dying_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the weights and state are on disk
checkpoint.torch.save = dying_save
checkpoint.save_checkpoint(sys.argv[1], 20, model, {"note": torch.tensor(2.0)})
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    save_checkpoint(tmp_path, 10, model, {"note": torch.tensor(1.0)})
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)])
    assert proc.returncode == -signal.SIGKILL

    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-000010"
    fresh = GPT(cfg.model)
    state = load_checkpoint(ckpt, fresh)
    assert state["step"] == 10 and float(state["note"]) == 1.0
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name

    save_checkpoint(tmp_path, 30, model, {})  # the next save clears the debris of the killed one
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))
    assert latest_checkpoint(tmp_path).name == "step-000030"


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_path_and_the_checkpoint_kept(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    real_save_model, calls = checkpoint.save_model, []

    def full_disk_on_the_second_checkpoint(model, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_model(model, filename, *a, **k)

    monkeypatch.setattr(checkpoint, "save_model", full_disk_on_the_second_checkpoint)
    monkeypatch.setattr(checkpoint, "save_file", full_disk_on_the_second_checkpoint)
    code, out, err = run_cli(*tiny_args(corpus, run, 4, "train.ckpt_every=2"))
    started, *error = err.splitlines(keepends=True)  # training had started: the run-directory line, then the error
    assert started.startswith("run directory:")
    kept = run / "checkpoints" / "step-000002"
    assert_user_error((code, out, "".join(error)), run / "checkpoints" / "step-000004", "No space left on device",
                      f"'{kept}' is kept")
    assert latest_checkpoint(run) == kept and not list((run / "checkpoints").glob(".*tmp"))
    state = load_checkpoint(kept, GPT(load_config(run / "config.yaml").model))
    assert state["step"] == 2


def test_an_out_directory_that_cannot_be_made_is_one_line(tmp_path, corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    assert_user_error(run_cli(*tiny_args(corpus, blocker / "run", 2)), blocker / "run",
                      "no checkpoint had been written yet")


def test_checkpoint_loads_tensor_by_tensor_with_tied_weights_and_checks_shapes(tmp_path):
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    assert model.lm_head.weight is model.wte.weight  # stored once
    ckpt = save_checkpoint(tmp_path, 1, model, {})
    fresh = GPT(cfg.model)
    load_checkpoint(ckpt, fresh)
    assert fresh.lm_head.weight is fresh.wte.weight and torch.equal(fresh.wte.weight, model.wte.weight)
    other = GPT(load_config(preset="tiny", overrides=["model.moe.pool.size=3"]).model)
    message = r"does not match the model: blocks.0.ffn.experts.coef_logits has shape \[2\], the model \[3\]"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt, other)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    t = load_config(overrides=["train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=10",
                               "train.max_steps=110"]).train
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(110, t) == pytest.approx(0.1)
    lrs = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_skips_norms_biases_embeddings_routers_and_coefficients():
    cfg = load_config(preset="tiny", overrides=["model.moe.residual=true"])
    model = GPT(cfg.model)
    decayed = {n for n, p in model.named_parameters() if decays(n, p)}
    assert "blocks.0.attn.qkv.weight" in decayed
    assert "expert_pool.w1" in decayed and "expert_pool.w2" in decayed
    for name in ["wte.weight", "wpe.weight", "blocks.0.ln_1.weight", "blocks.0.attn.qkv.bias",
                 "blocks.0.ffn.router.weight", "blocks.0.ffn.experts.coef_logits", "expert_pool.b1",
                 "expert_pool.b2"]:
        assert name not in decayed, name
    opt = build_optimizer(model, cfg.train)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_coefficient_learning_rate_is_a_multiple_of_the_schedule():
    """model.moe.pool.lr_scale: the coefficient logits (only they) step at lr_scale x the lr."""
    cfg = load_config(preset="tiny", overrides=["model.moe.pool.lr_scale=10"])
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.train, coef_lr_scale=cfg.model.moe.pool.lr_scale)
    set_lr(opt, 0.002)
    coef = {id(p) for n, p in model.named_parameters() if "coef_logits" in n}
    assert coef
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert group["lr"] == pytest.approx(0.02 if ids & coef else 0.002)
        assert not ids & coef or ids == coef
    assert len(build_optimizer(model, cfg.train).param_groups) == 2  # scale 1: today's two groups


def test_epoch_sampling_resumes_where_it_stopped(tmp_path, corpus, monkeypatch):
    """data.sampling=epochs: each step reads TokenStream.epoch_batch(step) (a function of the seed
    and the step, tests/test_data.py), also after --resume, so a resumed run reads the batches an
    uninterrupted one would."""
    from samoe.data.dataset import TokenStream
    asked = []
    real = TokenStream.epoch_batch

    def recording(self, step, *args):
        asked.append(step)
        return real(self, step, *args)
    monkeypatch.setattr(TokenStream, "epoch_batch", recording)
    run = tmp_path / "run"
    assert main(tiny_args(corpus, run, 10, "data.sampling=epochs")) == 0
    assert main(["train", "--resume", "--out", str(run), "--quiet", "train.max_steps=15"]) == 0
    assert asked == list(range(15))
    assert read_metrics(run)[-1]["step"] == 15


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path, corpus):
    one, acc = tmp_path / "one", tmp_path / "acc"
    dense = "model.moe.enabled=false"  # capacity depends on the micro-batch size; a dense model does not
    assert main(tiny_args(corpus, one, 5, dense)) == 0
    assert main(tiny_args(corpus, acc, 5, dense, "train.micro_batch_size=1")) == 0
    for a, b in zip(read_metrics(one), read_metrics(acc)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_golden_curve_of_a_fixed_tiny_run(tmp_path, corpus):
    """The first losses of a fixed tiny SaMoE run. A change to the model or the loop that
    moves them is either a bug or deliberate: then regenerate with SAMOE_UPDATE_GOLDEN=1."""
    assert main(tiny_args(corpus, tmp_path / "run", 20)) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    if os.environ.get("SAMOE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(losses, indent=1) + "\n")
    assert losses == pytest.approx(json.loads(GOLDEN.read_text()), rel=1e-3)


def test_a_full_disk_is_named_whichever_layer_reported_it(tmp_path, monkeypatch):
    """torch.save's zip writer reports a full disk as "unexpected pos": the message still says the
    disk is full, with the free space and what the checkpoint needs; other errors keep their own."""
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: 3_000_000)
    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1580416 vs 1580368")
    message = str(checkpoint.write_error(tmp_path / "step-000004", torn, tmp_path, needed=9_000_000))
    assert "No space left on device (3 MB free; the checkpoint needs about 9 MB)" in message
    assert "unexpected pos" not in message and "no checkpoint had been written yet" in message
    other = str(checkpoint.write_error(tmp_path / "step-000004", PermissionError(13, "Permission denied"), tmp_path,
                                       needed=1_000_000))
    assert "Permission denied" in other and "No space" not in other
