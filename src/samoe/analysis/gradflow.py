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

Mechanism: `record_moe()` temporarily replaces `samoe.moe.layer.dispatch` with a wrapper that
keeps each layer's routing and hands the fast grouped path the effective weights as
non-leaf tensors (combined from the pool with an einsum when there is one), so
`torch.autograd.grad` can return their gradients. Nothing in the model changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

import samoe.moe.layer as layer_mod
from samoe.config import ROUTERS, SHARING, Config, from_dict, load_config, micro_batch, to_dict
from samoe.data.prepare import load_splits
from samoe.errors import ConfigError, UserError
from samoe.eval.perplexity import evaluate
from samoe.fileio import write_text_atomic
from samoe.model.gpt import GPT
from samoe.moe.grouped import ExpertSource
from samoe.train.optim import build_optimizer, lr_at, set_lr

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


# --------------------------------------------------------------------------- recording hook


class MoERecord:
    """What one forward pass routed: per MoE layer (in order), its Routing and effective weights."""

    def __init__(self):
        self.calls: list[tuple] = []  # (routing, [w1, b1, w2, b2] effective, num_experts)

    def clear(self) -> None:
        self.calls.clear()


def _effective(source: ExpertSource) -> list[Tensor]:
    """The layer's expert stacks (W1, b1, W2, b2), [E, ...]: combined from the pool when the
    source carries coefficients, else a view of the stacks (a non-leaf whose gradient is the
    layer's own contribution, also for a bank shared by several layers)."""
    if source.coef is None:
        return [t.view_as(t) for t in source.tensors()]
    spec = "k" if source.coef.dim() == 1 else "ek"
    return [torch.einsum(f"{spec},ke...->e...", source.coef.to(p.dtype), p) for p in source.tensors()]


@contextmanager
def record_moe(effective: bool = True):
    """Within the block, every MoE layer's forward appends (routing, effective weights, E) to
    the yielded MoERecord. With effective=False the weights are not touched (routing only)."""
    record = MoERecord()
    original = layer_mod.dispatch

    def dispatch(x, routing, source, activation):
        if not isinstance(source, ExpertSource):
            source = ExpertSource(*source)
        E = source.w1.shape[-3]
        if effective:
            weights = _effective(source)
            source = ExpertSource(*weights)
        else:
            weights = None
        record.calls.append((routing, weights, E))
        return original(x, routing, source, activation)

    layer_mod.dispatch = dispatch
    try:
        yield record
    finally:
        layer_mod.dispatch = original


def routing_counts(routing, num_experts: int) -> Tensor:
    """Kept (token, expert) slots per expert: [E] int64."""
    return torch.bincount(routing.expert[routing.keep].reshape(-1), minlength=num_experts).cpu()


def router_entropy(routing) -> float:
    """Mean over tokens of the router distribution's entropy (nats); 0 for hash routing."""
    if routing.probs is None:
        return 0.0
    p = routing.probs.detach().float()
    return float(-(p * p.clamp_min(1e-20).log()).sum(-1).mean())


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


def run_cell(cfg: Config, splits, token_counts: np.ndarray | None, measure: float = 0.5,
             progress: bool = False, desc: str = "") -> dict:
    """Train cfg for cfg.train.max_steps steps and return the per-expert statistics (see the
    module docstring). `splits` from samoe.data.prepare.load_splits; `token_counts` [V] builds
    the frequency-balanced hash table (None: the seeded random map)."""
    t, m = cfg.train, cfg.model
    device = torch.device("cpu")
    torch.manual_seed(t.seed)
    data_gen = torch.Generator().manual_seed(t.seed)
    model = GPT(m).to(device).train()
    if token_counts is not None and m.moe.hash_map == "balanced":
        model.set_token_frequencies(torch.from_numpy(token_counts))
    optimizer = build_optimizer(model, t, coef_lr_scale=cfg.model.moe.pool.lr_scale)
    params = [p for p in model.parameters() if p.requires_grad]
    layers = model.moe_layers()
    if not layers:
        raise ConfigError("the grid's model has no MoE layers (model.moe.enabled = false?)")
    sharing = m.moe.sharing
    groups, unit_desc = _stored_units(model, sharing)
    group_idx = [[next(i for i, p in enumerate(params) if p is w) for w in g] for g in groups]
    micro = micro_batch(t)
    n_micro = t.batch_size // micro
    if n_micro < 2:
        raise ConfigError("analyze gradflow needs at least 2 micro-batches per step for the SNR: "
                          f"train.micro_batch_size ({micro}) must be at most half of train.batch_size ({t.batch_size})")
    first_measured = min(t.max_steps - 1, int(t.max_steps * (1 - measure)))

    eff_acc = stored_acc = None
    tokens_sum = [np.zeros(0)] * len(layers)
    dead, cv, entropy, entropy_norm, dropped, losses = [], [], [], [], [], []
    wall0 = time.time()
    bar = tqdm(total=t.max_steps, desc=desc, unit="step", leave=False, disable=not progress, dynamic_ncols=True)
    for step in range(t.max_steps):
        lr = lr_at(step, t)
        set_lr(optimizer, lr)
        x, y = splits.train.sample_batch(t.batch_size, m.block_size, data_gen)
        measuring = step >= first_measured
        counts = None
        step_loss = 0.0
        for xm, ym in zip(x.split(micro), y.split(micro)):
            with record_moe(effective=measuring) as rec:
                out = model(xm, ym)
            loss = out.loss + out.aux_loss
            weights = [w for _, ws, _ in rec.calls for w in (ws or [])]
            grads = torch.autograd.grad(loss, params + weights, allow_unused=True)
            for p, g in zip(params, grads[: len(params)]):
                if g is not None:
                    g = g / n_micro
                    p.grad = g if p.grad is None else p.grad.add_(g)
            step_loss += out.loss.item() / n_micro
            if not measuring:
                continue
            eff_grads = grads[len(params):]
            c = [routing_counts(r, E) for r, _, E in rec.calls]
            counts = c if counts is None else [a + b for a, b in zip(counts, c)]
            if eff_acc is None:
                eff_acc = [_SNRAccumulator(E, sum(w[0].numel() for w in ws)) for _, ws, E in rec.calls]
                stored_acc = []
                for g in groups:
                    units = math.prod(g[0].shape[: g[0].dim() - 2])
                    stored_acc.append(_SNRAccumulator(units, sum(w.numel() for w in g) // units))
            for li, (routing, ws, E) in enumerate(rec.calls):
                eff_acc[li].add(_rows(list(eff_grads[4 * li: 4 * li + 4]), ws, 1))
                entropy.append(router_entropy(routing))
                entropy_norm.append(entropy[-1] / math.log(E) if E > 1 else 0.0)
                dropped.append(float((~routing.keep.any(dim=1)).float().mean()))
            for gi, g in enumerate(groups):
                lead = g[0].dim() - 2
                stored_acc[gi].add(_rows([grads[i] for i in group_idx[gi]], g, lead))
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_router_biases()
        losses.append(step_loss)
        if measuring:
            for acc in (*eff_acc, *stored_acc):
                acc.end_step()
            for li, c in enumerate(counts):
                cn = c.numpy().astype(float)
                tokens_sum[li] = cn if not tokens_sum[li].size else tokens_sum[li] + cn
                dead.append(float((cn == 0).mean()))
                cv.append(float(cn.std() / cn.mean()) if cn.mean() > 0 else 0.0)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        bar.update(1)
    bar.close()
    measured = t.max_steps - first_measured
    val = evaluate(model, splits.val, np.ones(m.vocab_size, dtype=np.int64), micro, t.eval_tokens)

    per_layer = []
    for li in range(len(layers)):
        r = eff_acc[li].result()
        per_layer.append({"tokens_per_step": (tokens_sum[li] / measured).tolist(), **r,
                          "dead_frac": float(np.mean(dead[li::len(layers)]))})
    stored = [a.result() for a in stored_acc]

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
        "dead_frac": float(np.mean(dead)),
        "load_cv": float(np.mean(cv)),
        "router_entropy": float(np.mean(entropy)),
        "router_entropy_norm": float(np.mean(entropy_norm)),
        "dropped_frac": float(np.mean(dropped)),
        "train_loss_last10": float(np.mean(losses[-10:])),
        "val_loss": val["val_loss"],
    }
    return {"summary": summary, "per_layer": per_layer,
            "stored": {"units": unit_desc, "groups": stored},
            "steps": t.max_steps, "measured_steps": measured, "micro_batches": n_micro,
            "wall_s": round(time.time() - wall0, 2)}


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
    micro = micro_batch(base.train)
    if base.train.batch_size // micro < 2:
        raise ConfigError("analyze gradflow needs at least 2 micro-batches per step for the SNR: "
                          f"train.micro_batch_size ({micro}) must be at most half of train.batch_size "
                          f"({base.train.batch_size})")
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
        sm = c["summary"]
        vals = ["–" if sm.get(k) is None else fmt.format(sm[k]) for k, _, fmt in TABLE_COLUMNS]
        lines.append("| " + " | ".join([c["cell"]["router"], c["cell"]["sharing"], str(c["cell"]["num_experts"]),
                                        *vals]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    """Write a figure atomically (temp name + rename)."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=fig.dpi)
    tmp.replace(path)


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
    plt = _pyplot()
    out = Path(out)
    paths = []
    for stat in STATS:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=90)
        _draw_stat(ax, grid, stat)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out / f"gradflow-{stat}.png")
        _save_png(fig, paths[-1])
        plt.close(fig)
    fig, axes = plt.subplots(3, 3, figsize=(14, 10.5), dpi=64)
    for ax, stat in zip(axes.flat, STATS):
        _draw_stat(ax, grid, stat)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    paths.append(out / "gradflow.png")
    _save_png(fig, paths[-1])
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
