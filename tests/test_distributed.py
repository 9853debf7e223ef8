"""Data, expert and fully sharded parallel training on 2 (and 4) CPU processes over gloo, against
one process:

- an expert-parallel MoE layer gives the single-process outputs and gradients, for every router,
  with capacity and dropless, for private experts, the SaMoE pool and the shared bank;
- `samoe train --nproc 2 --ep 2` logs the same loss and clipped gradient norm at every step as
  one process with the same global batch, and so do pure data parallel, dp 2 x ep 2, ep 4, FSDP2
  on 2 and FSDP2 beside ep 2 on 4;
- a sharded checkpoint written by 4 processes (ep 2, FSDP) resumes on 2 and on 1 with the same
  next steps, a one-process checkpoint on 4, and both formats export the same tensors;
- a process killed mid-save leaves the previous checkpoint loadable; a missing or corrupt shard
  is one line; impossible layouts are one-line errors with exit status 2.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helpers import read_metrics, write_corpus
from samoe.analysis import gradflow
from samoe.checkpoint import MANIFEST, latest_checkpoint, load_checkpoint, save_checkpoint
from samoe.cli import main
from samoe.config_load import load_config
from samoe.data.dataset import TokenStream
from samoe.model.gpt import GPT
from samoe.moe.dispatch import record_moe
from samoe.moe.expert_parallel import take_shard
from samoe.train import distributed
from samoe.train.loop import new_trainer
from samoe.train.perplexity import evaluate

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SKEW = "all tokens to expert 0"
LAYER_CASES = [  # (router, dropless, sharing, extra overrides)
    ("switch", False, "private", ()),
    ("switch", True, "private", ()),
    ("gshard", False, "private", ()),
    ("gshard", True, "private", ()),
    ("switch", False, "pool", ()),
    ("gshard", True, "pool", ("model.moe.pool.granularity=expert",)),
    ("gshard", False, "pool", ("model.moe.experts_per_layer=[4, 2]",)),  # pyramid: the pool's first 2
    ("switch", True, "shared", ()),
    ("topk", False, "private", ("model.moe.top_k=3",)),
    ("base", False, "pool", ()),
    ("hash", False, "private", ()),
    ("expert_choice", False, "pool", ()),
    ("gshard", False, "pool", ("model.moe.capacity_factor=16",)),  # capacity above the token count
    ("switch", True, "pool", (SKEW,)),  # every token to expert 0: process 1 receives nothing
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _layer_worker(rank: int, world: int, port: int) -> None:
    _join(rank, world, port)
    for router, dropless, sharing, extra in LAYER_CASES:
        cfg = load_config(preset="tiny", overrides=[
            f"model.moe.router={router}", f"model.moe.dropless={str(dropless).lower()}",
            f"model.moe.sharing={sharing}", "model.moe.capacity_factor=1.0", "model.moe.shared_experts=4",
            "train.ep=2", "train.batch_size=2", *(o for o in extra if o != SKEW)])
        layout, _ = distributed.init_layout(cfg, torch.device("cpu"))
        torch.manual_seed(0)
        reference = GPT(cfg.model)
        torch.manual_seed(0)
        model = distributed.parallelize(GPT(cfg.model), layout)  # the same draws, only this process's experts kept
        gen = torch.Generator().manual_seed(1)
        B, S, d = 2, 16, cfg.model.d_model
        xs = torch.randn(world, B, S, d, generator=gen, dtype=torch.float64)
        ids = torch.randint(cfg.model.vocab_size, (world, B, S), generator=gen)
        upstream = torch.randn(world, B, S, d, generator=gen, dtype=torch.float64)
        model.double()
        reference.double()
        if SKEW in extra:  # a constant feature only expert 0's router row reads
            xs[..., 0] = 10.0
            for m in (model, reference):
                for layer in m.moe_layers():
                    layer.router.weight.data[:, 0] = torch.tensor([1.0] + [-1.0] * (layer.router.num_experts - 1))
        for i, (layer, ref_layer) in enumerate(zip(model.moe_layers(), reference.moe_layers())):
            case = f"{router} dropless={dropless} {sharing} {extra} layer {i}"
            # one process: each rank's tokens through the whole layer, gradients per rank
            ref_out, ref_grads = [], []
            names = [n for n, _ in ref_layer.named_parameters()]
            if sharing == "pool":
                names += ["pool." + n for n, _ in reference.expert_pool.named_parameters()]
            elif sharing == "shared":
                names += ["bank." + n for n, _ in reference.expert_bank.named_parameters()]
            params = dict(ref_layer.named_parameters())
            params.update({"pool." + n: p for n, p in (reference.expert_pool.named_parameters() if sharing == "pool" else [])})
            params.update({"bank." + n: p for n, p in (reference.expert_bank.named_parameters() if sharing == "shared" else [])})
            for r in range(world):
                x = xs[r].clone().requires_grad_()
                torch.manual_seed(100 + r)  # gshard's random routing and jitter draw the same numbers
                y, _ = ref_layer(x, ids[r])
                grads = torch.autograd.grad((y * upstream[r]).sum(), [x, *(params[n] for n in names)], allow_unused=True)
                ref_out.append(y.detach())
                ref_grads.append(dict(zip(["x", *names], grads)))
            # expert parallel: this rank's tokens, experts spread over both processes
            x = xs[rank].clone().requires_grad_()
            torch.manual_seed(100 + rank)
            y, _ = layer(x, ids[rank])
            (y * upstream[rank]).sum().backward()
            torch.testing.assert_close(y, ref_out[rank], rtol=1e-9, atol=1e-9, msg=lambda m: f"{case}: output {m}")
            # the logged traffic: rows out to the other process's experts and rows back from it, plus the counts
            owners_of = []
            for r in range(world):
                torch.manual_seed(100 + r)
                routing = ref_layer.router(xs[r].reshape(-1, d), ids[r].reshape(-1))
                owners_of.append(routing.expert[routing.keep] % world)
            rows = int((owners_of[rank] != rank).sum()) + int((owners_of[1 - rank] == rank).sum())
            n_local = ref_layer.router.num_experts // world
            assert layer.a2a_bytes == rows * d * 8 + n_local * 8, case
            torch.testing.assert_close(x.grad, ref_grads[rank]["x"], rtol=1e-9, atol=1e-9, msg=lambda m: f"{case}: dx {m}")
            owners = {"pool." + n: p for n, p in (model.expert_pool.named_parameters() if sharing == "pool" else [])}
            owners.update({"bank." + n: p for n, p in (model.expert_bank.named_parameters() if sharing == "shared" else [])})
            owners.update(dict(layer.named_parameters()))
            for name in names:
                grad = owners[name].grad
                total = [g[name] for g in ref_grads if g[name] is not None]
                total = sum(total) if total else torch.zeros_like(params[name])
                if name.endswith("coef_logits"):  # replicated, but each rank sees only its own experts' part
                    grad = grad.clone()
                    torch.distributed.all_reduce(grad)
                    expect = total
                elif name.startswith(("pool.", "bank.", "experts.")):
                    # an expert shard's gradient sums over every token of the group; compare this rank's experts
                    axis = 1 if name.startswith("pool.") else 0
                    expect = take_shard(total, axis, layout.ep)
                else:  # router, residual: replicated, each rank's gradient from its own tokens
                    expect = ref_grads[rank][name] if ref_grads[rank][name] is not None else torch.zeros_like(grad)
                torch.testing.assert_close(grad, expect, rtol=1e-9, atol=1e-9, msg=lambda m: f"{case}: d{name} {m}")
            model.zero_grad()
    distributed.shutdown(layout)


def test_expert_parallel_layer_equals_the_single_process_layer():
    mp.start_processes(_layer_worker, args=(2, _free_port()), nprocs=2, start_method="spawn")


def _gradflow_worker(rank: int, world: int, port: int) -> None:
    _join(rank, world, port)
    cfg = load_config(preset="tiny", overrides=["model.moe.sharing=pool", "model.moe.num_experts=4", "train.ep=2",
                                                "train.batch_size=4", "train.micro_batch_size=2", "model.block_size=16",
                                                "train.eval_tokens=64"])
    layout, _ = distributed.init_layout(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = distributed.parallelize(GPT(cfg.model), layout)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    model.eval()
    ref = model(idx, idx).loss
    with record_moe(model) as rec:  # the recording dispatcher wraps the expert-parallel one
        out = model(idx, idx)
    torch.testing.assert_close(out.loss, ref)
    assert [E for _, _, E in rec.calls] == [4, 4] and all(ws[0].shape[0] == 2 for _, ws, _ in rec.calls)
    stream = TokenStream(np.random.default_rng(0).integers(0, cfg.model.vocab_size, 16 * 40 + 1))
    tr = new_trainer(cfg, model, stream, layout)
    result = gradflow.measure_steps(tr, stream, 2, 0)  # the project's train step, recorded
    assert result["measured_steps"] == 2 and tr.step == 2
    layer = result["per_layer"][0]
    assert len(layer["tokens_per_step"]) == 4 and len(layer["grad_norm_per_param"]) == 2  # all E routed, E/P held
    assert sum(layer["tokens_per_step"]) > 0 and result["summary"]["grad_norm_per_param"] > 0
    distributed.shutdown(layout)


def test_gradient_flow_records_an_expert_parallel_run():
    mp.start_processes(_gradflow_worker, args=(2, _free_port()), nprocs=2, start_method="spawn")


# --------------------------------------------------------------------------- whole runs


def _samoe(*args: str, env: dict | None = None, torchrun: int = 0, wait: bool = True):
    """`samoe ARGS`, or `torchrun --standalone --nproc_per_node N -m samoe ARGS` when torchrun = N:
    its CompletedProcess, or with wait=False the running Popen (text pipes)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
    cmd, env = [sys.executable, *launcher, "-m", "samoe", *args], {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _run_args(corpus: Path, out: Path, steps: int = 20, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--quiet",
            f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=10", "train.ckpt_every=10",
            "train.eval_tokens=512", "train.batch_size=8", "train.micro_batch_size=2", "data.tokenizer=byte",
            "model.moe.num_experts=4", *extra]


def _assert_same_curve(a: list[dict], b: list[dict]) -> None:
    """Equal within float tolerance: summation order differs (all-reduce vs accumulation), and a
    routing decision near a tie can flip with it, moving one step's loss by ~1e-5."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "load_balance", "grad_norm", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process; ep = 2 on 2 processes (launched by torchrun itself); 2 data-parallel processes,
    dp 2 x ep 2, ep 4, FSDP2 on 2 and FSDP2 with ep 2 on 4 (launched by `samoe train --nproc`).
    Same data and global batch."""
    root = tmp_path_factory.mktemp("dist")
    env = {"SAMOE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    corpus = write_corpus(root / "corpus.txt")
    layouts = [("one", (), 0), ("ep2", ("--ep", "2"), 2), ("dp2", ("--nproc", "2"), 0),
               ("dp2ep2", ("--nproc", "4", "--ep", "2"), 0), ("ep4", ("--nproc", "4", "--ep", "4"), 0),
               ("fsdp2", ("--nproc", "2", "--fsdp"), 0), ("ep2fsdp4", ("--nproc", "4", "--ep", "2", "--fsdp"), 0)]
    out = {name: root / name for name, _, _ in layouts}
    one = _samoe(*_run_args(corpus, out["one"]), env=env)  # fills the data cache the others read
    assert one.returncode == 0, one.stderr[-3000:]
    # the others at once: start-up (imports, rendezvous) is most of each run's time, and it overlaps
    procs = {name: _samoe(*_run_args(corpus, out[name]), *extra, env=env, torchrun=torchrun, wait=False)
             for name, extra, torchrun in layouts[1:]}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, stderr[-3000:])
    return root, corpus, env, out


@pytest.mark.parametrize("name", ["ep2", "dp2", "dp2ep2", "ep4", "fsdp2", "ep2fsdp4"])
def test_parallel_runs_log_the_single_process_loss_and_grad_norm_at_every_step(runs, name):
    _, _, _, out = runs
    one, parallel = read_metrics(out["one"]), read_metrics(out[name])
    assert len(one) == 20
    _assert_same_curve(one, parallel)
    assert max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(one, parallel)) < 1e-3
    summary = json.loads((out[name] / "summary.json").read_text())
    assert summary["processes"] == (4 if name in ("dp2ep2", "ep4", "ep2fsdp4") else 2)
    assert summary["fsdp"] == ("fsdp" in name)
    coefficients = json.loads((out["one"] / "summary.json").read_text())["pool_coefficients"]
    assert np.allclose(summary["pool_coefficients"], coefficients, rtol=1e-3)  # gathered whole under FSDP
    # with experts spread over processes, the all-to-all traffic is logged; none without
    if name in ("dp2", "fsdp2"):
        assert all("a2a_bytes" not in r for r in parallel)
    else:
        assert all(r["a2a_bytes"] > 0 for r in parallel)


def _rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` whose latest checkpoint is `step` (as if it had stopped there)."""
    shutil.copytree(src, dst)
    (dst / "checkpoints" / "latest").write_text(f"step-{step:06d}\n")
    return dst


@pytest.mark.parametrize("src,resume_with", [
    ("ep2", ("train.ep=1",)), ("one", ("--nproc", "2", "--ep", "2")), ("dp2ep2", ("--nproc", "2", "--ep", "2")),
    ("ep2fsdp4", ("--nproc", "2", "train.ep=1", "train.fsdp=false")),  # sharded, 4 -> 2 processes, no FSDP
    ("ep2fsdp4", ("train.ep=1",)),  # sharded -> one process
    ("one", ("--nproc", "4", "--ep", "2", "--fsdp")),  # one-process format -> sharded layout
    ("fsdp2", ("--nproc", "4", "--ep", "4", "train.fsdp=false"))])
def test_checkpoints_move_between_process_counts(runs, tmp_path, src, resume_with):
    """Steps 11-20 after resuming step 10 in another layout are those of the uninterrupted run
    (to float tolerance: the layouts sum in different orders), optimiser state included."""
    root, _, env, out = runs
    run = _rewind(out[src], tmp_path / "resumed", 10)
    done = _samoe("train", "--resume", "--out", str(run), "--quiet", *resume_with, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_curve(read_metrics(out[src]), read_metrics(run))
    assert max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(read_metrics(out[src]), read_metrics(run))) < 1e-3


def test_a_sharded_checkpoint_is_written_by_every_process_and_records_its_layout(runs):
    _, _, _, out = runs
    ckpt = out["ep2fsdp4"] / "checkpoints" / "step-000020"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["step"] == 20 and manifest["layout"] == {"processes": 4, "ep": 2, "fsdp": True}
    assert manifest["expert_axes"]["expert_pool.w1"] == 1
    shards = {f: (ckpt / f).stat().st_size for f in manifest["files"] if f.endswith(".distcp")}
    assert sorted(shards) == [f"__{r}_0.distcp" for r in range(4)]
    assert max(shards.values()) < 0.5 * sum(shards.values())  # no process wrote the whole model
    assert set(manifest["files"]) == {p.name for p in ckpt.iterdir()} - {MANIFEST}
    model = GPT(load_config(out["ep2fsdp4"] / "config.yaml").model)
    state = load_checkpoint(ckpt, model)  # a whole model, one process
    assert state["step"] == 20 and len(state["rng"]["torch_by_rank"]) == 4


def test_export_of_a_sharded_checkpoint_equals_that_of_the_same_weights_in_one_file(runs, tmp_path):
    from safetensors.torch import load_file

    _, _, env, out = runs
    sharded = tmp_path / "sharded"
    shutil.copytree(out["ep2fsdp4"], sharded)
    single = tmp_path / "single"  # the same weights, written by one process
    shutil.copytree(out["ep2fsdp4"], single)
    shutil.rmtree(single / "checkpoints")
    model = GPT(load_config(sharded / "config.yaml").model)
    load_checkpoint(latest_checkpoint(sharded), model)
    save_checkpoint(single, 20, model, {})
    tensors = []
    for run in (sharded, single):
        done = _samoe("export", str(run), "--out", str(tmp_path / f"hf-{run.name}"), env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        files = sorted((tmp_path / f"hf-{run.name}").glob("*.safetensors"))
        tensors.append({k: v for f in files for k, v in load_file(f).items()})
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) > 10
    for name, t in tensors[0].items():
        assert torch.equal(t, tensors[1][name]), name


def _break(ckpt: Path, how: str) -> Path:
    shard = ckpt / "__1_0.distcp"
    if how == "missing":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_a_missing_or_corrupt_shard_is_one_line_naming_it(runs, tmp_path, how):
    _, _, env, out = runs
    run = _rewind(out["ep2fsdp4"], tmp_path / "broken", 10)
    shard = _break(run / "checkpoints" / "step-000010", how)
    for args in (("train", "--resume", "--out", str(run), "--quiet", "--nproc", "2"), ("eval", str(run))):
        done = _samoe(*args, env=env)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("run directory")]
        assert lines == [f"samoe: error: checkpoint shard '{shard}' is {how}" + (
            ": its SHA-256 differs from the manifest's" if how == "corrupt" else "")], done.stderr


KILL_DURING_SHARDED_SAVE = """
import os, signal, sys, torch
from samoe import checkpoint
from samoe.config_load import load_config
from samoe.model.gpt import GPT
from samoe.train import distributed, state
from samoe.train.loop import new_trainer
from samoe.train.run import restore
run = sys.argv[1]
cfg = load_config(os.path.join(run, "config.yaml"))
layout, _ = distributed.init_layout(cfg, torch.device("cpu"))
tr = new_trainer(cfg, distributed.parallelize(GPT(cfg.model), layout), None, layout)
restore(tr, checkpoint.latest_checkpoint(run))
def dying_save(obj, f, *a, **k):  # the main process writes state.pt after every shard is on disk
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.torch.save = dying_save
state.init_optimizer_state(tr.optimizer)
checkpoint.save_sharded(run, 20, state.checkpoint_tensors(tr.model, tr.optimizer, layout), {}, {"expert_axes": {}})
"""


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_and_the_run_resumes(runs, tmp_path):
    _, _, env, out = runs
    run = _rewind(out["fsdp2"], tmp_path / "killed", 10)
    shutil.rmtree(run / "checkpoints" / "step-000020")
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SHARDED_SAVE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(run)], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert proc.returncode != 0
    assert list((run / "checkpoints").glob(".step-000020.*.tmp"))  # the shards of the save that died
    assert latest_checkpoint(run).name == "step-000010"
    done = _samoe("train", "--resume", "--out", str(run), "--quiet", "--nproc", "2", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_curve(read_metrics(out["fsdp2"]), read_metrics(run))
    assert latest_checkpoint(run).name == "step-000020" and not list((run / "checkpoints").glob(".*tmp"))


@pytest.mark.parametrize("flags,overrides,message", [
    (("--nproc", "2", "--ep", "3"), (), "train.ep = 3"),  # 4 experts are not divisible by 3
    (("--nproc", "3", "--ep", "2"), (), "must divide the number of processes, 3"),
    (("--ep", "2"), (), "must divide the number of processes, 1"),
    (("--nproc", "3"), (), "train.batch_size = 8 must be a multiple of the number of processes, 3"),
    (("--nproc", "2"), ("train.micro_batch_size=8",), "train.micro_batch_size = 8 must divide the per-process batch 4"),
    (("--nproc", "0"), (), "--nproc = 0"),
])
def test_impossible_layouts_are_one_line_errors(tmp_path, monkeypatch, capsys, flags, overrides, message):
    """Checked before any process starts, so in-process (the exit status through a subprocess is
    test_an_error_on_the_main_process_is_one_line_from_all_of_them's)."""
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=20)
    assert main([*_run_args(corpus, tmp_path / "run", 2, *overrides), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("samoe: error:") and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_an_error_on_the_main_process_is_one_line_from_all_of_them(tmp_path):
    """The main process alone reads the data first (to train the tokenizer); the others wait for
    it, so its error must reach them rather than leave them waiting or dying with a traceback."""
    done = _samoe(*_run_args(tmp_path / "missing.txt", tmp_path / "run", 2), "--nproc", "2",
                  env={"SAMOE_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"samoe: error: data path '{tmp_path / 'missing.txt'}' does not exist"]
    assert not (tmp_path / "run").exists()


def test_evaluation_shares_batches_and_every_process_calls_the_model_equally_often():
    """5 batches over 3 processes: totals equal one process's; each process forwards twice."""
    cfg = load_config(preset="tiny", overrides=["model.block_size=16"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    stream = TokenStream(np.random.default_rng(0).integers(0, cfg.model.vocab_size, 16 * 10 + 1))
    token_bytes = np.ones(cfg.model.vocab_size, dtype=np.int64)
    whole = evaluate(model, stream, token_bytes, batch_size=2)
    partial_totals, calls = [], []
    for rank in range(3):
        n = []
        hook = model.register_forward_hook(lambda *_: n.append(1))
        evaluate(model, stream, token_bytes, batch_size=2, shard=(rank, 3), all_sum=lambda t: partial_totals.append(t) or t)
        hook.remove()
        calls.append(len(n))
    total = sum(partial_totals)
    assert calls == [2, 2, 2]
    assert int(total[1]) == whole["val_tokens"] == 160
    assert float(total[0]) / int(total[1]) == pytest.approx(whole["val_loss"], rel=1e-6)


def test_ctrl_c_stops_every_process_quietly_and_the_run_resumes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    env = {**os.environ, "SAMOE_CACHE": str(tmp_path / "cache")}
    args = _run_args(corpus, run, 100000, "train.ckpt_every=2")
    proc = subprocess.Popen([sys.executable, "-m", "samoe", *args, "--nproc", "2", "--ep", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and stderr.count("samoe: interrupted") == 1, stderr
    step = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    done = _samoe("train", "--resume", "--out", str(run), "--quiet", f"--max-steps={step + 2}", "train.ep=1", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 2
