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
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from samoe.analysis.gradstats import check_micro_batches, measure_steps
from samoe.checkpoint import latest_checkpoint
from samoe.config import ROUTERS, SHARING, Config
from samoe.config_load import from_dict, load_config, to_dict
from samoe.data.prepare import load_splits
from samoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from samoe.errors import ConfigError, UserError
from samoe.fileio import write_text_atomic
from samoe.model.gpt import GPT
from samoe.plots import pyplot, save_png
from samoe.runs import load_run_config
from samoe.train.loop import new_trainer
from samoe.train.run import restore

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
    check_micro_batches(t)
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
    check_micro_batches(cfg.train)
    if steps < 1:
        raise UserError(f"--steps {steps} is invalid; expected an integer >= 1")
    splits = load_splits(cfg.data, cfg.model.vocab_size, load_tokenizer(run_dir / TOKENIZER_FILE))
    model = GPT(cfg.model)
    tr = new_trainer(cfg, model, splits.train)
    restore(tr, latest_checkpoint(run_dir))
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
    check_micro_batches(base.train)
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
