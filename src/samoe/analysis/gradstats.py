"""What `samoe analyze gradflow` measures in a training step (samoe.analysis.gradflow runs the
cells): per-expert gradient norms and their signal-to-noise ratio over a window of steps, dead
experts, load, router entropy and dropped tokens, taken by a StepHook inside the trainer's own
train_step. The statistics' definitions are in gradflow.py's docstring.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from samoe.config import micro_batch
from samoe.errors import ConfigError
from samoe.model.gpt import GPT
from samoe.moe.dispatch import MoERecord, record_moe
from samoe.train.loop import StepHook, Trainer, train_step
from samoe.train.perplexity import evaluate

# --------------------------------------------------------------------------- routing statistics


def routing_counts(routing, num_experts: int) -> Tensor:
    """Kept (token, expert) slots per expert: [E] int64, on the CPU."""
    return routing.counts(num_experts).cpu()


def router_entropy(routing) -> float:
    """Mean over tokens of the router distribution's entropy (nats); 0 for hash routing."""
    entropy = routing.entropy()
    return 0.0 if entropy is None else float(entropy)


# --------------------------------------------------------------------------- per-expert statistics


class _SNRAccumulator:
    """Per-unit gradient sums over the micro-batches of one step, then per-step statistics
    averaged over the measured steps. Units are rows of a [U, P] gradient matrix."""

    def __init__(self, units: int, numel: int):
        self.units, self.numel = units, numel
        self.norm_sum = np.zeros(units)  # Σ over steps of ‖ḡ‖/√P
        self.snr_sum, self.snr_n = np.zeros(units), np.zeros(units)
        self.dsnr_sum = np.zeros(units)
        self.steps = 0
        self._reset()

    def _reset(self):
        self.g_sum = None
        self.sq_sum = torch.zeros(self.units, dtype=torch.float64)
        self.n = 0

    def add(self, g: Tensor) -> None:  # g [U, P], one micro-batch
        g = g.detach()
        self.g_sum = g.clone() if self.g_sum is None else self.g_sum.add_(g)
        self.sq_sum += g.double().square().sum(1)
        self.n += 1

    def end_step(self) -> None:
        n = self.n
        mean_sq = (self.g_sum.double() / n).square().sum(1)  # ‖ḡ‖²
        noise = (self.sq_sum / n - mean_sq).clamp_min(0)  # (1/n) Σ_i ‖g_i − ḡ‖²
        norm = mean_sq.sqrt()
        self.norm_sum += (norm / math.sqrt(self.numel)).numpy()
        ok = (self.sq_sum > 0) & (noise > 0)
        snr = torch.where(ok, norm / noise.clamp_min(1e-300).sqrt(), torch.zeros_like(norm))
        self.snr_sum += snr.numpy()
        if n > 1:  # ‖μ‖² ≈ ‖ḡ‖² − σ²/n with σ² = Σ_i ‖g_i − ḡ‖² / (n − 1), unbiased
            sigma2 = noise * n / (n - 1)
            signal = (mean_sq - sigma2 / n).clamp_min(0).sqrt()
            self.dsnr_sum += torch.where(ok, signal / sigma2.clamp_min(1e-300).sqrt(), torch.zeros_like(norm)).numpy()
        self.snr_n += ok.numpy()
        self.steps += 1
        self._reset()

    def result(self) -> dict:
        snr = np.where(self.snr_n > 0, self.snr_sum / np.maximum(self.snr_n, 1), np.nan)
        dsnr = np.where(self.snr_n > 0, self.dsnr_sum / np.maximum(self.snr_n, 1), np.nan)
        return {"grad_norm_per_param": (self.norm_sum / max(self.steps, 1)).tolist(),
                "snr": [None if np.isnan(v) else float(v) for v in snr],
                "snr_debiased": [None if np.isnan(v) else float(v) for v in dsnr],
                "snr_undefined_frac": float(1 - self.snr_n.sum() / max(1, self.steps * self.units))}


def _rows(tensors: list[Tensor | None], like: list[Tensor], lead: int) -> Tensor:
    """Gradients of (W1, b1, W2, b2) with `lead` leading unit dims as one [U, P] matrix (None -> 0)."""
    parts = []
    for g, t in zip(tensors, like):
        g = torch.zeros_like(t) if g is None else g
        parts.append(g.reshape(math.prod(t.shape[:lead]), -1))
    return torch.cat(parts, dim=1)


def _stored_units(model, sharing: str) -> tuple[list[list[Tensor]], str]:
    """Groups of stored expert parameters [(w1, b1, w2, b2) with leading unit dims] and how units are indexed."""
    if sharing == "pool":
        p = model.expert_pool
        return [[p.w1, p.b1, p.w2, p.b2]], "pool entry (k, e), row-major over [K, E]"
    if sharing == "shared":
        b = model.expert_bank
        return [[b.w1, b.b1, b.w2, b.b2]], "bank expert m"
    return [[l.experts.w1, l.experts.b1, l.experts.w2, l.experts.b2] for l in model.moe_layers()], \
        "(layer, expert), one group per MoE layer"


class GradFlowHook(StepHook):
    """train_step's per-micro-batch hook: records each micro-batch's routing (and, when
    `measuring`, the effective expert weights), captures the gradients of that micro-batch with
    tensor hooks on the effective weights and the stored expert parameters, and accumulates the
    statistics of the module docstring. Call end_step() after each measured step."""

    def __init__(self, model: GPT, sharing: str):
        self.model = model
        self.layers = len(model.moe_layers())
        self.groups, self.unit_desc = _stored_units(model, sharing)
        self.measuring = True
        self.rec: MoERecord | None = None
        self.eff_grads: list[list[Tensor | None]] = []
        self.stored_grads = [[None] * len(g) for g in self.groups]
        self.handles = [w.register_hook(partial(self._keep, self.stored_grads, gi, wi))
                        for gi, g in enumerate(self.groups) for wi, w in enumerate(g)]
        self.eff_acc: list[_SNRAccumulator] | None = None
        self.stored_acc: list[_SNRAccumulator] = []
        self.counts: list[Tensor] | None = None
        self.tokens_sum = [np.zeros(0)] * self.layers
        self.dead, self.cv, self.entropy, self.entropy_norm, self.dropped = [], [], [], [], []
        self.measured = 0

    @staticmethod
    def _keep(store, i, j, grad):
        store[i][j] = grad

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    @contextmanager
    def forward(self):
        self.stored_grads[:] = [[None] * len(g) for g in self.groups]
        with record_moe(self.model, effective=self.measuring) as rec:
            yield
        self.rec = rec
        self.eff_grads = [[None] * 4 for _ in rec.calls]
        for li, (_, ws, _) in enumerate(rec.calls):
            for wi, w in enumerate(ws or []):
                w.register_hook(partial(self._keep, self.eff_grads, li, wi))

    def after_backward(self, out, weight: float) -> None:
        if not self.measuring:
            return
        calls = self.rec.calls
        c = [routing_counts(r, E) for r, _, E in calls]
        self.counts = c if self.counts is None else [a + b for a, b in zip(self.counts, c)]
        if self.eff_acc is None:
            # units: the experts this process holds (all E, or E/P under expert parallelism)
            self.eff_acc = [_SNRAccumulator(ws[0].shape[0], sum(w[0].numel() for w in ws)) for _, ws, _ in calls]
            for g in self.groups:
                units = math.prod(g[0].shape[: g[0].dim() - 2])
                self.stored_acc.append(_SNRAccumulator(units, sum(w.numel() for w in g) // units))
        # the hooks saw the gradient of weight x (this micro-batch's loss): undo the weight
        for li, (routing, ws, E) in enumerate(calls):
            self.eff_acc[li].add(_rows(self.eff_grads[li], ws, 1) / weight)
            self.entropy.append(router_entropy(routing))
            self.entropy_norm.append(self.entropy[-1] / math.log(E) if E > 1 else 0.0)
            self.dropped.append(float(routing.dropped().float().mean()))
        for gi, g in enumerate(self.groups):
            self.stored_acc[gi].add(_rows(self.stored_grads[gi], g, g[0].dim() - 2) / weight)

    def end_step(self) -> None:
        for acc in (*self.eff_acc, *self.stored_acc):
            acc.end_step()
        for li, c in enumerate(self.counts):
            cn = c.numpy().astype(float)
            self.tokens_sum[li] = cn if not self.tokens_sum[li].size else self.tokens_sum[li] + cn
            self.dead.append(float((cn == 0).mean()))
            self.cv.append(float(cn.std() / cn.mean()) if cn.mean() > 0 else 0.0)
        self.counts = None
        self.measured += 1

    def result(self, losses: list[float], val_loss: float) -> dict:
        per_layer = []
        for li in range(self.layers):
            per_layer.append({"tokens_per_step": (self.tokens_sum[li] / self.measured).tolist(),
                              **self.eff_acc[li].result(), "dead_frac": float(np.mean(self.dead[li::self.layers]))})
        stored = [a.result() for a in self.stored_acc]

        def mean_defined(lists):
            vals = [v for lst in lists for v in lst if v is not None]
            return float(np.mean(vals)) if vals else None

        summary = {
            "grad_norm_per_param": float(np.mean([v for pl in per_layer for v in pl["grad_norm_per_param"]])),
            "param_grad_norm_per_param": float(np.mean([v for s in stored for v in s["grad_norm_per_param"]])),
            "snr": mean_defined([pl["snr"] for pl in per_layer]),
            "snr_debiased": mean_defined([pl["snr_debiased"] for pl in per_layer]),
            "param_snr": mean_defined([s["snr"] for s in stored]),
            "param_snr_debiased": mean_defined([s["snr_debiased"] for s in stored]),
            "snr_undefined_frac": float(np.mean([pl["snr_undefined_frac"] for pl in per_layer])),
            "tokens_per_expert": float(np.mean([v for pl in per_layer for v in pl["tokens_per_step"]])),
            "dead_frac": float(np.mean(self.dead)),
            "load_cv": float(np.mean(self.cv)),
            "router_entropy": float(np.mean(self.entropy)),
            "router_entropy_norm": float(np.mean(self.entropy_norm)),
            "dropped_frac": float(np.mean(self.dropped)),
            "train_loss_last10": float(np.mean(losses[-10:])),
            "val_loss": val_loss,
        }
        return {"summary": summary, "per_layer": per_layer, "stored": {"units": self.unit_desc, "groups": stored},
                "measured_steps": self.measured}


def check_micro_batches(t) -> int:
    micro = micro_batch(t)
    if t.batch_size // micro < 2:
        raise ConfigError("analyze gradflow needs at least 2 micro-batches per step for the SNR: "
                          f"train.micro_batch_size ({micro}) must be at most half of train.batch_size ({t.batch_size})")
    return t.batch_size // micro


def measure_steps(tr: Trainer, val, steps: int, first_measured: int, progress: bool = False, desc: str = "") -> dict:
    """Take `steps` train steps with tr (the project's train_step), measuring from the
    `first_measured`-th on; then the validation loss. Returns the statistics (module docstring).
    Under expert parallelism each process measures its own tokens and its own expert shard."""
    cfg = tr.cfg
    n_micro = check_micro_batches(cfg.train)
    if not tr.model.moe_layers():
        raise ConfigError("the model has no MoE layers (model.moe.enabled = false?)")
    hook = GradFlowHook(tr.model, cfg.model.moe.sharing)
    tr.model.train()
    losses, wall0 = [], time.time()
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False, disable=not progress, dynamic_ncols=True)
    try:
        for i in range(steps):
            hook.measuring = i >= first_measured
            row = train_step(tr, hook)
            if hook.measuring:
                hook.end_step()
            losses.append(row["loss"])
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            bar.update(1)
    finally:
        hook.close()
        bar.close()
    val_loss = evaluate(tr.model, val, np.ones(cfg.model.vocab_size, dtype=np.int64), tr.micro,
                        cfg.train.eval_tokens)["val_loss"]
    return {**hook.result(losses, val_loss), "steps": steps, "micro_batches": n_micro,
            "wall_s": round(time.time() - wall0, 2)}
