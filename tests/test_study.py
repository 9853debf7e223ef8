"""`samoe study run` and `samoe study report`: a grid of ordinary runs, skipped when finished,
resumed when partial, and one report whose numbers are the runs' own."""

import contextlib
import io
import json
import random
import statistics
from pathlib import Path

import pytest

from samoe.cli import main
from samoe.config import load_config
from samoe.errors import ConfigError
from samoe.study import grid, report

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
])
def test_a_bad_study_file_is_one_error_naming_the_key(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        grid.load_study(path, tmp_path / "out")


def test_run_skips_finished_runs_resumes_partial_ones_and_reports(tmp_path):
    study = _study(tmp_path)
    out = tmp_path / "out"
    code, _, err = _run("study", "run", study, "--out", out, "--jobs", "2")
    assert code == 0, err
    assert "0 of 3 runs done; 3 to run" in err and "[3/3]" in err and "grid ETA" in err
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
