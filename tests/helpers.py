"""Helpers shared by the test modules (plain functions; the fixtures built on them are in
conftest.py). Test modules import from here, never from one another."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import torch

from samoe.checkpoint import save_checkpoint
from samoe.cli import main
from samoe.config_load import load_config, save_config
from samoe.data.tokenizer import ByteTokenizer
from samoe.model.gpt import GPT

WORDS = ("the expert router sends each token to one layer of a pool shared across depth while "
         "gradients flow back through gates and weights so that training may learn which "
         "combination of experts serves a sentence best given enough data and time").split()
TIMING_KEYS = {"tokens_per_s"}  # measured, so never compared between runs


def run_cli(*argv) -> tuple[int, str, str]:
    """`samoe ARGV` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_user_error(result, *names) -> str:
    """The CLI's user-error contract: exit status 2, exactly one stderr line "samoe: error: ..."
    naming every one of `names`, no traceback. Returns the line."""
    code, out, err = result
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one stderr line, got {err!r}"
    line = lines[0]
    assert line.startswith("samoe: error:"), line
    for name in names:
        assert str(name) in line, f"{name!r} not named in {line!r}"
    assert code == 2
    return line


def write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A small text file of random sentences over WORDS (the golden loss curve's corpus)."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) + "." for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def tiny_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`samoe train` arguments for a tiny run logging every step, evaluating and saving every 10."""
    return ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--quiet",
            f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=10", "train.ckpt_every=10",
            "train.eval_tokens=512", "train.batch_size=4", "data.tokenizer=byte", *extra]


def read_metrics(run: Path) -> list[dict]:
    """A run's metrics.jsonl rows without the timing keys."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def make_run(root: Path, overrides: list[str], seed: int = 0, tokenizer=None) -> tuple[Path, GPT]:
    """A run directory holding a tiny model with random (not trained) weights, as training writes it."""
    tokenizer = tokenizer or ByteTokenizer()
    cfg = load_config(preset="tiny", overrides=[f"model.vocab_size={tokenizer.vocab_size}", "data.tokenizer=byte",
                                                *overrides])
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.15 if p.dim() > 1 else 0.1))
    root.mkdir(parents=True)
    save_config(cfg, root / "config.yaml")
    tokenizer.save(root / "tokenizer.json")
    save_checkpoint(root, 1, model, {})
    return root, model.eval()


def make_study_run(run_dir: Path, val_loss: float, overrides: list[str] = (), seed: int = 0,
                   steps: int = 4) -> Path:
    """A finished run as `samoe study run` leaves it, without training: make_run's random tiny
    model plus a summary.json with the given val_loss and a metrics.jsonl evaluating every 2 steps."""
    _, model = make_run(run_dir, list(overrides), seed)
    n = sum(p.numel() for p in model.parameters())
    tokens_per_step = 4 * 64
    summary = {"params": {"total": n, "active": n}, "steps": steps, "tokens": steps * tokens_per_step,
               "train_flops_per_token": 6 * n, "train_flops": 6 * n * steps * tokens_per_step,
               "pf_days": 6 * n * steps * tokens_per_step / 8.64e19, "wall_s": 1.0, "steps_this_session": steps,
               "val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_bpb": val_loss / math.log(2),
               "unigram_ppl": 100.0, "val_tokens": 256}
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    rows = [{"step": s, "tokens": s * tokens_per_step, "tokens_per_s": 1000.0, "loss": val_loss + 1,
             **({"val_loss": val_loss + (steps - s) * 0.1} if s % 2 == 0 else {})} for s in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return run_dir
