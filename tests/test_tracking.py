"""Live tracking (train.loggers, samoe.train.tracking): TensorBoard and W&B (offline) get every
row metrics.jsonl gets, at the same step; a resumed run continues one curve and one W&B run; a
missing extra is one line; a tracker that fails is one warning and the run goes on."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from helpers import assert_user_error, read_metrics, run_cli, tiny_args
from samoe.train import tracking

pytestmark = pytest.mark.slow
BOTH = "train.loggers=[jsonl,tensorboard,wandb]"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def tb_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of `tag` in the run's TensorBoard directory, in file order."""
    events = []
    for f in sorted((run / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            events += [(e.step, e.value) for e in acc.Scalars(tag)]
    return events


def wandb_history(run: Path) -> dict[str, list[int]]:
    """{W&B run id: steps of its history rows} from the offline transaction logs (LevelDB's log
    format behind a 7-byte ':W&B' header: records of a 7-byte header (crc, length, type) in 32 KiB
    blocks, a record split over blocks as first/middle/last pieces)."""
    out: dict[str, list[int]] = {}
    for f in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, piece, steps = f.read_bytes(), 7, b"", out.setdefault(f.stem.removeprefix("run-"), [])
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            if left < 7 or kind == 0:
                pos += left
                continue
            piece += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # full, last
                record = wandb_internal_pb2.Record()
                record.ParseFromString(piece)
                piece = b""
                if record.WhichOneof("record_type") == "history":
                    steps.append(record.history.step.num)
    return out


def test_both_trackers_get_every_logged_row(corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(*tiny_args(corpus, run, 20, BOTH))
    assert code == 0, err
    rows = read_metrics(run)
    assert [s for s, _ in tb_scalars(run, "loss")] == [r["step"] for r in rows] == list(range(1, 21))
    for (step, value), row in zip(tb_scalars(run, "loss"), rows):
        assert value == pytest.approx(row["loss"], rel=1e-6), step
    assert [s for s, _ in tb_scalars(run, "val_loss")] == [10, 20]
    assert any(t.startswith("coef/layer0/pool") for t in EventAccumulator(str(run / "tb")).Reload().Tags()["scalars"])
    history = wandb_history(run)
    run_id = (run / tracking.WANDB_ID_FILE).read_text().strip()
    assert list(history) == [run_id] and len(history[run_id]) == len(rows) == 20


def test_resume_continues_one_curve_and_one_wandb_run(corpus, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*tiny_args(corpus, run, 10, BOTH))[0] == 0
    run_id = (run / tracking.WANDB_ID_FILE).read_text().strip()
    code, _, err = run_cli("train", "--resume", "--out", run, "--quiet", "train.max_steps=20")
    assert code == 0, err
    steps = [s for s, _ in tb_scalars(run, "loss")]
    assert steps == list(range(1, 21))  # one curve, no step twice
    history = wandb_history(run)
    assert set(history) == {run_id} and (run / tracking.WANDB_ID_FILE).read_text().strip() == run_id
    assert sorted(s for ids in history.values() for s in ids) == list(range(1, 21))


def test_a_missing_extra_is_one_line_before_training(corpus, tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    run = tmp_path / "run"
    assert_user_error(run_cli(*tiny_args(corpus, run, 4, BOTH)), "wandb", '.[track]')
    assert not run.exists()


def test_a_failing_tracker_warns_once_and_the_run_finishes(corpus, tmp_path, monkeypatch):
    class Breaks:
        def __init__(self, run_dir, cfg, start_step):
            self.calls = 0

        def log(self, step, row, hists):
            if step >= 5:
                raise OSError(28, "No space left on device")

        def close(self):
            pass

    monkeypatch.setitem(tracking.KINDS, "tensorboard", Breaks)
    run = tmp_path / "run"
    code, _, err = run_cli(*tiny_args(corpus, run, 12, "train.loggers=[jsonl,tensorboard]"))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: logger")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "'tensorboard'" in warnings[0]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))
    assert json.loads((run / "summary.json").read_text())["steps"] == 12
