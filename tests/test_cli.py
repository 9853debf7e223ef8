"""The `samoe` command line: positive paths and the user-error contract.

Every mistake in what the user passes gives exit status 2 and exactly one stderr line
"samoe: error: ..." naming the offending path or key -- never a traceback -- and leaves any
existing run directory byte-for-byte unchanged. Commands run in-process via samoe.cli.main.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import samoe.cli as cli_mod
from helpers import assert_user_error, run_cli
from samoe.cli import main
from samoe.verbs import Verb

# A few-second run: the tiny preset, bytes as tokens, 3 steps, one evaluation and checkpoint.
FAST = ["--preset", "tiny", "--quiet", "train.max_steps=3", "train.eval_every=3", "train.ckpt_every=3",
        "train.eval_tokens=256", "train.batch_size=2", "data.tokenizer=byte"]
STEP_DIR = Path("checkpoints") / "step-000003"
WORDS = ("the a model expert layer token router pool shared weight learns quickly slowly every small "
         "large data text paragraph sentence river mountain city garden reads writes builds runs over "
         "under between through").split()


def _paragraphs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paras = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(rng.randint(2, 4))]
        paras.append(" ".join(sentences))
    return paras


def _write_corpus(path: Path) -> Path:
    path.write_text("\n\n".join(_paragraphs(40)) + "\n", encoding="utf-8")  # ~7 KB, 40 documents
    return path


def _snapshot(root: Path) -> dict:
    """Every file (hidden ones too) under root: relative path -> (bytes, mtime_ns, mode)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test touches the user's cache or leaves runs/ in the working directory."""
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 3-step run shared by the module: (run_dir, corpus path, (code, stdout, stderr))."""
    root = tmp_path_factory.mktemp("cli-run")
    corpus = _write_corpus(root / "corpus.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMOE_CACHE", str(root / "cache"))
        result = run_cli("train", "--data", corpus, "--out", root / "run", *FAST)
    return root / "run", corpus, result


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run, free to damage."""
    dst = tmp_path / "run-copy"
    shutil.copytree(trained[0], dst)
    return dst


@pytest.fixture
def corpus(tmp_path):
    return _write_corpus(tmp_path / "corpus.txt")


# --------------------------------------------------------------------------------- positive paths


def test_params_json():
    code, out, err = run_cli("params", "tiny", "--json")
    assert code == 0 and "Traceback" not in err
    counts = json.loads(out)
    assert type(counts["total"]) is int and type(counts["active"]) is int
    assert 0 < counts["active"] < counts["total"]  # tiny is an MoE: not every expert is active


def test_train_writes_the_run_directory(trained):
    run, _, (code, out, err) = trained
    assert code == 0, err
    assert "Traceback" not in err
    assert "done: 3 steps" in out and str(run) in out
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "summary.json", "checkpoints/latest"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / (run / "checkpoints/latest").read_text().strip() / "model.safetensors").is_file()

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == 3
    for row in rows:
        assert {"step", "tokens", "loss", "lr", "tokens_per_s", "dropped_frac", "router_entropy"} <= row.keys()
    assert {"val_loss", "val_ppl", "val_bpb"} <= rows[-1].keys()

    summary = json.loads((run / "summary.json").read_text())
    assert type(summary["params"]["total"]) is int and type(summary["params"]["active"]) is int
    for key in ("tokens", "wall_s", "val_loss", "val_ppl", "val_bpb", "unigram_ppl"):
        assert isinstance(summary[key], (int, float)), key
    assert summary["tokens"] == 3 * 2 * 64  # steps * batch_size * tiny's block_size


def test_eval_json(trained):
    run = trained[0]
    code, out, err = run_cli("eval", run, "--json")
    assert code == 0, err
    result = json.loads(out)
    for key in ("val_loss", "val_ppl", "val_bpb"):
        assert isinstance(result[key], float) and result[key] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-4)


def test_eval_windows_spread_holds_in_training_and_in_samoe_eval(tmp_path):
    """train.eval_windows=spread: training's evaluations and `samoe eval` score the same windows,
    spaced over the split, not its first ones (400 documents: the split holds ~60 windows of 64)."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n\n".join(_paragraphs(400)) + "\n", encoding="utf-8")
    code, _, err = run_cli("train", "--data", corpus, "--out", "spread", *FAST, "train.eval_tokens=128",
                           "train.eval_windows=spread")
    assert code == 0, err
    summary = json.loads(Path("spread/summary.json").read_text())
    code, out, err = run_cli("eval", "spread", "--json")
    assert code == 0, err
    assert json.loads(out)["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    config = Path("spread/config.yaml")
    config.write_text(config.read_text().replace("eval_windows: spread", "eval_windows: first"))
    code, out, err = run_cli("eval", "spread", "--json")
    assert code == 0, err
    assert json.loads(out)["val_loss"] != pytest.approx(summary["val_loss"], rel=1e-3)


def test_eval_text_and_other_data(trained):
    run, corpus, _ = trained
    code, out, err = run_cli("eval", run, "--data", corpus, "--max-tokens", "128")
    assert code == 0, err
    assert "val_loss" in out and "val_bpb" in out


def test_generate_prints_text(trained):
    code, out, err = run_cli("generate", trained[0], "--prompt", "x", "--max-tokens", "5")
    assert code == 0, err
    assert out.startswith("x") and len(out.strip()) >= 1


@pytest.mark.slow
def test_resume_continues_the_run(run_copy):
    code, out, err = run_cli("train", "--resume", "--out", run_copy, "--max-steps", "4", "--quiet")
    assert code == 0, err
    assert json.loads((run_copy / "summary.json").read_text())["steps"] == 4
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-2:] == [3, 4]


@pytest.mark.slow
def test_train_on_jsonl(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(_paragraphs(30))))
    code, out, err = run_cli("train", "--data", data, "--out", tmp_path / "r", *FAST, "train.max_steps=1")
    assert code == 0, err
    assert (tmp_path / "r" / "summary.json").is_file()


@pytest.mark.slow
def test_train_on_a_directory(tmp_path):
    data = tmp_path / "texts"
    (data / "sub").mkdir(parents=True)
    paras = _paragraphs(30, seed=1)
    (data / "a.txt").write_text("\n\n".join(paras[:15]))
    (data / "sub" / "b.md").write_text("\n\n".join(paras[15:]))
    code, out, err = run_cli("train", "--data", data, "--out", tmp_path / "r", *FAST, "train.max_steps=1")
    assert code == 0, err
    assert (tmp_path / "r" / "summary.json").is_file()


def test_train_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("model.moe.num_experts", "model.moe.pool.size", "train.max_steps", "data.tokenizer"):
        assert key in out


# ------------------------------------------------------------------------- bad data: exit 2, one line


def _bad_data(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.txt"
    if kind == "missing":
        return path
    path.write_bytes({
        "empty": b"",
        "blank": b"\n  \n\n",
        "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
        "latin1": "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e.\n\nAnother paragraph.\n".encode("latin-1"),
        "tiny": b"one short paragraph\n\nand another\n",  # too few tokens for one 64-token window
    }[kind])
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "blank", "binary", "latin1", "tiny"])
def test_train_bad_data(tmp_path, kind):
    data, out = _bad_data(tmp_path, kind), tmp_path / "new-run"
    assert_user_error(run_cli("train", "--data", data, "--out", out, *FAST),
                       *(["training split"] if kind == "tiny" else [data]))
    assert not out.exists(), "a failed start must not leave a half-made run directory"


@pytest.mark.parametrize("kind", ["missing", "empty", "binary", "latin1"])
def test_eval_bad_data(run_copy, tmp_path, kind):
    before = _snapshot(run_copy)
    data = _bad_data(tmp_path, kind)
    assert_user_error(run_cli("eval", run_copy, "--data", data), data)
    assert _snapshot(run_copy) == before


def test_bad_data_behind_a_resume_changes_nothing(run_copy, trained, tmp_path):
    """Resuming a run whose data file has since become unreadable."""
    cfg = run_copy / "config.yaml"
    moved = tmp_path / "moved.txt"
    cfg.write_text(cfg.read_text().replace(str(trained[1]), str(moved)))
    moved.write_bytes(b"\xff\xfe\x00\x00binary")
    before = _snapshot(run_copy)
    assert_user_error(run_cli("train", "--resume", "--out", run_copy, "--max-steps", "4", "--quiet"), moved)
    assert _snapshot(run_copy) == before


# ------------------------------------------------------------------------ bad config: exit 2, one line


def test_invalid_yaml_config(tmp_path, corpus):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: [1, 2\n  d_model: 64\n")
    assert_user_error(run_cli("train", "--config", bad, "--data", corpus, "--out", tmp_path / "r"), bad)
    assert_user_error(run_cli("params", bad), bad)
    assert not (tmp_path / "r").exists()


def test_unknown_key_override(tmp_path, corpus):
    assert_user_error(run_cli("train", "--data", corpus, "--out", tmp_path / "r", *FAST, "model.moe.num_expert=4"),
                       "model.moe.num_expert")
    assert_user_error(run_cli("params", "tiny", "trian.max_steps=3"), "trian")
    assert not (tmp_path / "r").exists()


def test_unknown_key_in_yaml_file(tmp_path, corpus):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  n_layers: 2\n  moe:\n    pool:\n      sise: 4\n")
    assert_user_error(run_cli("train", "--config", cfg, "--data", corpus, "--out", tmp_path / "r"),
                       "model.moe.pool.sise")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override, key", [
    ("model.n_layers=abc", "model.n_layers"),
    ("model.moe.enabled=maybe", "model.moe.enabled"),
    ("train.lr=[1, 2]", "train.lr"),
    ("model.moe.experts_per_layer=4", "model.moe.experts_per_layer"),
    ("model.n_layers=", "model.n_layers"),
])
def test_wrong_value_type(tmp_path, corpus, override, key):
    assert_user_error(run_cli("train", "--data", corpus, "--out", tmp_path / "r", *FAST, override), key)
    assert not (tmp_path / "r").exists()


def test_unknown_preset(tmp_path):
    assert_user_error(run_cli("train", "--preset", "tinyy", "--out", tmp_path / "r"), "tinyy")


# ------------------------------------------------------------- damaged checkpoints: exit 2, untouched


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flip-weights": ("model.safetensors", _flip),  # bytes inside a tensor: safetensors itself cannot tell
    "flip-weights-header": ("model.safetensors", lambda p: _flip(p, 0.0)),
    "truncate-weights": ("model.safetensors", _truncate),
    "flip-state": ("state.pt", _flip),  # inside the optimiser moments: torch.load itself cannot tell
    "truncate-state": ("state.pt", _truncate),
    "empty-state": ("state.pt", lambda p: p.write_bytes(b"")),
    "missing-weights": ("model.safetensors", Path.unlink),
}


@pytest.mark.parametrize("verb", ["eval", "resume"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint(run_copy, verb, damage):
    name, spoil = DAMAGE[damage]
    spoil(run_copy / STEP_DIR / name)
    before = _snapshot(run_copy)
    if verb == "eval":
        result = run_cli("eval", run_copy, "--json")
    else:
        result = run_cli("train", "--resume", "--out", run_copy, "--max-steps", "5", "--quiet")
    assert_user_error(result, run_copy / STEP_DIR / name)
    assert _snapshot(run_copy) == before


@pytest.mark.parametrize("verb", ["eval", "generate", "resume"])
def test_run_directory_without_checkpoint(run_copy, verb):
    shutil.rmtree(run_copy / "checkpoints")
    before = _snapshot(run_copy)
    argv = {"eval": ["eval", run_copy], "generate": ["generate", run_copy, "--prompt", "x"],
            "resume": ["train", "--resume", "--out", run_copy, "--quiet"]}[verb]
    assert_user_error(run_cli(*argv), run_copy, "checkpoint")
    assert _snapshot(run_copy) == before


def test_latest_names_a_missing_checkpoint(run_copy):
    (run_copy / "checkpoints" / "latest").write_text("step-000999\n")
    before = _snapshot(run_copy)
    assert_user_error(run_cli("eval", run_copy), "step-000999")
    assert_user_error(run_cli("train", "--resume", "--out", run_copy, "--quiet"), "step-000999")
    assert _snapshot(run_copy) == before


def test_not_a_run_directory(tmp_path):
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert_user_error(run_cli("eval", empty), empty)
    assert_user_error(run_cli("train", "--resume", "--out", tmp_path / "nowhere", "--quiet"), "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_new_run_in_a_directory_holding_another_run(run_copy, corpus):
    before = _snapshot(run_copy)
    assert_user_error(run_cli("train", "--data", corpus, "--out", run_copy, *FAST, "model.n_layers=1"), run_copy)
    assert _snapshot(run_copy) == before


def test_resume_refuses_to_change_the_config(run_copy):
    before = _snapshot(run_copy)
    assert_user_error(run_cli("train", "--resume", "--out", run_copy, "--quiet", "model.n_layers=1"), "model.n_layers")
    assert _snapshot(run_copy) == before


# ------------------------------------------------------------------------------ the real console script


@pytest.mark.slow
def test_console_script_exit_status(tmp_path):
    script = Path(sys.executable).with_name("samoe")
    assert script.exists(), "the README's install command puts the samoe script beside python"
    proc = subprocess.run([str(script), "train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r"),
                           "--preset", "tiny", "--quiet"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "SAMOE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("samoe: error:") and "nope.txt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_peer_leaving_on_ctrl_c_is_an_interruption_not_a_traceback(monkeypatch, capsys):
    """Under torchrun a process blocked in a collective sees its interrupted peer leave (a
    RuntimeError) before its own Ctrl-C is raised; with that Ctrl-C pending, it exits 130
    quietly (the launcher says "interrupted" once for all). Without one, a peer-left error exits
    1 without a traceback (the peer reports why), and any other error propagates."""
    def peer_left(args):
        raise RuntimeError("Connection closed by peer")
    monkeypatch.setattr(cli_mod, "VERBS", [Verb("params", "", lambda p: None, peer_left)])
    monkeypatch.setenv("RANK", "0")  # a torchrun process
    monkeypatch.setattr(cli_mod, "INTERRUPT_GRACE_S", 0.0)

    def pending_ctrl_c():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_mod, "run_pending_signal_handlers", pending_ctrl_c)
    assert cli_mod.main(["params"]) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli_mod, "run_pending_signal_handlers", lambda: None)
    assert cli_mod.main(["params"]) == 1
    assert capsys.readouterr().err == ""

    def failed(args):
        raise RuntimeError("a real failure")
    monkeypatch.setattr(cli_mod, "VERBS", [Verb("params", "", lambda p: None, failed)])
    with pytest.raises(RuntimeError, match="a real failure"):
        cli_mod.main(["params"])
    monkeypatch.setattr(cli_mod, "VERBS", [Verb("params", "", lambda p: None, peer_left)])
    monkeypatch.delenv("RANK")  # a single process does not wait for an interrupt: the error is real
    monkeypatch.setattr(cli_mod, "run_pending_signal_handlers", pending_ctrl_c)
    with pytest.raises(RuntimeError, match="closed by peer"):
        cli_mod.main(["params"])


@pytest.mark.parametrize("argv, overrides", [
    (["train", "--preset", "tiny", "model.moe.sharing=private", "--max-steps", "2", "train.log_every=1"],
     ["model.moe.sharing=private", "train.log_every=1"]),
    (["train", "a.b=1", "--seed", "3", "c.d=2", "--quiet", "e.f=3"], ["a.b=1", "c.d=2", "e.f=3"]),
    (["params", "tiny", "--json", "model.n_layers=4"], ["model.n_layers=4"]),
])
def test_overrides_may_stand_anywhere_among_a_verbs_flags(argv, overrides):
    assert cli_mod.parse(argv).overrides == overrides


def test_an_override_after_a_flag_takes_effect():
    code, out, err = run_cli("params", "tiny", "--json", "model.moe.sharing=private", "model.n_layers=4")
    code2, out2, _ = run_cli("params", "tiny", "model.moe.sharing=private", "--json", "model.n_layers=4")
    assert code == code2 == 0 and out == out2 and json.loads(out)["total"] > json.loads(run_cli("params", "tiny",
                                                                                                  "--json")[1])["total"]
    assert_user_error(run_cli("params", "tiny", "--json", "bogus"), "bogus")
