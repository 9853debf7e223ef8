"""A trained run's validation loss, perplexity and bits per byte: what `samoe eval RUN` prints
and `samoe study eval` writes beside each run of a study (samoe.study.whole_split)."""

from __future__ import annotations

from samoe.config import micro_batch
from samoe.data.prepare import load_eval_stream, load_splits
from samoe.errors import UserError
from samoe.runs import autocast_for, load_trained
from samoe.train.perplexity import evaluate

RUN_DEFAULT = "run"  # max_tokens: the run's own train.eval_tokens, from its train.eval_windows


def evaluate_run(run_dir, device: str = "auto", data: str | None = None,
                 max_tokens: int | None | str = RUN_DEFAULT) -> dict:
    """Score the run's latest checkpoint on its validation split (or on every document of
    `data`): the first max_tokens tokens, None for all of them, or RUN_DEFAULT for what its
    training evaluations scored. Dropless, as every quality number here (docs/evaluation.md)."""
    if max_tokens != RUN_DEFAULT and max_tokens is not None and max_tokens < 0:
        raise UserError(f"--max-tokens {max_tokens} is invalid; expected an integer >= 0 (0 = all)")
    cfg, model, tok = load_trained(run_dir, device)
    if max_tokens == RUN_DEFAULT:
        max_tokens = cfg.train.eval_tokens
    stream = load_eval_stream(data, tok) if data else load_splits(cfg.data, cfg.model.vocab_size, tok).val
    return evaluate(model, stream, tok.token_bytes(), micro_batch(cfg.train), max_tokens,
                    autocast_for(cfg, next(model.parameters()).device), spread=cfg.train.eval_windows == "spread")
