"""`samoe study run` and `samoe study report`: a grid of ordinary runs, skipped when finished,
resumed when partial, and one report whose numbers are the runs' own."""

import contextlib
import io
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_user_error, make_study_run, run_cli
from samoe.cli import main
from samoe.config_load import load_config
from samoe.data.options import PrepareOptions
from samoe.data.pipeline import prepare_dataset
from samoe.data.shards import read_meta
from samoe.errors import ConfigError
from samoe.study import against_dense, diversity, grid, report, runs_table, zeroshot

WORDS = "the cat sat on a mat while dogs ran past quick brown foxes and lazy birds sang".split()


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80))) + "." for _ in range(60)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _study(tmp_path: Path, steps: int = 4, arms: str | None = None) -> Path:
    corpus = _corpus(tmp_path / "corpus.txt")
    arms = arms or ("  dense: [model.moe.enabled=false]\n"
                    "  moe:\n    overrides: [model.moe.sharing=private]\n    seeds: [5]\n")
    path = tmp_path / "study.yaml"
    path.write_text(f"preset: tiny\nsteps: {steps}\nseeds: [1, 2]\n"
                    f"corpora:\n  small: [data.path={corpus}, data.tokenizer=byte, train.batch_size=4, "
                    f"train.eval_every=2, train.ckpt_every=2, train.log_every=1, train.eval_tokens=256]\n"
                    f"arms:\n{arms}")
    return path


def _run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def test_the_grid_is_arms_by_corpora_by_seeds_in_file_order(tmp_path):
    cells = grid.load_study(_study(tmp_path), tmp_path / "out")
    assert [c.name for c in cells] == ["small/dense/seed1", "small/dense/seed2", "small/moe/seed5"]
    assert cells[0].run_dir == tmp_path / "out" / "small" / "dense" / "seed1"
    assert cells[2].cfg.model.moe.sharing == "private" and cells[2].cfg.train.seed == 5
    assert all(c.cfg.train.max_steps == 4 and c.cfg.data.tokenizer == "byte" for c in cells)
    assert cells[0].tokens == 4 * 4 * 64
    assert all(c.state() == "new" for c in cells)


@pytest.mark.parametrize("text,named", [
    ("arms: {}\n", "arms"),
    ("arms: {a: [model.moe.num_expert=3]}\n", "arms.a"),
    ("arms: {a: [model.moe.enabled=false]}\nseeds: [x]\n", "seeds"),
    ("arms: {a: {overrides: [], seedz: [1]}}\n", "seedz"),
    ("arms: {a: []}\nstep: 3\n", "step"),
    ("arms: {a: []}\nseeds: [0, 1]\n", "seeds"),
    ("arms: {a: []}\npreset: nope\n", "arms.a: unknown preset 'nope'"),
])
def test_a_bad_study_file_is_one_error_naming_the_key(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        grid.load_study(path, tmp_path / "out")


def test_run_skips_finished_runs_resumes_partial_ones_and_reports(tmp_path):
    study = _study(tmp_path)
    out = tmp_path / "out"
    code, _, err = _run("study", "run", study, "--out", out, "--jobs", "2", "--progress-every", "0s")
    assert code == 0, err
    assert "0 of 3 runs done; 3 to run" in err and "[3/3]" in err and "grid ETA" in err
    assert "in flight: small/dense/seed1 " in err  # every second, with --progress-every 0s
    first = {c.name: (c.run_dir / "metrics.jsonl").read_text() for c in grid.load_study(study, out)}

    code, _, err = _run("study", "run", study, "--out", out)  # nothing left to do
    assert code == 0 and "3 of 3 runs done; 0 to run" in err

    longer = _study(tmp_path, steps=6)  # the same grid, trained further: every run is resumed
    cells = grid.load_study(longer, out)
    assert [c.state() for c in cells] == ["partial"] * 3
    assert "--resume" in grid.train_command(cells[0])
    code, _, err = _run("study", "run", longer, "--out", out, "--only", "moe")
    assert code == 0, err
    assert [c.state() for c in grid.load_study(longer, out)] == ["partial", "partial", "done"]
    moe = grid.load_study(longer, out)[2]
    rows = [json.loads(line) for line in (moe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (moe.run_dir / "metrics.jsonl").read_text().startswith(first["small/moe/seed5"])

    path, table = report.write_report(out)
    assert path == out / "report.md" and (out / "report.json").is_file()
    for name in ("loss-tokens", "loss-seconds", "loss-params"):
        assert (out / f"{name}.png").stat().st_size > 1000
    by_arm = {r["arm"]: r for r in table}
    assert set(by_arm) == {"small/dense", "small/moe"}
    dense_losses = [json.loads((c.run_dir / "summary.json").read_text())["val_loss"]
                    for c in grid.load_study(study, out)[:2]]
    assert by_arm["small/dense"]["seeds"] == 2
    assert by_arm["small/dense"]["val_loss"] == pytest.approx(statistics.mean(dense_losses))
    assert by_arm["small/dense"]["val_loss_std"] == pytest.approx(statistics.stdev(dense_losses))
    assert by_arm["small/moe"]["seeds"] == 1 and by_arm["small/moe"]["steps"] == 6
    assert by_arm["small/moe"]["total_params"] > by_arm["small/dense"]["total_params"]
    assert "| small/dense | 2 |" in path.read_text() and "At equal training time" in path.read_text()


def test_time_limit_starts_only_the_runs_their_arms_logged_speed_says_will_finish(tmp_path):
    """--time-limit: dense's seed 2 is priced by seed 1's logged tokens/s (1,000: make_study_run)
    at its 4 x 4 x 64 tokens, plus evaluation, just over a second, so a one-second limit does
    not start it; moe has no run logged yet, so nothing prices it and it trains."""
    study = _study(tmp_path)
    out = tmp_path / "out"
    make_study_run(out / "small" / "dense" / "seed1", 3.0)
    cells = {c.name: c for c in grid.load_study(study, out)}
    assert grid.seconds_left(cells["small/dense/seed2"]) == pytest.approx(4 * 4 * 64 / 1000 * grid.EVAL_OVERHEAD)
    assert grid.seconds_left(cells["small/moe/seed5"]) is None
    code, _, err = _run("study", "run", study, "--out", out, "--time-limit", "1s")
    assert code == 0, err
    assert "small/dense/seed2: not started: needs about 0m01s" in err
    assert "1 run(s) not started within --time-limit: small/dense/seed2" in err
    assert not (out / "small" / "dense" / "seed2").exists()
    assert cells["small/moe/seed5"].state() == "done"


def test_progress_line_gives_each_run_in_flight_its_step_speed_and_time_left(tmp_path):
    cells = {c.name: c for c in grid.load_study(_study(tmp_path, steps=100), tmp_path / "out")}
    dense, moe = cells["small/dense/seed1"], cells["small/moe/seed5"]
    dense.run_dir.mkdir(parents=True)
    tokens_per_step = dense.cfg.train.batch_size * dense.cfg.model.block_size
    rows = [{"step": s, "tokens": s * tokens_per_step, "loss": 5.0, "tokens_per_s": 1000.0 + s} for s in (10, 20)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "tok'  # caught mid-write
    (dense.run_dir / "metrics.jsonl").write_text(text)
    left = (100 - 20) * tokens_per_step / 1020.0
    assert grid.in_flight_line([dense, moe]) == (
        f"in flight: small/dense/seed1 step 20/100 (20%), 1.0k tokens/s, {grid.format_seconds(left)} left; "
        "small/moe/seed5 starting")


@pytest.mark.parametrize("text,seconds", [("2h30m", 9000), ("90m", 5400), ("1.5h", 5400), ("45s", 45),
                                          ("1h0m30s", 3630)])
def test_durations_are_hours_minutes_seconds(text, seconds):
    assert grid.parse_duration(text) == seconds


def test_a_bad_time_limit_is_one_line_and_exit_2_before_any_run(tmp_path):
    assert_user_error(_run("study", "run", _study(tmp_path), "--out", tmp_path / "out", "--time-limit", "soon"),
                      "--time-limit", "soon")
    assert_user_error(_run("study", "run", _study(tmp_path), "--out", tmp_path / "out", "--progress-every", "5 min"),
                      "--progress-every", "5 min")
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_grid_and_trains_nothing(tmp_path):
    code, out, err = _run("study", "run", _study(tmp_path), "--out", tmp_path / "out", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 5 and "small/moe/seed5" in lines[3] and "new" in lines[3]
    assert lines[4].startswith("estimated time left:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,named", [
    (["--only", "nope"], "'nope'"),
    (["--jobs", "0"], "--jobs"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, argv, named):
    code, out, err = _run("study", "run", _study(tmp_path), "--out", tmp_path / "out", *argv)
    assert code == 2 and len(err.splitlines()) == 1 and named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_report_of_a_directory_without_runs_is_a_user_error(tmp_path):
    code, _, err = _run("study", "report", tmp_path)
    assert code == 2 and "no finished runs" in err


STUDIES = sorted((Path(__file__).parents[1] / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_study_files_are_valid(path, tmp_path):
    """Every study in studies/ names presets and overrides that load and validate."""
    cells = grid.load_study(path, tmp_path / "out")
    assert cells and len({c.name for c in cells}) == len(cells)


def test_quick_study_is_a_small_fraction_of_one_default_run(tmp_path):
    """quick.yaml is meant for minutes: its whole grid costs under a quarter of the training
    FLOPs of one `default` run (FLOPs, not seconds: tests do not time things)."""
    cells = grid.load_study(Path(__file__).parents[1] / "studies" / "quick.yaml", tmp_path / "out")
    assert {c.preset for c in cells} == {"tiny"}
    default = grid.Cell("x", 1, None, "default", [], tmp_path, load_config(preset="default"))
    assert sum(grid.describe(c)["train_flops"] for c in cells) < 0.25 * grid.describe(default)["train_flops"]


# --------------------------------------------------------------------------- zero-shot scores of the best arms

TASK = [{"context": "The cat sat on the", "choices": ["mat", "quick brown fox"], "label": 0},
        {"context": "Dogs ran past", "choices": ["the birds", "a", "lazy foxes sang"], "label": 2},
        {"context": "A lazy bird", "choices": ["sang", "sat on a mat"], "label": 1},
        {"context": "Quick brown", "choices": ["foxes", "cats"], "label": 0}]


def _task_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in TASK), encoding="utf-8")
    return path


def _fake_arms(root: Path, spec: dict[str, tuple[list[str], list[float]]]) -> Path:
    """Finished runs root/ARM/seed{i} with the given overrides and one val loss per seed."""
    for arm, (overrides, losses) in spec.items():
        for seed, loss in enumerate(losses, 1):
            make_study_run(root / arm / f"seed{seed}", loss, overrides, seed=seed)
    return root


def test_report_says_what_share_of_the_moe_gain_over_dense_each_arm_keeps(tmp_path):
    """The headline sentence per arm: (L_dense - L_arm) / (L_dense - L_moe) and P_moe / P_arm,
    with each gain's standard error; per corpus; none for a corpus without a dense arm."""
    out = tmp_path / "out"
    _fake_arms(out / "a", {"dense": (["model.moe.enabled=false"], [3.0, 3.1]),
                           "moe": (["model.moe.sharing=private", "model.moe.pool.size=1"], [2.8, 2.9]),
                           "samoe-k1": (["model.moe.pool.size=1"], [2.9, 2.95, 2.85]),
                           "wide-dense": (["model.moe.enabled=false", "model.ffn_hidden=1024"], [3.1])})
    _fake_arms(out / "b", {"moe": (["model.moe.sharing=private"], [2.0]), "samoe-k1": ([], [2.1])})
    path, rows = report.write_report(out)
    by_arm = {r["arm"]: r for r in rows}
    k1 = by_arm["a/samoe-k1"]
    assert k1["keeps_moe_gain"] == pytest.approx((3.05 - 2.9) / (3.05 - 2.85))
    assert k1["gain_over_dense_se"] == pytest.approx(math.sqrt(statistics.stdev([3.0, 3.1]) ** 2 / 2
                                                               + statistics.stdev([2.9, 2.95, 2.85]) ** 2 / 3))
    assert k1["moe_params_ratio"] == pytest.approx(by_arm["a/moe"]["total_params"] / k1["total_params"])
    assert k1["moe_params_ratio"] > 1.5  # a pool of one expert layer for the tiny preset's two MoE layers
    assert by_arm["a/wide-dense"]["keeps_moe_gain"] == pytest.approx((3.05 - 3.1) / 0.2)  # worse than dense: < 0
    assert "keeps_moe_gain" not in by_arm["b/samoe-k1"] and "keeps_moe_gain" not in by_arm["a/moe"]
    text = path.read_text()
    assert (f"**a/samoe-k1** keeps 75% of the standard MoE's val-loss gain over dense with "
            f"{k1['moe_params_ratio']:.2f}x fewer total parameters than the MoE") in text
    assert "**a/wide-dense** keeps -25%" in text and "the MoE's total parameters" in text


def _whole_split(run_dir: Path, loss: float) -> None:
    (run_dir / "eval-full.json").write_text(json.dumps({"val_loss": loss, "val_tokens": 1000, "steps": 4}))


def test_report_compares_every_arm_with_dense_seed_by_seed_on_the_whole_split(tmp_path):
    """Δ = mean(L_A) - mean(L_dense), Δ per shared seed, wins, the margin in the larger seed sd and
    Welch's t, from the whole split's losses where every run of both arms has one, else from
    training's last evaluation; the headline sentence follows the same rule."""
    out = tmp_path / "out"
    _fake_arms(out, {"dense": (["model.moe.enabled=false"], [3.0, 3.0, 3.0]),
                     "moe": (["model.moe.sharing=private"], [2.9, 2.9, 2.9]),
                     "samoe": ([], [2.95, 2.95]),
                     "half-scored": ([], [2.0, 2.0])})
    whole = {"dense": [3.10, 3.20, 3.30], "moe": [3.00, 3.05, 3.25], "samoe": [3.04, 3.16]}
    for arm, losses in whole.items():
        for seed, loss in enumerate(losses, 1):
            _whole_split(out / arm / f"seed{seed}", loss)
    _whole_split(out / "half-scored" / "seed1", 1.0)  # seed2 unscored: the arm compares on training's numbers
    path, rows = report.write_report(out)
    by_arm = {r["arm"]: r for r in rows}
    moe = by_arm["moe"]["vs_dense"]
    assert moe["loss_source"] == runs_table.WHOLE_SPLIT
    assert moe["delta"] == pytest.approx(statistics.mean(whole["moe"]) - 3.2)
    assert moe["delta_by_seed"] == pytest.approx({"seed1": -0.10, "seed2": -0.15, "seed3": -0.05})
    assert moe["wins"] == 3
    larger_sd = max(statistics.stdev(whole["moe"]), statistics.stdev(whole["dense"]))
    assert moe["margin_in_sd"] == pytest.approx(-moe["delta"] / larger_sd)
    assert moe["welch_t"] == pytest.approx(-moe["delta"] / math.sqrt(statistics.variance(whole["moe"]) / 3
                                                                    + statistics.variance(whole["dense"]) / 3))
    samoe = by_arm["samoe"]["vs_dense"]
    assert samoe["delta_by_seed"] == pytest.approx({"seed1": -0.06, "seed2": -0.04})  # only its two seeds
    assert samoe["delta"] == pytest.approx(3.10 - 3.20) and samoe["wins"] == 2
    half = by_arm["half-scored"]["vs_dense"]
    assert half["loss_source"] == runs_table.IN_TRAINING and half["delta"] == pytest.approx(-1.0)
    assert by_arm["dense"]["val_loss_whole_split"] == pytest.approx(3.2)
    assert math.isnan(by_arm["half-scored"]["val_loss_whole_split"])
    assert by_arm["samoe"]["keeps_moe_gain"] == pytest.approx((3.2 - 3.10) / (3.2 - statistics.mean(whole["moe"])))
    assert by_arm["half-scored"]["loss_source"] == runs_table.IN_TRAINING
    text = path.read_text()
    assert "## Against dense, seed by seed" in text
    assert ("| moe | 3 | 3.1000 ± 0.1323 | 3.2000 ± 0.1000 | -0.1000 | 1: -0.100, 2: -0.150, 3: -0.050 "
            "| 3 of 3 |") in text
    # the gap by tokens, from the in-training curves (make_study_run: val loss + 0.1 per step before the end)
    [(corpus, others, gaps)] = against_dense.gap_by_tokens(report.collect(out))
    assert corpus is None and others == ["half-scored", "moe", "samoe"]
    assert [(t, d) for t, d, _ in gaps] == [(512, pytest.approx(3.2)), (1024, pytest.approx(3.0))]
    assert gaps[1][2] == pytest.approx([-1.0, -0.1, -0.05])
    assert "| 1,024 | 3.0000 | -1.0000 | -0.1000 | -0.0500 |" in text


def test_study_eval_scores_each_finished_run_on_its_whole_split_once(tmp_path):
    """`samoe study eval DIR` writes RUN/eval-full.json = `samoe eval RUN --max-tokens 0` for every
    finished run, skips the runs that have one for their last step, and scores a run again
    once it has trained further."""
    corpus = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    runs = [make_study_run(out / arm / "seed1", 3.0, [f"data.path={corpus}", "train.eval_tokens=128"], seed=i)
            for i, arm in enumerate(("dense", "moe"))]
    code, _, err = _run("study", "eval", out)
    assert code == 0, err
    assert "0 of 2 finished runs already scored" in err and "[2/2]" in err
    for run in runs:
        written = json.loads((run / "eval-full.json").read_text())
        code, printed, err = _run("eval", run, "--max-tokens", "0", "--json")
        assert code == 0, err
        assert written == {**json.loads(printed), "steps": 4}
        assert written["val_tokens"] > 128  # the whole split, not the run's eval_tokens
    before = (runs[0] / "eval-full.json").stat().st_mtime_ns
    code, _, err = _run("study", "eval", out)
    assert code == 0 and "2 of 2 finished runs already scored" in err
    assert (runs[0] / "eval-full.json").stat().st_mtime_ns == before
    summary = json.loads((runs[1] / "summary.json").read_text())
    (runs[1] / "summary.json").write_text(json.dumps({**summary, "steps": 6}))  # trained further since
    code, _, err = _run("study", "eval", out)
    assert code == 0 and "1 of 2 finished runs already scored" in err
    assert json.loads((runs[1] / "eval-full.json").read_text())["steps"] == 6
    assert_user_error(_run("study", "eval", tmp_path / "nowhere"), "nowhere")


def test_best_arms_are_the_three_lowest_losses_then_the_dense_ones_at_most_five():
    def arm(name, loss):
        return runs_table.Arm(name, [runs_table.RunRecord(Path(name), {"val_loss": loss}, [], 1.0)])

    arms = [arm("x/dense-big", 1.6), arm("x/a", 1.0), arm("x/dense", 1.5), arm("x/b", 0.9), arm("x/c", 1.1),
            arm("x/d", 1.2), arm("x/dense-3", 1.7), arm("x/nan", math.nan)]
    assert [a.name for a in zeroshot.best_arms(arms)] == ["x/b", "x/a", "x/c", "x/dense", "x/dense-big"]
    assert [a.name for a in zeroshot.best_arms(arms[:2])] == ["x/a", "x/dense-big"]


def test_report_scores_the_best_arms_zero_shot_every_seed_and_caches_the_scores(tmp_path, monkeypatch):
    out = _fake_arms(tmp_path / "out", {
        "moe": (["model.moe.sharing=private"], [0.9, 0.95]),
        "samoe-k2": ([], [1.0, 1.05]),
        "samoe-k1": (["model.moe.pool.size=1"], [1.1, 1.12]),
        "worse": ([], [1.2]),
        "dense": (["model.moe.enabled=false"], [1.5, 1.4]),
    })
    task = _task_file(tmp_path / "mini.jsonl")
    code, _, err = run_cli("study", "report", out, "--task", task, "--limit", 3)
    assert code == 0, err
    rows = {r["arm"]: r for r in json.loads((out / "report.json").read_text())}
    assert "zeroshot" not in rows["worse"] and not list((out / "worse").rglob("zeroshot-*"))
    for arm in ("moe", "samoe-k2", "samoe-k1", "dense"):
        runs = sorted((out / arm).glob("seed*"))
        assert all((r / "zeroshot-mini-3.json").is_file() for r in runs)
        # the numbers are `samoe eval RUN --task`'s, per seed
        per_seed = []
        for r in runs:
            code, stdout, err = run_cli("eval", r, "--task", task, "--limit", 3, "--json", "--quiet")
            assert code == 0, err
            per_seed.append(json.loads(stdout)[str(task)])
        z = rows[arm]["zeroshot"][str(task)]
        assert z["seeds"] == len(runs) and z["n"] == 3 and z["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
        for key in ("acc", "acc_norm"):
            values = [s[key] for s in per_seed]
            assert z[key] == pytest.approx(statistics.mean(values))
            assert z[f"{key}_std"] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
    text = (out / "report.md").read_text()
    assert "## Zero-shot scores of the best arms" in text and f"| dense | {task} | 2 | 3 |" in text
    assert "Pool size" not in text and not (out / "gap-diversity.png").exists()

    # a second report reads every score from the runs' caches
    calls = []
    monkeypatch.setattr(zeroshot, "load_scorer", lambda run_dir: calls.append(run_dir))
    again, _ = report.write_report(out, str(task), 3)
    assert calls == [] and json.loads((out / "report.json").read_text()) == list(rows.values())
    # a run trained further is scored again; without --task the report has no zero-shot table
    summary = out / "dense" / "seed1" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "steps": 6}))
    monkeypatch.undo()
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    report.write_report(out, [str(task)], 3)
    assert json.loads((out / "dense" / "seed1" / "zeroshot-mini-3.json").read_text())["steps"] == 6
    report.write_report(out)
    assert "Zero-shot" not in (out / "report.md").read_text()
    assert "zeroshot" not in json.loads((out / "report.json").read_text())[0]


@pytest.mark.parametrize("argv,named", [
    (["--task", "nope"], "'nope'"),
    (["--task", "missing.jsonl"], "missing.jsonl"),
    (["--task", "mini.jsonl", "--limit", "0"], "--limit"),
    (["--limit", "3"], "--task"),
    (["--task", ","], "--task"),
])
def test_bad_zero_shot_options_are_one_line_exit_2_and_write_nothing(tmp_path, argv, named):
    out = _fake_arms(tmp_path / "out", {"dense": (["model.moe.enabled=false"], [1.0])})
    _task_file(tmp_path / "mini.jsonl")
    assert_user_error(run_cli("study", "report", out, *argv), named)
    assert not (out / "report.md").exists() and not list(out.rglob("zeroshot-*"))


# --------------------------------------------------------------------------- pool size against diversity


def _prepared(tmp_path: Path, name: str, vocab: list[str]) -> Path:
    """A prepared corpus (byte tokenizer) of 40 random documents over `vocab`."""
    rng = random.Random(name)
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(40, 80))) + "." for _ in range(40)]
    text = tmp_path / f"{name}.txt"
    text.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / "data" / name
    prepare_dataset([str(text)], out, PrepareOptions(tokenizer="byte", progress=False))
    return out


def test_report_plots_samoe_gap_to_moe_against_each_corpus_diversity(tmp_path, monkeypatch):
    repetitive = _prepared(tmp_path, "repetitive", WORDS[:5])
    varied = _prepared(tmp_path, "varied", [f"{a}{b}" for a in WORDS for b in ("", "s", "ed", "ing", "ly")])
    out = tmp_path / "out"
    for corpus, data, losses in [("rep", repetitive, ([2.0, 2.2], [2.3, 2.5], [2.6])),
                                 ("var", varied, ([3.0, 3.2], [3.0, 3.0], [3.3])),
                                 ("gone", tmp_path / "data" / "gone", ([1.0], [1.1], [1.2]))]:
        _fake_arms(out / corpus, {"moe": ([f"data.path={data}", "model.moe.sharing=private"], losses[0]),
                                  "samoe-k2": ([f"data.path={data}"], losses[1]),
                                  "samoe-k1": ([f"data.path={data}", "model.moe.pool.size=1"], losses[2])})
    path, rows = report.write_report(out)
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["rep/samoe-k2"]["gap_to_moe"] == pytest.approx(2.4 - 2.1)
    assert by_arm["var/samoe-k2"]["gap_to_moe"] == pytest.approx(3.0 - 3.1)
    assert by_arm["var/samoe-k1"]["gap_to_moe"] == pytest.approx(3.3 - 3.1)
    sd = statistics.stdev
    assert by_arm["rep/samoe-k2"]["gap_to_moe_se"] == pytest.approx(math.sqrt(sd([2.3, 2.5]) ** 2 / 2
                                                                              + sd([2.0, 2.2]) ** 2 / 2))
    assert "gap_to_moe" not in by_arm["rep/moe"] and by_arm["gone/samoe-k2"]["gap_to_moe"] == pytest.approx(0.1)

    # diversity: samoe.data.stats of each corpus's training split, cached per corpus
    div = {c: json.loads((out / c / "diversity.json").read_text())["stats"] for c in ("rep", "var")}
    assert div["rep"]["documents"] == read_meta(repetitive)["splits"]["train"]["docs"]
    assert div["var"]["documents"] == read_meta(varied)["splits"]["train"]["docs"]
    assert div["var"]["unigram_entropy"] > div["rep"]["unigram_entropy"] + 2
    assert div["var"]["distinct_2"] > div["rep"]["distinct_2"]
    assert div["var"]["compression_ratio"] < div["rep"]["compression_ratio"]
    assert by_arm["rep/moe"]["diversity"] == div["rep"] and by_arm["rep/moe"]["corpus"] == "rep"
    assert by_arm["gone/moe"]["diversity"] is None and not (out / "gone" / "diversity.json").exists()
    assert (out / "gap-diversity.png").stat().st_size > 1000
    text = path.read_text()
    assert "## Pool size against data diversity" in text and "![gap-diversity](gap-diversity.png)" in text
    assert "| rep | rep/samoe-k2 | 2 |" in text and "+0.3000" in text
    assert "corpus gone: no diversity" in text and "does not exist" in text

    monkeypatch.setattr(diversity, "corpus_stats", lambda docs: pytest.fail("diversity was recomputed"))
    _, again = report.write_report(out)
    assert {r["arm"]: r for r in again}["var/moe"]["diversity"] == div["var"]


@pytest.mark.slow
def test_a_trained_two_corpus_study_reports_gaps_diversity_and_zero_shot(tmp_path):
    """End to end: `samoe study run` on two prepared corpora (relative data paths, as in
    studies/poolsize.yaml), then `samoe study report --task` on what it trained."""
    _prepared(tmp_path, "repetitive", WORDS[:5])
    _prepared(tmp_path, "varied", [f"{a}{b}" for a in WORDS for b in ("", "s", "ed", "ing", "ly")])
    study = tmp_path / "study.yaml"
    study.write_text("preset: tiny\nsteps: 2\nseeds: [1]\n"
                     "overrides: [train.batch_size=4, train.eval_every=2, train.ckpt_every=2, train.log_every=1, "
                     "train.eval_tokens=256]\n"
                     "corpora:\n  rep: [data.path=data/repetitive]\n  var: [data.path=data/varied]\n"
                     "arms:\n  moe: [model.moe.sharing=private]\n  samoe-k2: []\n")
    code, _, err = run_cli("study", "run", study, "--out", "out", "--jobs", "2")
    assert code == 0, err
    task = _task_file(tmp_path / "mini.jsonl")
    code, _, err = run_cli("study", "report", "out", "--task", task, "--json")
    assert code == 0, err
    rows = {r["arm"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())}
    for corpus in ("rep", "var"):
        summaries = {a: json.loads((tmp_path / "out" / corpus / a / "seed1" / "summary.json").read_text())
                     for a in ("moe", "samoe-k2")}
        assert rows[f"{corpus}/samoe-k2"]["gap_to_moe"] == pytest.approx(
            summaries["samoe-k2"]["val_loss"] - summaries["moe"]["val_loss"])
        assert rows[f"{corpus}/moe"]["diversity"]["documents"] == read_meta(
            tmp_path / "data" / ("repetitive" if corpus == "rep" else "varied"))["splits"]["train"]["docs"]
    assert rows["var/moe"]["diversity"]["unigram_entropy"] > rows["rep/moe"]["diversity"]["unigram_entropy"]
    assert sum("zeroshot" in r for r in rows.values()) == 3
    assert (tmp_path / "out" / "gap-diversity.png").is_file()


def test_speed_file_puts_the_per_second_view_on_measured_tokens_per_s(tmp_path):
    """`samoe study speed` times every arm; the report's seconds are then tokens / that speed."""
    study = _study(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = _run("study", "speed", study, "--out", out, "--threads", "1", "--repeats", "2")
    assert code == 0, err
    speed = json.loads((out / "speed.json").read_text())
    assert set(speed["tokens_per_s"]) == {"small/dense", "small/moe"} and speed["threads"] == 1
    assert all(v > 0 for v in speed["tokens_per_s"].values())
    assert _run("study", "run", study, "--out", out, "--jobs", "2")[0] == 0
    path, rows = report.write_report(out)
    by_arm = {r["arm"]: r for r in rows}
    for arm, tps in speed["tokens_per_s"].items():
        assert by_arm[arm]["tokens_per_s"] == pytest.approx(tps)
        assert by_arm[arm]["train_s"] == pytest.approx(by_arm[arm]["tokens"] / tps)
    assert "samoe study speed" in path.read_text()


def test_a_missing_corpus_path_is_one_error_before_any_run(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("preset: tiny\nsteps: 2\ncorpora:\n  gone: [data.path=nowhere/mix]\narms:\n  a: []\n")
    code, _, err = _run("study", "run", study, "--out", tmp_path / "out")
    assert code == 2 and len(err.splitlines()) == 1 and "nowhere/mix" in err and "gone/a/seed1337" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_grid_killed_mid_way_resumes_and_reports_its_runs_own_numbers(tmp_path):
    """SIGKILL the runner (and its run) once the first run has finished: the rerun skips the
    finished run, resumes or restarts the interrupted one, and the report equals the summaries."""

    study = _study(tmp_path, steps=8, arms="  dense: [model.moe.enabled=false]\n  moe: [model.moe.sharing=private]\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "samoe", "study", "run", str(study), "--out", str(out)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "small" / "dense" / "seed1" / "summary.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists()
    cells = grid.load_study(study, out)
    assert cells[0].state() == "done" and any(c.state() != "done" for c in cells)

    code, _, err = _run("study", "run", study, "--out", out, "--jobs", "2")
    assert code == 0, err
    assert "1 of 4 runs done; 3 to run" in err
    _, rows = report.write_report(out)
    for row in rows:
        losses = [json.loads((c.run_dir / "summary.json").read_text())["val_loss"]
                  for c in cells if f"small/{c.arm}" == row["arm"]]
        assert row["seeds"] == 2 and row["val_loss"] == pytest.approx(statistics.mean(losses))


def _unfinished_run(run_dir: Path, curve: list[tuple[int, float]]) -> None:
    """A run still training: metrics.jsonl with a training row and its evaluations, no summary.json."""
    run_dir.mkdir(parents=True)
    rows = [{"step": s, "tokens": 64 * s, "loss": 5.0 - s / 1000, "tokens_per_s": 100.0} for s in range(1, 2501)]
    rows += [{"step": s, "tokens": 64 * s, "tokens_per_s": 100.0, "val_loss": v} for s, v in curve]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_shows_runs_in_progress_beside_the_finished_ones(tmp_path):
    out = _fake_arms(tmp_path / "out", {"dense": (["model.moe.enabled=false"], [1.5])})
    _unfinished_run(out / "moe" / "seed1", [(100, 3.2), (200, 2.9)])
    _unfinished_run(out / "samoe" / "seed1", [(100, 3.1)])
    _unfinished_run(out / "samoe" / "seed2", [])  # no evaluation yet: left out
    path, rows = report.write_report(out)
    text = path.read_text()
    assert [r["arm"] for r in rows] == ["dense"]  # the table of finished runs is unchanged
    section = text[text.index("## Runs in progress"):]
    assert "| step | moe/seed1 | samoe/seed1 |" in section
    assert "| 100 | 3.2000 | 3.1000 |" in section and "| 200 | 2.9000 |  |" in section
    assert "samoe/seed2" not in section and (out / "loss-steps-unfinished.png").is_file()
    # training loss: mean over steps (0, 1000] and (1000, 2000]; the incomplete third window is left out
    window = section[section.index("Mean training loss"):]
    assert "| 1,000 | 4.4995 | 4.4995 |" in window and "| 2,000 | 3.4995 | 3.4995 |" in window
    assert "| 3,000 |" not in window


def test_a_study_with_no_finished_run_yet_reports_its_progress(tmp_path):
    _unfinished_run(tmp_path / "out" / "moe" / "seed1", [(100, 3.2)])
    code, _, err = _run("study", "report", tmp_path / "out")
    assert code == 0, err
    text = (tmp_path / "out" / "report.md").read_text()
    assert "No run has finished yet" in text and "| 100 | 3.2000 |" in text
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == []


@pytest.mark.slow
def test_run_with_loggers_gives_one_tensorboard_run_per_arm_and_seed(tmp_path):
    study = _study(tmp_path)
    out = tmp_path / "out"
    code, _, err = _run("study", "run", study, "--out", out, "--loggers", "tensorboard")
    assert code == 0, err
    runs = sorted(str(p.parent.relative_to(out)) for p in out.rglob("events.out.tfevents.*"))
    assert runs == ["small/dense/seed1/tb", "small/dense/seed2/tb", "small/moe/seed5/tb"]
    cfg = (out / "small" / "moe" / "seed5" / "config.yaml").read_text()
    assert "- tensorboard" in cfg and "wandb_group: study" in cfg
    assert_user_error(_run("study", "run", study, "--out", out, "--loggers", "tensorboard,mlflow"), "mlflow")
