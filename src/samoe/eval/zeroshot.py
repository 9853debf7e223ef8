"""Zero-shot scoring: log-likelihoods of continuations under a samoe model, and the metrics
lm-evaluation-harness reports from them.

A request is (context, continuation). Tokenisation is lm-evaluation-harness's (HFLM
`_encode_pair`): trailing spaces of the context move to the continuation, the whole string
context + continuation is encoded, and the continuation is the tokens after the first
len(encode(context)) ones; an empty context becomes the end-of-text token. Of the token
sequence x = context + continuation only the last block_size + 1 tokens are kept (the
context is truncated from the left), the model reads x[:-1] with the same forward as
training (`model(idx).logits`), and

    loglikelihood = Σ_{t in continuation} log softmax(logits[t - 1])[x_t]     (nats)
    is_greedy     = every continuation token is the argmax of its logits.

A continuation longer than block_size tokens (which lm-evaluation-harness cannot score) is
scored in chunks of block_size tokens, each in its own window (`windows_of`).

Requests are sorted by length and scored in right-padded batches. The model is causal and
scoring routes MoE tokens without capacity limits (dropless), so a token's log-probability
depends on its own prefix only: padding and batch composition do not change results.
Expert-choice routing is not causal (an expert picks tokens across the batch), so such runs
score one request at a time, unpadded.

Metrics over n items (choice i of an item has log-likelihood ll_i; label is the gold index):

    acc       mean[argmax_i ll_i == label]                  (ties go to the first choice)
    acc_norm  mean[argmax_i ll_i / chars_i == label]        chars_i = len(choice_i), in Unicode
              characters without the joining space, as lm-evaluation-harness's acc_norm
    lastword  acc = mean[is_greedy], ppl = exp(-mean ll)    (LAMBADA; ll of " " + target)
    stderr    sample standard deviation / sqrt(n)            (lm-eval's mean_stderr)
    chance    mean 1 / (number of choices)                  (the expected acc of a guess)
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from samoe.config import ROUTER_KINDS, micro_batch
from samoe.eval.tasks import Task
from samoe.model.gpt import GPT
from samoe.runs import autocast_for, load_trained

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


class Scorer:
    """Log-likelihoods of continuations under a model; shared by `samoe eval --task` and the
    lm-evaluation-harness adapter (samoe.eval.harness)."""

    def __init__(self, model: GPT, tokenizer, batch_size: int, autocast=nullcontext):
        self.model = model.eval()
        self.tokenizer = tokenizer
        # a router that is not causal scores a request by its batch-mates: one request per forward
        causal = not model.cfg.moe.enabled or ROUTER_KINDS[model.cfg.moe.router].causal
        self.batch_size = batch_size if causal else 1
        self.autocast = autocast
        self.device = next(model.parameters()).device

    def encode_pair(self, context: str, continuation: str) -> Request:
        """(context tokens, continuation tokens) as lm-evaluation-harness splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.tokenizer.eot_id], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        n = len(self.tokenizer.encode(context))
        return whole[:n], whole[n:]

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: bool = False,
                      desc: str | None = None) -> list[tuple[float, bool]]:
        """(loglikelihood, is_greedy) of each (context, continuation) string pair."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in pairs], progress, desc)

    @torch.no_grad()
    def score_tokens(self, requests: list[Request], progress: bool = False,
                     desc: str | None = None) -> list[tuple[float, bool]]:
        """(loglikelihood, is_greedy) of each (context tokens, continuation tokens) request;
        contexts must be non-empty (an empty continuation scores (0.0, True))."""
        windows, owners = [], []
        for i, (ctx, cont) in enumerate(requests):
            if not ctx:
                raise ValueError("score_tokens needs a non-empty context (encode_pair gives eot for none)")
            for window in windows_of(ctx, cont, self.model.cfg.block_size):
                windows.append(window)
                owners.append(i)
        lls, greedy = [0.0] * len(requests), [True] * len(requests)
        order = sorted(range(len(windows)), key=lambda j: -len(windows[j][0]))
        bar = tqdm(total=len(windows), desc=desc, disable=not progress, unit="req", leave=False)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            idx = torch.full((len(rows), len(windows[rows[0]][0]) - 1), self.tokenizer.eot_id, dtype=torch.long)
            for r, j in enumerate(rows):
                idx[r, :len(windows[j][0]) - 1] = torch.tensor(windows[j][0][:-1])
            with self.autocast():
                logits = self.model(idx.to(self.device)).logits
            for r, j in enumerate(rows):
                tokens, n = windows[j]
                logprobs = logits[r, len(tokens) - 1 - n:len(tokens) - 1].float().log_softmax(-1)  # [n, V]
                target = torch.tensor(tokens[-n:], device=self.device)
                lls[owners[j]] += float(logprobs.gather(1, target[:, None]).sum())
                greedy[owners[j]] &= bool((logprobs.argmax(-1) == target).all())
            bar.update(len(rows))
        bar.close()
        return list(zip(lls, greedy))


def windows_of(ctx: list[int], cont: list[int], block: int) -> list[tuple[list[int], int]]:
    """(tokens, n) windows that score cont after ctx: the model reads tokens[:-1] and predicts
    the last n. cont is cut into chunks of at most `block` tokens counted back from its end,
    each scored with the block + 1 - n tokens before it (the context truncated from the left);
    a continuation that fits is one window, as in lm-evaluation-harness."""
    seq, out, end = ctx + cont, [], len(ctx) + len(cont)
    while end > len(ctx):
        n = min(block, end - len(ctx))
        out.append((seq[max(0, end - block - 1):end], n))
        end -= n
    return out


def load_scorer(run_dir: str | Path, device: str = "auto", batch_size: int | None = None) -> Scorer:
    """A Scorer for a run directory's latest checkpoint, routing dropless (see the module doc);
    batch_size defaults to the run's micro-batch (or batch) size."""
    cfg, model, tok = load_trained(run_dir, device, ["model.moe.dropless=true"])
    autocast = autocast_for(cfg, next(model.parameters()).device)
    return Scorer(model, tok, batch_size or micro_batch(cfg.train), autocast)


def mean_stderr(values: list[float]) -> float | None:
    """Sample standard deviation / sqrt(n); None when n < 2."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean_metric(name: str, hits: list[float]) -> dict:
    return {name: sum(hits) / len(hits), f"{name}_stderr": mean_stderr(hits)}


def task_metrics(task: Task, scores: list[list[tuple[float, bool]]]) -> dict:
    """The metrics of a task from each item's (loglikelihood, is_greedy) per choice."""
    out = {"n": len(task.items)}
    if task.kind == "lastword":
        lls = [s[0][0] for s in scores]
        return {**out, **_mean_metric("acc", [float(s[0][1]) for s in scores]), "ppl": math.exp(-sum(lls) / len(lls))}
    lls = [[ll for ll, _ in s] for s in scores]
    out.update(_mean_metric("acc", [float(_argmax(ll) == item.label) for ll, item in zip(lls, task.items)]))
    if task.kind == "choice":
        normed = [[v / len(c) for v, c in zip(ll, item.choices)] for ll, item in zip(lls, task.items)]
        out.update(_mean_metric("acc_norm", [float(_argmax(ll) == item.label) for ll, item in zip(normed, task.items)]))
    out["chance"] = sum(1 / len(item.choices) for item in task.items) / len(task.items)
    return out


def evaluate_task(scorer: Scorer, task: Task, progress: bool = False) -> dict:
    """Score every choice of every item of a task (one batched pass) and return its metrics."""
    pairs = [(ctx, " " + choice) for item in task.items for ctx, choice in zip(item.contexts, item.choices)]
    flat = scorer.loglikelihood(pairs, progress, task.name)
    scores, at = [], 0
    for item in task.items:
        scores.append(flat[at:at + len(item.choices)])
        at += len(item.choices)
    return task_metrics(task, scores)


def format_results(results: dict[str, dict]) -> str:
    """One row per task: n, acc ± stderr, acc_norm ± stderr, chance, ppl ("-" where not defined)."""
    def pm(r: dict, key: str) -> str:
        if key not in r:
            return "-"
        err = r[f"{key}_stderr"]
        return f"{r[key]:.4f} ± {err:.4f}" if err is not None else f"{r[key]:.4f}"

    width = max(len("task"), *(len(name) for name in results))
    lines = [f"{'task':<{width}} {'n':>6}  {'acc':<16} {'acc_norm':<16} {'chance':<7} ppl"]
    for name, r in results.items():
        chance = f"{r['chance']:.4f}" if "chance" in r else "-"
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        lines.append(f"{name:<{width}} {r['n']:>6}  {pm(r, 'acc'):<16} {pm(r, 'acc_norm'):<16} {chance:<7} {ppl}")
    return "\n".join(lines)
