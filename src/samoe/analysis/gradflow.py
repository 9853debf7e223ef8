"""Gradient flow into experts across routers, expert counts and sharing: `samoe analyze gradflow`.

For every cell of a grid routers × expert counts E × sharing, a short training run (the
project's model, optimiser, schedule and data) records, per expert, over the *measured* steps
(the last `measure` fraction of the run, default the second half):

- **gradient norm per parameter** of expert e in MoE layer l: ‖ḡ_{l,e}‖ / √P, where ḡ is the
  step's gradient (the mean of the micro-batch gradients) with respect to the expert's
  *effective* weights (W1_l[e], b1_l[e], W2_l[e], b2_l[e]) and P their number. For private
  experts these are the layer's own parameters; for SaMoE (sharing = pool) they are the
  combined weights W_l[e] = Σ_k c_l[e,k]·P[k,e], materialised for the analysis only; for a
  shared bank, the bank as layer l uses it. Experts that received no token in the step count
  with norm 0: that is the starvation being measured.
- **the same for the stored parameters** (`param_*`): what the optimiser sees. Private: one
  unit per (layer, expert), identical to the effective one. Pool: one unit per pool entry
  (k, e), whose gradient ∂L/∂P[k,e] = Σ_l c_l[e,k]·∂L/∂W_l[e] gathers every layer. Shared
  bank: one unit per bank expert, summed over layers.
- **tokens routed per step**: kept (token, expert) slots of expert e over the step's
  micro-batches (after capacity), and the **dead fraction**: the fraction of a layer's E
  experts that received no token in the whole step.
- **gradient signal-to-noise ratio** across the n micro-batches i of a step, per expert:

      SNR_e = ‖ḡ_e‖ / sqrt( (1/n) Σ_i ‖g_{e,i} − ḡ_e‖² ),    ḡ_e = (1/n) Σ_i g_{e,i}

  with g_{e,i} the gradient of micro-batch i's loss (LM loss + auxiliary losses, each a mean
  over that micro-batch's tokens) with respect to expert e's weights. The denominator is the
  root-mean-square deviation of one micro-batch's gradient from the step's mean, so SNR
  compares the signal with the noise of a single micro-batch (not of their mean, which is
  √n smaller). It is undefined for an expert with no token in the step (all g = 0); such
  (step, expert) pairs are left out of that expert's mean over steps and counted in
  `snr_undefined_frac`. Per expert the SNR is averaged over the measured steps; the cell's
  value is the mean over layers and experts. Pure noise (g_{e,i} independent with mean 0)
  gives SNR ≈ 1/√(n−1) (0.58 for n = 4 micro-batches): that is the floor, not zero.
  `snr_debiased` removes that floor: ‖μ̂‖ / σ̂ with σ̂² = Σ_i ‖g_{e,i} − ḡ_e‖² / (n−1) (the
  unbiased per-micro-batch noise) and ‖μ̂‖² = max(0, ‖ḡ_e‖² − σ̂²/n) (unbiased for the squared
  norm of the expected gradient), so it is ≈ 0 for pure noise and ≈ SNR when signal dominates.
- **router entropy**: mean over tokens of −Σ_e p_e log p_e of the router's softmax (nats),
  and `router_entropy_norm` = that / log E (1 = uniform, 0 = certain). Hash routing has no
  router distribution: each token goes to one expert with probability 1, entropy 0.
- **load CV**: the coefficient of variation (std / mean) of tokens per expert in a step.

Each finished cell is written atomically to OUT/cells/ROUTER-E<E>-SHARING.json with the
settings it was run with; a rerun with the same settings skips it, so a killed grid resumes
where it stopped (a cell with other settings is an error: use another --out). The grid's
JSON (OUT/gradflow.json) and one PNG per statistic against E (one line per router and
sharing, OUT/gradflow-STAT.png, and all of them in OUT/gradflow.png) are (re)written at the end.

Mechanism: each cell is trained by the project's own train step (train/loop.py: train_step,
with its schedule, accumulation, clipping and router-bias update), given a GradFlowHook. Around
each micro-batch's forward the hook wraps every MoE layer's dispatcher in a recording one
(moe/dispatch.py: record_moe), which keeps the layer's routing and hands the experts their
effective weights as non-leaf tensors (combined from the pool with an einsum when there is
one); tensor hooks on those and on the stored expert parameters catch each micro-batch's
gradients during its backward. The recording works alike for local and expert-parallel
dispatch. `samoe analyze gradflow RUN_DIR...` measures trained runs the same way: each run's
next steps from its latest checkpoint, the run directory only read.

The module (about 600 lines) keeps the statistics, the grid with its resumable cells, the run
measurement, the table and the plots together: one analysis, one file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from samoe.checkpoint import latest_checkpoint, load_checkpoint
from samoe.config import ROUTERS, SHARING, Config, micro_batch
from samoe.config_load import from_dict, load_config, to_dict
from samoe.data.prepare import load_splits
from samoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from samoe.errors import ConfigError, UserError
from samoe.fileio import write_text_atomic
from samoe.model.gpt import GPT
from samoe.moe.dispatch import MoERecord, record_moe
from samoe.plots import pyplot, save_png
from samoe.runs import load_run_config
from samoe.train.loop import StepHook, Trainer, new_trainer, restore_state, train_step
from samoe.train.perplexity import evaluate

DEFAULT_ROUTERS = ("switch", "gshard", "base", "hash")
DEFAULT_EXPERTS = (4, 8, 16, 32, 64)
DEFAULT_SHARING = ("private", "pool")
# The grid's base model unless --preset/--config say otherwise: the `tiny` preset deepened to
# four MoE layers sharing a pool of K = 2 (as the `default` preset does), 16 x 64 tokens per
# step in 4 micro-batches.
DEFAULT_PRESET = "tiny"
DEFAULT_OVERRIDES = ("model.n_layers=4", "model.moe.every=1", "model.moe.pool.size=2", "train.batch_size=16",
                     "train.micro_batch_size=4", "train.warmup_steps=10", "train.eval_tokens=8192")
GRID_KEYS = ("model.moe.router", "model.moe.num_experts", "model.moe.sharing", "train.max_steps")

STATS = {  # key in a cell's summary -> (plot title, y label, log y)
    "grad_norm_per_param": ("effective expert gradient norm per parameter", "‖ḡ‖ / √P", True),
    "param_grad_norm_per_param": ("stored expert parameters: gradient norm per parameter", "‖ḡ‖ / √P", True),
    "snr": ("gradient SNR across micro-batches (effective experts)", "SNR", False),
    "snr_debiased": ("SNR, noise-debiased (effective experts)", "‖μ̂‖ / σ̂", False),
    "param_snr": ("gradient SNR across micro-batches (stored parameters)", "SNR", False),
    "tokens_per_expert": ("tokens routed per expert per step", "tokens", True),
    "dead_frac": ("fraction of experts with no token in a step", "fraction", False),
    "load_cv": ("load imbalance (CV of tokens per expert)", "std / mean", False),
    "router_entropy_norm": ("router entropy / log E", "normalised entropy", False),
}


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


# --------------------------------------------------------------------------- one cell


def cell_name(router: str, num_experts: int, sharing: str) -> str:
    return f"{router}-E{num_experts}-{sharing}"


def cell_config(base: Config, router: str, num_experts: int, sharing: str) -> Config:
    d = to_dict(base)
    d["model"]["moe"].update(router=router, num_experts=num_experts, sharing=sharing, experts_per_layer=None)
    if sharing == "shared":  # the bank's size M is the E of every layer
        d["model"]["moe"]["shared_experts"] = num_experts
    try:
        return from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"grid cell {cell_name(router, num_experts, sharing)}: {e}") from None


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


def _check_micro_batches(t) -> int:
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
    n_micro = _check_micro_batches(cfg.train)
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


def run_cell(cfg: Config, splits, token_counts: np.ndarray | None, measure: float = 0.5,
             progress: bool = False, desc: str = "") -> dict:
    """Train cfg for cfg.train.max_steps steps and return the per-expert statistics (see the
    module docstring). `splits` from samoe.data.prepare.load_splits; `token_counts` [V] builds
    the frequency-balanced hash table (None: the seeded random map)."""
    t, m = cfg.train, cfg.model
    _check_micro_batches(t)
    torch.manual_seed(t.seed)
    model = GPT(m).train()
    if token_counts is not None and m.moe.hash_map == "balanced":
        model.set_token_frequencies(torch.from_numpy(token_counts))
    first_measured = min(t.max_steps - 1, int(t.max_steps * (1 - measure)))
    return measure_steps(new_trainer(cfg, model, splits.train), splits.val, t.max_steps, first_measured,
                         progress, desc)


# --------------------------------------------------------------------------- existing runs


def measure_run(run_dir: str | Path, steps: int, overrides: list[str] = (), progress: bool = False) -> dict:
    """The statistics of a trained run at its latest checkpoint: the run's next `steps` train
    steps (its data sampler, optimiser state and schedule restored), all measured, on CPU. The
    run directory is only read. `overrides` change the run's config for the measurement (e.g.
    train.micro_batch_size, when the run took one micro-batch per step)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, [*overrides, "train.device=cpu"])
    _check_micro_batches(cfg.train)
    if steps < 1:
        raise UserError(f"--steps {steps} is invalid; expected an integer >= 1")
    splits = load_splits(cfg.data, cfg.model.vocab_size, load_tokenizer(run_dir / TOKENIZER_FILE))
    model = GPT(cfg.model)
    ckpt = latest_checkpoint(run_dir)
    state = load_checkpoint(ckpt, model)
    tr = new_trainer(cfg, model, splits.train)
    restore_state(tr, state, ckpt)
    start = tr.step
    result = measure_steps(tr, splits.val, steps, 0, progress, run_dir.name)
    return {"run": str(run_dir), "checkpoint_step": start, "router": cfg.model.moe.router,
            "num_experts": cfg.model.moe.num_experts, "sharing": cfg.model.moe.sharing, **result}


def measure_runs(run_dirs: list[str], out: str | Path, steps: int, overrides: list[str] = (),
                 progress: bool = True) -> dict:
    """measure_run for each run directory; writes OUT/runs.json and returns it."""
    runs = [measure_run(r, steps, overrides, progress) for r in run_dirs]
    report = {"steps": steps, "overrides": list(overrides), "runs": runs}
    write_text_atomic(Path(out) / "runs.json", json.dumps(report, indent=1) + "\n")
    return report


def format_runs_table(report: dict) -> str:
    """The measured runs as a Markdown table (run, checkpoint step, router, sharing, E, TABLE_COLUMNS)."""
    head = ["run", "step", "router", "sharing", "E", *(h for _, h, _ in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["runs"]:
        lines.append("| " + " | ".join([Path(r["run"]).name, str(r["checkpoint_step"]), r["router"], r["sharing"],
                                        str(r["num_experts"]), *_table_values(r["summary"])]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the grid


def parse_list(text: str | None, name: str, cast=str) -> list:
    """'a,b,c' -> [a, b, c]; an empty list is a UserError (an empty grid)."""
    items = [s.strip() for s in (text or "").split(",") if s.strip()]
    if not items:
        raise UserError(f"{name} is empty: the grid needs at least one value")
    try:
        return [cast(s) for s in items]
    except ValueError:
        raise UserError(f"{name} = {text!r} is invalid; expected a comma-separated list of integers") from None


def check_grid(routers: list[str], experts: list[int], sharings: list[str]) -> None:
    for name, values in (("--routers", routers), ("--experts", experts), ("--sharing", sharings)):
        if not values:
            raise UserError(f"{name} is empty: the grid needs at least one value")
    for r in routers:
        if r not in ROUTERS:
            raise ConfigError(f"unknown router {r!r} in --routers; expected one of: {', '.join(ROUTERS)}")
    for s in sharings:
        if s not in SHARING:
            raise ConfigError(f"unknown sharing {s!r} in --sharing; expected one of: {', '.join(SHARING)}")
    for e in experts:
        if e < 1:
            raise ConfigError(f"expert count {e} in --experts is invalid; expected integers >= 1")


def settings_of(base: Config, measure: float, data_desc: str) -> dict:
    """What a cell's numbers depend on besides its grid coordinates (compared when resuming)."""
    d = to_dict(base)
    for key in GRID_KEYS[:3]:
        *path, last = key.split(".")
        node = d
        for p in path:
            node = node[p]
        node.pop(last)
    return {"config": d, "measure": measure, "data": data_desc}


def run_grid(base: Config, out: str | Path, routers: list[str], experts: list[int], sharings: list[str],
             measure: float = 0.5, progress: bool = True, log=print) -> dict:
    """Run (or resume) every cell of the grid; write cells, gradflow.json and PNGs under out."""
    check_grid(routers, experts, sharings)
    if not 0 < measure <= 1:
        raise UserError(f"--measure {measure} is invalid; expected a fraction in (0, 1]")
    _check_micro_batches(base.train)
    if not base.model.moe.enabled:
        raise ConfigError("model.moe.enabled = false: the grid's model has no MoE layers to analyse")
    out = Path(out)
    cells_dir = out / "cells"
    cells = [(r, e, s) for r in routers for e in experts for s in sharings]
    for r, e, s in cells:  # every cell's config is valid before anything runs
        cell_config(base, r, e, s)
    data_desc = base.data.path or f"built-in {base.data.corpus} corpus"
    settings = settings_of(base, measure, data_desc)
    done = {}
    for r, e, s in cells:
        path = cells_dir / f"{cell_name(r, e, s)}.json"
        if path.exists():
            try:
                result = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise UserError(f"grid cell file '{path}' is unreadable ({err}); delete it to rerun the cell") from None
            if result.get("settings") != settings:
                raise UserError(f"'{out}' holds grid cells run with other settings ({path.name}); "
                                "use another --out or delete its cells/")
            done[(r, e, s)] = result
    todo = [c for c in cells if c not in done]
    log(f"gradflow grid: {len(cells)} cells ({len(done)} already done, {len(todo)} to run) in {out}")
    if todo:
        splits = load_splits(base.data, base.model.vocab_size)
        vocab = splits.tokenizer.vocab_size
        if vocab != base.model.vocab_size:
            base = dataclasses.replace(base, model=dataclasses.replace(base.model, vocab_size=vocab))
        counts = np.bincount(np.asarray(splits.train.tokens, dtype=np.int64), minlength=vocab)
        bar = tqdm(total=len(cells), initial=len(done), desc="gradflow", unit="cell", disable=not progress,
                   dynamic_ncols=True)
        for r, e, s in todo:
            name = cell_name(r, e, s)
            bar.set_postfix_str(name)
            cfg = cell_config(base, r, e, s)
            result = run_cell(cfg, splits, counts, measure, progress, name)
            result = {"cell": {"router": r, "num_experts": e, "sharing": s}, **result, "settings": settings}
            write_text_atomic(cells_dir / f"{name}.json", json.dumps(result) + "\n")
            done[(r, e, s)] = result
            sm = result["summary"]
            bar.write(f"{name}: {result['wall_s']:.0f}s  grad/param {sm['grad_norm_per_param']:.2e}  "
                      f"snr {sm['snr'] or float('nan'):.3f}  dead {sm['dead_frac']:.2f}  val_loss {sm['val_loss']:.3f}")
            bar.update(1)
        bar.close()
    grid = {"routers": routers, "experts": experts, "sharing": sharings, "settings": settings,
            "cells": [done[c] for c in cells]}
    write_text_atomic(out / "gradflow.json", json.dumps(grid, indent=1) + "\n")
    plot_grid(grid, out)
    return grid


TABLE_COLUMNS = (  # (summary key, header, format)
    ("grad_norm_per_param", "grad/param", "{:.2e}"), ("param_grad_norm_per_param", "stored grad/param", "{:.2e}"),
    ("snr", "SNR", "{:.3f}"), ("snr_debiased", "SNR debiased", "{:.3f}"), ("param_snr", "stored SNR", "{:.3f}"),
    ("tokens_per_expert", "tokens/expert/step", "{:.1f}"), ("dead_frac", "dead", "{:.2f}"),
    ("load_cv", "load CV", "{:.2f}"), ("router_entropy_norm", "H/log E", "{:.3f}"),
    ("dropped_frac", "dropped", "{:.3f}"), ("val_loss", "val loss", "{:.3f}"),
)


def format_table(grid: dict) -> str:
    """The cells' summaries as a Markdown table (router, sharing, E, then TABLE_COLUMNS)."""
    head = ["router", "sharing", "E", *(h for _, h, _ in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {(r, s): i for i, (r, s) in enumerate((r, s) for r in grid["routers"] for s in grid["sharing"])}
    cells = sorted(grid["cells"], key=lambda c: (order[(c["cell"]["router"], c["cell"]["sharing"])],
                                                  c["cell"]["num_experts"]))
    for c in cells:
        lines.append("| " + " | ".join([c["cell"]["router"], c["cell"]["sharing"], str(c["cell"]["num_experts"]),
                                        *_table_values(c["summary"])]) + " |")
    return "\n".join(lines)


def _table_values(summary: dict) -> list[str]:
    return ["–" if summary.get(k) is None else fmt.format(summary[k]) for k, _, fmt in TABLE_COLUMNS]


# --------------------------------------------------------------------------- plots


def _draw_stat(ax, grid: dict, stat: str) -> None:
    title, ylabel, logy = STATS[stat]
    colors = dict(zip(grid["routers"], ["C0", "C1", "C2", "C3", "C4", "C5"]))
    styles = {"private": "-", "pool": "--", "shared": ":"}
    markers = {"private": "o", "pool": "s", "shared": "^"}
    for r in grid["routers"]:
        for s in grid["sharing"]:
            pts = [(c["cell"]["num_experts"], c["summary"][stat]) for c in grid["cells"]
                   if c["cell"]["router"] == r and c["cell"]["sharing"] == s and c["summary"].get(stat) is not None]
            if pts:
                pts.sort()
                ax.plot(*zip(*pts), styles.get(s, "-"), marker=markers.get(s, "o"), color=colors.get(r),
                        label=f"{r} / {s}", markersize=4, linewidth=1.3)
    if stat in ("snr", "param_snr") and grid["cells"]:
        n = grid["cells"][0]["micro_batches"]
        ax.axhline(1 / math.sqrt(n - 1), color="0.4", linestyle=":", linewidth=1,
                   label=f"pure noise: 1/√(n−1), n = {n}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid["experts"], [str(e) for e in grid["experts"]])
    if logy:
        ax.set_yscale("log")
    if stat in ("dead_frac", "router_entropy_norm"):
        ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("experts per layer E")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)


def plot_grid(grid: dict, out: str | Path) -> list[Path]:
    """One PNG per statistic (gradflow-STAT.png) and all of them in gradflow.png."""
    plt = pyplot()
    out = Path(out)
    paths = []
    for stat in STATS:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=90)
        _draw_stat(ax, grid, stat)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out / f"gradflow-{stat}.png")
        save_png(fig, paths[-1])
        plt.close(fig)
    fig, axes = plt.subplots(3, 3, figsize=(14, 10.5), dpi=64)
    for ax, stat in zip(axes.flat, STATS):
        _draw_stat(ax, grid, stat)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    paths.append(out / "gradflow.png")
    save_png(fig, paths[-1])
    plt.close(fig)
    return paths


def base_config(config: str | None, preset: str | None, overrides: list[str], steps: int | None) -> Config:
    """The grid's base config: --preset/--config (default: DEFAULT_PRESET + DEFAULT_OVERRIDES),
    then overrides, then --steps as train.max_steps."""
    extra = [] if (config or preset) else list(DEFAULT_OVERRIDES)
    extra += list(overrides)
    if steps is not None:
        extra.append(f"train.max_steps={steps}")
    return load_config(config, preset or (None if config else DEFAULT_PRESET), extra)
