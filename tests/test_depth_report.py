"""The share of the MoE's gain with its interval (samoe.study.share), groups named by a prefix,
and the depth study's report sections (samoe.study.depth)."""

import gzip
import json
import math

import pytest

from helpers import make_study_run
from samoe.errors import UserError
from samoe.study import report, speeds
from samoe.study.depth import _dodged, format_per_second, welch_interval
from samoe.study.share import format_interval, share_of_gain


def test_share_of_gain_interval_equals_a_case_computed_by_hand():
    # dense 3.0 3.1 3.2 (mean 3.1, s² 0.01), MoE 2.8 2.9 3.0 (2.9, 0.01), arm 2.95 3.05 (3.0, 0.005)
    # A = 0.1, B = 0.2, R = 0.5
    # w = ((1 - R)² s_d²/n_d, s_a²/n_a, R² s_m²/n_m) = (0.25 · 0.01/3, 0.005/2, 0.25 · 0.01/3)
    #   = (0.000833.., 0.0025, 0.000833..), Σw = 0.0041666..
    # se = sqrt(Σw) / B = 0.0645497 / 0.2 = 0.3227486
    # df = (Σw)² / (w1²/2 + w2²/1 + w3²/2) = 1.7361e-5 / 6.9444e-6 = 2.5
    s = share_of_gain([3.0, 3.1, 3.2], [2.8, 2.9, 3.0], [2.95, 3.05])
    assert s["keeps"] == pytest.approx(0.5)
    assert s["se"] == pytest.approx(0.3227486, abs=1e-6)
    assert s["df"] == pytest.approx(2.5, abs=1e-9)
    assert s["low"] < 0 < 1 < s["high"]
    # the same with an arm whose seeds agree: w = (0.000833.., 0, 0.000833..), Σw = 0.0016666..
    # se = 0.0408248 / 0.2 = 0.2041241, df = (Σw)² / (2 · w1² / 2) = 4, t(0.975, 4) = 2.776445 (tables: 2.776)
    # half-width 0.566739: the interval -0.066739 to 1.066739
    s = share_of_gain([3.0, 3.1, 3.2], [2.8, 2.9, 3.0], [3.0, 3.0, 3.0])
    assert s["keeps"] == pytest.approx(0.5)
    assert s["se"] == pytest.approx(0.2041241, abs=1e-6) and s["df"] == pytest.approx(4.0)
    assert s["low"] == pytest.approx(-0.066739, abs=1e-5) and s["high"] == pytest.approx(1.066739, abs=1e-5)
    assert "holds zero" in format_interval(s)


def test_share_of_gain_without_spread_or_without_an_moe_gain():
    one_seed = share_of_gain([3.0, 3.1], [2.8, 2.9], [2.9])
    assert one_seed["keeps"] == pytest.approx((3.05 - 2.9) / 0.2) and math.isnan(one_seed["low"])
    assert "one seed" in format_interval(one_seed)
    no_gain = share_of_gain([3.0, 3.1], [3.1, 3.2], [2.9, 3.0])
    assert math.isnan(no_gain["keeps"])
    tight = share_of_gain([3.0, 3.0001], [2.8, 2.8001], [2.85, 2.8501])
    assert tight["low"] == pytest.approx(0.75, abs=5e-3) and "holds zero" not in format_interval(tight)


def _depth_study(root):
    """Two depth groups (L1-, L2-), each with dense, moe and samoe-k*; pool coefficients faked."""
    spec = {"L1-dense": (["model.moe.enabled=false"], [3.2, 3.3]),
            "L1-moe": (["model.moe.sharing=private"], [3.0, 3.1]),
            "L1-samoe-k2": ([], [3.1, 3.15]),
            "L2-dense": (["model.moe.enabled=false", "model.n_layers=4"], [3.0, 3.1, 3.05]),
            "L2-moe": (["model.moe.sharing=private", "model.n_layers=4"], [2.7, 2.8, 2.75]),
            "L2-samoe-k2": (["model.n_layers=4"], [2.8, 2.85, 2.9]),
            "L2-samoe-k1": (["model.n_layers=4", "model.moe.pool.size=1"], [2.95, 3.0]),
            "L2-tying": (["model.n_layers=4", "model.moe.pool.init=sequence", "model.moe.pool.freeze=true"],
                         [2.82, 2.90, 2.90])}
    for arm, (overrides, losses) in spec.items():
        for seed, loss in enumerate(losses, 1):
            run = make_study_run(root / arm / f"seed{seed}", loss, overrides, seed=seed)
            if "samoe" in arm:
                summary = json.loads((run / "summary.json").read_text())
                n_layers = 4 if arm.startswith("L2") else 2
                K = 1 if arm.endswith("k1") else 2
                summary["pool_coefficients"] = [[1.0] if K == 1 else [0.5, 0.5] if l == 0 else [0.9, 0.1]
                                                for l in range(n_layers)]
                (run / "summary.json").write_text(json.dumps(summary))
    return root


def test_depth_groups_compare_each_arm_with_its_own_depths_dense_and_moe(tmp_path):
    path, rows = report.write_report(_depth_study(tmp_path / "depth"))
    by_arm = {r["arm"]: r for r in rows}
    k2 = by_arm["L2-samoe-k2"]
    assert k2["group"] == "L2" and k2["method"] == "samoe-k2"
    want = share_of_gain([3.0, 3.1, 3.05], [2.7, 2.8, 2.75], [2.8, 2.85, 2.9])
    assert k2["keeps_moe_gain"] == pytest.approx(want["keeps"]) == pytest.approx((3.05 - 2.85) / 0.3)
    assert k2["keeps_low"] == pytest.approx(want["low"]) and k2["keeps_high"] == pytest.approx(want["high"])
    assert by_arm["L1-samoe-k2"]["keeps_moe_gain"] == pytest.approx((3.25 - 3.125) / 0.2)  # L1's dense and MoE
    assert k2["moe_params_ratio"] == pytest.approx(by_arm["L2-moe"]["total_params"] / k2["total_params"])
    text = path.read_text()
    assert "**L2-samoe-k2** keeps 67% of the standard MoE's val-loss gain over dense" in text
    assert (tmp_path / "depth" / "frontier.png").is_file() and "![frontier](frontier.png)" in text
    # per second: the fake runs log 1,000 tokens/s and evaluate every 2 steps, so every run ends at the
    # same second, and there the shares equal the per-step ones
    assert k2["per_second"]["keeps"] == pytest.approx(k2["keeps_moe_gain"])
    want_low, want_high = welch_interval([3.0, 3.1, 3.05], [2.7, 2.8, 2.75])
    assert (k2["per_second"]["moe_gain_low"], k2["per_second"]["moe_gain_high"]) == \
        (pytest.approx(want_low), pytest.approx(want_high))
    # pool use: layer 0 uniform over K = 2 (ln 2), the others 0.9 / 0.1; load the mean over layers
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert f"| L2-samoe-k2 | 3 | 2 (ln K = 0.69) | 0.69 {h:.2f} {h:.2f} {h:.2f} | {(0.5 + 3 * 0.9) / 4:.2f} " \
           f"{(0.5 + 3 * 0.1) / 4:.2f} |" in text


def test_welch_interval_equals_a_case_computed_by_hand():
    # x 3.0 3.1 3.2, y 2.8 2.9 3.0: difference 0.2, s²/n = 0.01/3 each, se = sqrt(0.0066667) = 0.0816497
    # df = (0.0066667)² / (2 · 0.0033333² / 2) = 4, t(0.975, 4) = 2.776445: half-width 0.226697
    low, high = welch_interval([3.0, 3.1, 3.2], [2.8, 2.9, 3.0])
    assert low == pytest.approx(0.2 - 0.226697, abs=1e-5) and high == pytest.approx(0.2 + 0.226697, abs=1e-5)
    assert all(math.isnan(v) for v in welch_interval([3.0], [2.8, 2.9]))


def test_frontier_spreads_arms_at_nearly_equal_parameters_and_leaves_lone_ones_where_they_are():
    rows = [{"arm": a, "moe_params_ratio": r} for a, r in
            [("k4", 2.38), ("k2", 3.63), ("tying", 3.63), ("pool", 3.55), ("narrow", 3.65), ("k1", 4.93)]]
    x = _dodged(rows)
    assert x["k4"] == 2.38 and x["k1"] == 4.93  # alone: exact
    crowd = sorted(x[a] for a in ("k2", "tying", "pool", "narrow"))
    gaps = [math.log(b / a) for a, b in zip(crowd, crowd[1:])]
    assert gaps == pytest.approx([0.012] * 3)  # one step apart in log space
    assert math.log(crowd[0] * crowd[-1]) / 2 == pytest.approx(math.log((3.63 + 3.63 + 3.55 + 3.65) / 4))


def test_per_second_share_is_withheld_where_the_moes_own_gain_holds_zero():
    row = {"arm": "L4-samoe-k2", "seconds": 203.0, "keeps": -18.5, "low": -551.7, "high": 514.6, "gain": -0.0292,
           "moe_gain": 0.0016, "moe_gain_low": -0.0410, "moe_gain_high": 0.0441}
    text = format_per_second([row, dict(row, arm="L12-samoe-k2", keeps=0.5, low=0.2, high=0.8, moe_gain_low=0.01)])
    l4, l12 = text.splitlines()[2:]
    assert "| n/a | the MoE's own gain over dense holds zero at this time |" in l4 and "-1850%" not in l4
    assert "| 50% | 95% interval 20 to 80% |" in l12


def test_equal_parameter_rivals_are_paired_with_samoe_k2_by_seed(tmp_path):
    """The decision rule: L2-tying stores what L2-samoe-k2 stores and is compared with it seed by
    seed; K = 1 stores less and is left out."""
    path, rows = report.write_report(_depth_study(tmp_path / "depth"))
    tying = next(r for r in rows if r["arm"] == "L2-tying")["against_reference"]
    # d = tying - k2 by seed: (2.82 - 2.80, 2.90 - 2.85, 2.90 - 2.90) = (0.02, 0.05, 0.00)
    # mean 0.07 / 3 = 0.023333, s_d² = ((-0.003333)² + 0.026667² + (-0.023333)²) / 2 = 0.0006333
    # s_d = 0.025166, half = t(0.975, 2) · s_d / √3 = 4.302653 · 0.014530 = 0.062517
    assert tying["reference"] == "L2-samoe-k2" and tying["seeds"] == 3
    assert tying["diff"] == pytest.approx(0.023333, abs=1e-6)
    assert tying["low"] == pytest.approx(0.023333 - 0.062517, abs=1e-5)
    assert tying["high"] == pytest.approx(0.023333 + 0.062517, abs=1e-5)
    # in shares of L2's MoE gain (3.05 - 2.75 = 0.3): -0.023333 / 0.3 = -7.8 points
    assert tying["share_diff"] == pytest.approx(-0.077778, abs=1e-5)
    text = path.read_text()
    assert "| L2-tying | L2-samoe-k2 |" in text and "not distinguishable" in text
    assert "L2-samoe-k1 | L2-samoe-k2" not in text and "L1-" not in text.split("at its parameters")[1].split("##")[0]


def test_each_arm_keeps_the_latest_speed_that_timed_it_and_a_date_redraws_an_old_one(tmp_path):
    """Speed measurements are kept one a date: an arm timed only by the older one keeps its speed
    when a newer one times other arms; --speed WHEN puts every arm on that measurement."""
    root = tmp_path / "study"
    for arm, loss in (("dense", 3.2), ("moe", 3.0)):
        make_study_run(root / arm / "seed1", loss, ["model.moe.enabled=false"] if arm == "dense" else [], seed=1)
    old = {"measured": "2026-12-02 08:39", "threads": 2, "repeats": 21, "tokens_per_s": {"dense": 1000.0, "moe": 500.0}}
    new = {"measured": "2026-12-03 08:09", "threads": 2, "repeats": 21, "tokens_per_s": {"moe": 400.0}}
    speeds.write_measurement(root, old)
    speeds.write_measurement(root, new)
    assert sorted(p.name for p in (root / "speed").iterdir()) == ["2026-12-02-0839.json", "2026-12-03-0809.json"]
    _, rows = report.write_report(root)
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["dense"]["tokens_per_s"] == 1000.0 and by_arm["moe"]["tokens_per_s"] == 400.0
    _, rows = report.write_report(root, speed="2026-12-02")
    assert {r["arm"]: r["tokens_per_s"] for r in rows} == {"dense": 1000.0, "moe": 500.0}
    with pytest.raises(UserError, match="2026-11"):
        report.write_report(root, speed="2026-11")


def test_a_finished_runs_gzipped_metrics_read_as_the_plain_ones(tmp_path):
    """results/ keeps finished runs' metrics.jsonl gzipped; the report reads them alike."""
    root = _depth_study(tmp_path / "depth")
    _, plain = report.write_report(root)
    for f in root.rglob("metrics.jsonl"):
        f.with_name("metrics.jsonl.gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    _, packed = report.write_report(root)
    assert packed == plain
