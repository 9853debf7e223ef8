"""The benchmark suite's machinery at toy sizes: it measures what it says and reports every
ratio under its stable name. The speeds themselves are never asserted; what is asserted is that
the measuring is right: medians over the repeats after warm-up (on a fake clock), cases run
round-robin, peers measured when installed and skipped by name when not, and peak memory that
follows an allocation of known size."""

import importlib.util
import json
import math
import subprocess
import sys
import time

import pytest
import torch

from samoe import timing as samoe_timing
from samoe.bench import layers, peers, suite, training
from samoe.bench.layers import Shape, layer_ratios
from samoe.bench.timing import peak_rss_mib, run_isolated
from samoe.cli import main
from samoe.moe import expert_gemm
from samoe.timing import interleaved_medians


class FakeClock:
    """time.perf_counter for timing.py: each case advances it by the next of its durations."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def case(self, name, durations, calls):
        durations = iter(durations)

        def fn():
            calls.append(name)
            self.now += next(durations)
        return fn


def test_interleaved_medians_are_medians_of_the_repeats_after_warmup_in_round_robin(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(samoe_timing.time, "perf_counter", clock)  # time.perf_counter, restored after
    # warm-up calls are slow and must not count; the medians of the repeats are 3 and 20
    t = interleaved_medians({"a": clock.case("a", [100, 100, 1, 5, 3], calls),
                             "b": clock.case("b", [50, 50, 20, 10, 30], calls)}, repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert t == {"a": 3, "b": 20}


def test_interleaved_medians_on_the_real_clock():
    t = interleaved_medians({"sleep": lambda: time.sleep(0.02), "noop": lambda: None},
                            repeats=3, warmup=1)
    assert t["sleep"] >= 0.02 > t["noop"] >= 0


def test_layer_ratios_have_stable_names():
    r = layer_ratios(Shape(tokens=64, d_model=8, hidden=16), experts=(4, 8), repeats=1)
    assert {"moe_vs_dense_e4", "moe_vs_dense_e8", "samoe_vs_moe"} <= set(r)
    assert r["moe_vs_dense_e4"] == r["time_moe_e4"] / r["time_dense"]
    assert all(math.isfinite(v) and v > 0 for k, v in r.items() if k.startswith(("time_", "moe_vs", "samoe_vs")))


def test_with_sample_s_each_sample_is_calls_in_a_row_sized_by_the_last_warm_up_and_divided_back(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(samoe_timing.time, "perf_counter", clock)
    # warm-ups of 9 and 2 units: samples of round(10 / 2) = 5 calls; "b" (20 units) keeps 1
    a = clock.case("a", [9, 2] + [1, 1, 1, 1, 6] + [3] * 5 + [2] * 5, calls)
    b = clock.case("b", [20, 20, 30, 10, 40], calls)
    t = interleaved_medians({"a": a, "b": b}, repeats=3, warmup=2, sample_s=10)
    assert calls == ["a", "b"] * 2 + (["a"] * 5 + ["b"]) * 3
    assert t == {"a": 2, "b": 30}  # a's samples: 10 / 5, 15 / 5, 10 / 5 per call
    with pytest.raises(ValueError):
        interleaved_medians({"a": a}, repeats=1, warmup=0, sample_s=1)


def test_traffic_bound_is_the_dense_time_plus_the_extra_weights_streamed_three_times():
    # 1e6 extra fp32 weights, 3 passes: 12 MB at 12 GB/s is 1 ms on top of a 4 ms dense layer
    assert layers.weight_traffic_bound(0.004, 1_250_000, 250_000, 12e9) == pytest.approx(1.25)
    assert layers.weight_traffic_bound(0.004, 100, 250_000, 12e9) == 1.0  # fewer weights than dense: no bound


def test_gemm_floor_runs_the_six_gemms_of_each_expert(monkeypatch):
    calls = []
    real_mm = torch.mm

    def counting_mm(a, b, out):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b, out=out)
    monkeypatch.setattr(expert_gemm, "_lib", None)  # as where the expert kernel does not run
    run = layers.gemm_floor(tokens=32, d=4, width=6, experts=4, top_k=2)  # 16 rows per expert
    monkeypatch.setattr(torch, "mm", counting_mm)
    run()
    assert len(calls) == 6 * 4
    assert calls[:6] == [((16, 4), (4, 6)), ((16, 6), (6, 4)), ((16, 4), (4, 6)), ((6, 16), (16, 4)),
                         ((16, 6), (6, 4)), ((4, 16), (16, 6))]


def test_with_the_expert_kernel_the_gemm_floor_runs_the_six_through_it(monkeypatch):
    calls = []
    for name in ("rows_times_experts", "weight_grads"):
        real = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    run = layers.gemm_floor(tokens=64, d=8, width=16, experts=8, top_k=2)  # 16 rows per expert
    calls.clear()
    run()
    if expert_gemm.available() and torch.get_num_threads() > 1:  # as the layer runs them (test_expert_gemm: what)
        assert calls == ["rows_times_experts"] * 3 + ["weight_grads", "rows_times_experts", "weight_grads"]
    else:
        assert calls == []


def test_the_batched_gemm_floor_runs_each_of_the_six_once_over_all_experts(monkeypatch):
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, out: calls.append((tuple(a.shape), tuple(b.shape)))
                        or real_bmm(a, b, out=out))
    layers.gemm_floor(tokens=32, d=4, width=6, experts=4, top_k=2, batched=True)()
    assert calls == [((4, 16, 4), (4, 4, 6)), ((4, 16, 6), (4, 6, 4)), ((4, 16, 4), (4, 4, 6)),
                     ((4, 6, 16), (4, 16, 4)), ((4, 16, 6), (4, 6, 4)), ((4, 4, 16), (4, 16, 6))]


def test_training_shapes_report_every_layout_with_its_floor_and_bounds():
    rows = layers.training_shapes(Shape(tokens=64, d_model=8, hidden=16), (64,), bytes_per_s=1e10, repeats=1)
    assert [(r["experts"], r["top_k"], r["expert_hidden"]) for r in rows] == [
        (E, k, 16 // k) for E, k in layers.TRAINING_LAYOUTS]
    for r in rows:
        assert all(math.isfinite(r[key]) and r[key] > 0 for key in (
            "moe_vs_dense", "samoe_vs_moe", "gemm_floor", "bmm_floor", "traffic_bound", "samoe_traffic_bound",
            "dense_ms"))
        assert r["traffic_bound"] >= 1.0 and r["samoe_traffic_bound"] > 1.0


def test_peer_comparison_records_a_skipped_peer_and_divides_the_peer_time_by_ours(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(samoe_timing.time, "perf_counter", clock)  # time.perf_counter, restored after

    def missing(shape, E):
        raise ModuleNotFoundError("No module named 'nopeer'", name="nopeer")

    def slow_peer(shape, E):  # the peer takes 6 time units per call, ours 2
        peer, ours = clock.case("peer", [6] * 3, calls), clock.case("ours", [2] * 3, calls)
        return (lambda x: _Sum(peer)), torch.nn.Module(), (_Timed(ours), None)

    monkeypatch.setattr(peers, "PEERS", {"gone": missing, "slow": slow_peer})
    r = peers.compare(Shape(tokens=4, d_model=2, hidden=4), E=2, repeats=1)
    assert r["skipped"] == {"gone": "not installed (nopeer)"}
    assert r["peer_slow_vs_ours"] == 3 and (r["time_peer_slow"], r["time_ours_for_slow"]) == (6, 2)
    assert "peer_gone_vs_ours" not in r


def test_a_peer_comparison_call_leaves_no_gradients_behind_as_an_optimiser_step_would(monkeypatch):
    """Gradients left in place would make the next call accumulate into them: a pass over every
    weight added to each side."""
    layers_seen = []

    def linear_peer(shape, E):
        peer, mine = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        layers_seen.extend([peer, mine])
        return peer, peer, (mine, None)

    monkeypatch.setattr(peers, "PEERS", {"linear": linear_peer})
    peers.compare(Shape(tokens=3, d_model=4, hidden=4), E=2, repeats=2)
    assert all(p.grad is None for layer in layers_seen for p in layer.parameters())


def test_each_side_of_a_peer_comparison_is_also_timed_against_the_dense_ffn_of_our_layers_shape(monkeypatch):
    clock, calls, built = FakeClock(), [], []
    monkeypatch.setattr(samoe_timing.time, "perf_counter", clock)
    model = layers.moe_model(Shape(tokens=4, d_model=8, hidden=12, activation="swiglu"), 2)

    class Dense(torch.nn.Module):  # the FFN of our shape, taking 4 time units a call
        def __init__(self, *args):
            super().__init__()
            built.append(args)
            self.step = clock.case("dense", [4] * 3, calls)

        def forward(self, x):
            return _Sum(self.step)

    def peer(shape, E):  # 6 units a call; ours 2
        return (lambda x: _Sum(clock.case("peer", [6] * 3, calls))), torch.nn.Module(), \
            ((lambda x: _Sum(clock.case("ours", [2] * 3, calls))), model)

    monkeypatch.setattr(peers, "FeedForward", Dense)
    monkeypatch.setattr(peers, "PEERS", {"p": peer})
    r = peers.compare(Shape(tokens=4, d_model=8, hidden=12), E=2, repeats=1)
    assert built == [(8, 12, "swiglu", 1)]
    assert (r["peer_p_vs_ours"], r["p_vs_dense"], r["ours_for_p_vs_dense"]) == (3, 1.5, 0.5)


class _Timed(torch.nn.Module):
    """A layer without weights whose call runs a FakeClock case."""

    def __init__(self, case):
        super().__init__()
        self.case = case

    def forward(self, x):
        return _Sum(self.case)


class _Sum:
    """Stands for a layer's output: .sum().backward() runs the case."""

    def __init__(self, fn):
        self.fn = fn

    def sum(self):
        return self

    def backward(self):
        self.fn()


@pytest.mark.slow
def test_installed_peers_are_measured_and_the_others_skipped_by_name():
    r = run_isolated("samoe.bench.peers", "32", "8", "16", "4", "1")  # a process of its own, as the suite runs it
    measured = {n for n in peers.PEERS if f"peer_{n}_vs_ours" in r}
    assert measured | set(r["skipped"]) == set(peers.PEERS) and not measured & set(r["skipped"])
    if importlib.util.find_spec("transformers") is not None:  # a dev install has it
        assert {"hf_switch", "hf_mixtral"} <= measured, r["skipped"]
    for name in measured:
        assert math.isfinite(r[f"peer_{name}_vs_ours"]) and r[f"peer_{name}_vs_ours"] > 0
    for name, why in r["skipped"].items():
        assert why.startswith("not installed ("), (name, why)


ALLOCATE = """
import json, sys
from samoe.bench.timing import peak_rss_mib
before = peak_rss_mib()
block = bytearray(200 * 2**20)  # 200 MiB, zero-filled: every page touched
print(json.dumps({"before": before, "after": peak_rss_mib()}))
"""


@pytest.mark.slow
def test_peak_rss_follows_an_allocation_of_known_size():
    out = subprocess.run([sys.executable, "-c", ALLOCATE], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert 190 <= r["after"] - r["before"] <= 260, r
    assert peak_rss_mib() > 0


@pytest.mark.slow
def test_peak_memory_worker_reports_its_own_peak():
    out = run_isolated("samoe.bench.memory", "moe", "1", env=training.RSS_TRACKS_LIVE)  # as peak_memory runs it
    assert out["peak_mib"] > 10  # two training steps of a 12-layer model allocate real memory


def test_markdown_and_json_report(tmp_path, monkeypatch):
    fake = {"machine": "m", "conditions": "load average 0.10 at the start; deepspeed not installed",
            "quick": True, "tokens": 64, "repeats": 1, "moe_vs_dense_e16": 1.2,
            "moe_vs_dense_e64": 1.4, "samoe_vs_moe": 1.1, "samoe_vs_moe_peak_mem": 0.5,
            "samoe_vs_moe_peak_mem_b1": 0.5, "samoe_step_peak_mib_b1": 50.0, "moe_step_peak_mib_b1": 100.0,
            "peer_hf_switch_vs_ours": 1.5, "hf_switch_vs_dense": 1.8, "ours_for_hf_switch_vs_dense": 1.2,
            "skipped": {"deepspeed": "not installed (deepspeed)"},
            "tiny_samoe_tokens_per_s": 1.0, "tiny_moe_tokens_per_s": 2.0, "tiny_dense_tokens_per_s": 3.0,
            "scaling": [{"tokens": 64, "experts": 4, "moe_vs_dense": 1.3, "samoe_vs_moe": 1.1, "dense_ms": 1.0}],
            "bandwidth_gb_per_s": 20.0,
            "training_shapes": [{"tokens": 64, "experts": 4, "top_k": 2, "expert_hidden": 8, "dense_ms": 1.0,
                                 "moe_vs_dense": 1.3, "samoe_vs_moe": 1.2, "gemm_floor": 1.25, "bmm_floor": 1.05,
                                 "traffic_bound": 1.1,
                                 "samoe_traffic_bound": 1.15}]}
    monkeypatch.setattr(suite, "run_suite", lambda quick, repeats: fake)
    doc, js = tmp_path / "b.md", tmp_path / "b.json"
    suite.main(True, 1, str(js), str(doc), "samoe bench --quick")
    text = doc.read_text()
    assert "`samoe bench --quick`" in text and "; load average 0.10 at the start; deepspeed not installed." in text
    assert "| (a) MoE top-1 (dropless) layer time / dense FFN, E = 16 | 1.20x | ≤ 1.15x |" in text
    assert "| 64 | 4 | 2 | 8 | 1.0 | 1.30x | 1.25x | 1.05x | 1.10x | 1.20x | 1.15x |" in text and "20.0 GB/s" in text
    assert "hf_switch time / ours | 1.50x" in text and "deepspeed | skipped: not installed" in text
    assert "dense FFN of its shape, in the same round-robin: hf_switch 1.80x and ours 1.20x." in text
    assert json.loads(js.read_text()) == {"moe_vs_dense_e16": 1.2, "moe_vs_dense_e64": 1.4, "samoe_vs_moe": 1.1,
                                          "samoe_vs_moe_peak_mem": 0.5, "samoe_vs_moe_peak_mem_b1": 0.5,
                                          "peer_hf_switch_vs_ours": 1.5, "hf_switch_vs_dense": 1.8,
                                          "ours_for_hf_switch_vs_dense": 1.2,
                                          "training_shapes": fake["training_shapes"]}


def test_samoe_is_timed_on_the_moes_routing():
    """(b) and (h) compare SaMoE with the MoE on identical routing (route_alike), so that both
    take the same expert layout and the ratio is the pool's combination alone."""
    torch.manual_seed(0)
    shape = Shape(tokens=64, d_model=8, hidden=16)
    moe, samoe = layers.moe_model(shape, 4), layers.moe_model(shape, 4, "pool")
    x = torch.randn(64, 8)
    assert not torch.equal(moe.moe_layers()[0].router(x).expert, samoe.moe_layers()[0].router(x).expert)
    layers.route_alike(samoe, moe)
    assert torch.equal(moe.moe_layers()[0].router(x).expert, samoe.moe_layers()[0].router(x).expert)


def test_training_throughput_runs_at_the_threads_asked_and_restores_them(monkeypatch):
    seen = []

    def timed(fns, repeats, **kw):
        seen.append(torch.get_num_threads())
        return interleaved_medians(fns, repeats, **kw)

    monkeypatch.setattr(training, "interleaved_medians", timed)
    before = torch.get_num_threads()
    r = training.training_throughput("tiny", repeats=1, threads=1)
    assert seen == [1] and torch.get_num_threads() == before
    assert {f"tiny_1t_{v}_vs_dense_tokens_per_s" for v in ("moe", "samoe")} <= r.keys()
    assert all(r[f"tiny_1t_{v}_tokens_per_s"] > 0 for v in ("moe", "samoe", "dense"))


def test_the_report_says_how_busy_the_machine_was_and_which_peers_it_had():
    said = suite.conditions()
    assert said.startswith("load average ") and " at the start; transformers " in said
    version = importlib.util.find_spec("deepspeed") is not None
    assert ("deepspeed not installed" in said) != version


def test_bench_prints_its_report_and_writes_only_where_asked(tmp_path, monkeypatch, capsys):
    """`samoe bench` prints the Markdown report and writes no file of its own accord (the checkout
    stays as it was); --out FILE and --json FILE write there. The suite itself is replaced by a
    fixed result so that only the verb's wiring is tested."""
    fake = {"machine": "test", "training_shapes": {}}
    monkeypatch.setattr(suite, "run_suite", lambda quick, repeats: dict(fake))
    monkeypatch.setattr(suite, "markdown", lambda r, command: f"# Benchmarks\n\n{command}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 0
    assert "# Benchmarks" in capsys.readouterr().out and list(tmp_path.iterdir()) == []
    assert main(["bench", "--quick", "--out", "b.md", "--json", "b.json"]) == 0
    assert (tmp_path / "b.md").read_text() == "# Benchmarks\n\nsamoe bench --quick\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"training_shapes": {}}
