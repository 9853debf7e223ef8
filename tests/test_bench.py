"""The benchmark suite's machinery at toy sizes: it measures what it says and reports every
ratio under its stable name (the speeds themselves are never asserted)."""

import json

from samoe.bench import suite
from samoe.bench.layers import Shape, layer_ratios
from samoe.bench.timing import interleaved_medians, peak_rss_mib, run_isolated


def test_interleaved_medians_runs_each_case_warmup_plus_repeats_times():
    calls = {"a": 0, "b": 0}

    def bump(name):
        def fn():
            calls[name] += 1
        return fn

    t = interleaved_medians({"a": bump("a"), "b": bump("b")}, repeats=3, warmup=2)
    assert calls == {"a": 5, "b": 5} and set(t) == {"a", "b"} and all(v >= 0 for v in t.values())


def test_layer_ratios_have_stable_names():
    r = layer_ratios(Shape(tokens=64, d_model=8, hidden=16), experts=(4, 8), repeats=1)
    assert {"moe_vs_dense_e4", "moe_vs_dense_e8", "samoe_vs_moe"} <= set(r)
    assert r["moe_vs_dense_e4"] == r["time_moe_e4"] / r["time_dense"]


def test_peer_comparison_reports_each_peer_or_why_it_was_skipped():
    r = run_isolated("samoe.bench.peers", "32", "8", "16", "4", "1")  # a process of its own, as the suite runs it
    for name in ("hf_switch", "hf_mixtral", "deepspeed"):
        assert f"peer_{name}_vs_ours" in r or name in r["skipped"]


def test_peak_memory_worker_reports_its_own_peak():
    assert peak_rss_mib() > 0
    out = run_isolated("samoe.bench.memory", "moe", "1")
    assert out["peak_mib"] > 10  # two training steps of a 12-layer model allocate real memory


def test_markdown_and_json_report(tmp_path, monkeypatch):
    fake = {"machine": "m", "quick": True, "tokens": 64, "repeats": 1, "moe_vs_dense_e16": 1.2,
            "moe_vs_dense_e64": 1.4, "samoe_vs_moe": 1.1, "samoe_vs_moe_peak_mem": 0.5,
            "samoe_vs_moe_peak_mem_b1": 0.5, "samoe_step_peak_mib_b1": 50.0, "moe_step_peak_mib_b1": 100.0,
            "peer_hf_switch_vs_ours": 1.5, "skipped": {"deepspeed": "not installed (deepspeed)"},
            "tiny_samoe_tokens_per_s": 1.0, "tiny_moe_tokens_per_s": 2.0, "tiny_dense_tokens_per_s": 3.0,
            "scaling": [{"tokens": 64, "experts": 4, "moe_vs_dense": 1.3, "samoe_vs_moe": 1.1, "dense_ms": 1.0}]}
    monkeypatch.setattr(suite, "run_suite", lambda quick, repeats: fake)
    doc, js = tmp_path / "b.md", tmp_path / "b.json"
    suite.main(True, 1, str(js), str(doc), "samoe bench --quick")
    text = doc.read_text()
    assert "`samoe bench --quick`" in text and "| (a) MoE top-1 (dropless) vs dense FFN, E = 16 | 1.20x |" in text
    assert "hf_switch time / ours | 1.50x" in text and "deepspeed | skipped: not installed" in text
    assert json.loads(js.read_text()) == {"moe_vs_dense_e16": 1.2, "moe_vs_dense_e64": 1.4, "samoe_vs_moe": 1.1,
                                          "samoe_vs_moe_peak_mem": 0.5, "peer_hf_switch_vs_ours": 1.5}
