"""A trained run's experts: `samoe analyze experts RUN_DIR`.

From the run's latest checkpoint, on its validation split (the first `max_tokens` tokens, in
the deterministic evaluation windows, eval mode — so token-choice routing is dropless (unless
the run set `model.moe.eval_dropless: false`, then capacity uses eval_capacity_factor) and
BASE routes greedily):

- **load**: per MoE layer, the tokens each expert received (kept (token, expert) slots, after
  capacity), their share, the fraction of tokens dropped by every slot, and the number of
  experts that received none;
- **similarity**: per MoE layer, the pairwise cosine similarity of the *effective* expert
  weights, each expert flattened to one vector (W1[e], b1[e], W2[e], b2[e]). For SaMoE these
  are the combined experts W_l[e] = Σ_k c_l[e,k]·P[k,e] that `PoolMixture.forward()`
  materialises; for private experts the layer's own; for a shared bank, the bank. The JSON
  also gives the mean off-diagonal similarity per layer, and `cross_layer_similarity`
  [L_moe, L_moe]: the mean over slots e of cos(expert e of layer l, expert e of layer l');
  for SaMoE also `pool_entry_similarity` [K, K]: the mean over e of cos(P[k, e], P[k', e]);
- **coefficients** (sharing = pool): each layer's c_l = softmax(a_l / τ), [K] per layer
  (granularity "layer") or [E, K] per layer (granularity "expert").

Writes OUT/experts.json and the PNGs OUT/experts-load.png, OUT/experts-similarity.png and
(SaMoE only) OUT/experts-coefficients.png, each atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from samoe.analysis.gradstats import routing_counts
from samoe.checkpoint import latest_checkpoint
from samoe.config import micro_batch
from samoe.data.prepare import load_splits
from samoe.errors import UserError
from samoe.fileio import write_text_atomic
from samoe.moe.dispatch import record_moe
from samoe.moe.experts import PoolMixture
from samoe.plots import pyplot, save_png
from samoe.runs import load_run_config, load_trained


def cosine_matrix(tensors) -> np.ndarray:
    """[E, E] cosine similarity of experts, each (W1[e], b1[e], W2[e], b2[e]) flattened."""
    flat = torch.cat([t.detach().float().reshape(t.shape[0], -1) for t in tensors], dim=1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.t()).cpu().numpy()


@torch.no_grad()
def expert_report(model, stream, batch_size: int, max_tokens: int | None) -> dict:
    """Load, similarity and coefficients of a model's MoE layers on a token stream."""
    layers = model.moe_layers()
    if not layers:
        raise UserError("the run's model has no MoE layers (model.moe.enabled = false): nothing to analyse")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = [torch.zeros(getattr(l.router, "num_experts", 0) or 1, dtype=torch.long) for l in layers]
    dropped, tokens = [0] * len(layers), 0
    for x, _ in stream.eval_batches(batch_size, model.cfg.block_size, max_tokens):
        with record_moe(model, effective=False) as rec:
            model(x.to(device))
        tokens += x.numel()
        for li, (routing, _, E) in enumerate(rec.calls):
            c = routing_counts(routing, E)
            counts[li] = c if counts[li].numel() != E else counts[li] + c
            dropped[li] += int(routing.dropped().sum())
    model.train(was_training)
    out_layers = []
    for li, layer in enumerate(layers):
        c = counts[li].numpy().astype(int)
        sim = cosine_matrix(layer.experts())
        E = sim.shape[0]
        off = sim[~np.eye(E, dtype=bool)] if E > 1 else np.zeros(0)
        entry = {"layer": li, "num_experts": E, "tokens_per_expert": c.tolist(),
                 "load_share": (c / max(1, c.sum())).tolist(), "dropped_frac": dropped[li] / max(1, tokens),
                 "experts_without_tokens": int((c == 0).sum()),
                 "cosine_similarity": sim.round(5).tolist(),
                 "mean_offdiag_similarity": float(off.mean()) if off.size else None,
                 "max_offdiag_similarity": float(off.max()) if off.size else None}
        if isinstance(layer.experts, PoolMixture):
            entry["coefficients"] = layer.experts.coefficients().detach().cpu().numpy().round(5).tolist()
        out_layers.append(entry)
    report = {"tokens": tokens, "layers": out_layers, "cross_layer_similarity": cross_layer_similarity(layers)}
    if getattr(model, "expert_pool", None) is not None:
        report["pool_entry_similarity"] = pool_entry_similarity(model.expert_pool)
    return report


@torch.no_grad()
def pool_entry_similarity(pool) -> list[list[float]]:
    """[K, K]: mean over experts e of cos(P[k, e], P[k', e]) for SaMoE's pool entries."""
    f = torch.cat([t.detach().float().reshape(t.shape[0], t.shape[1], -1) for t in pool()], dim=2)  # [K, E, P]
    f = f / f.norm(dim=2, keepdim=True).clamp_min(1e-12)
    return torch.einsum("aep,bep->ab", f, f).div(f.shape[1]).tolist()


@torch.no_grad()
def cross_layer_similarity(layers) -> list[list[float | None]]:
    """[L_moe, L_moe]: mean over expert slots e of cos(expert e of layer l, expert e of layer l')
    (None where the layers' expert counts differ). High for SaMoE layers mixing the same pool."""
    flats = []
    for layer in layers:
        w = layer.experts()
        f = torch.cat([t.detach().float().reshape(t.shape[0], -1) for t in w], dim=1)
        flats.append(f / f.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return [[float((a * b).sum(1).mean()) if a.shape == b.shape else None for b in flats] for a in flats]


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return (n + cols - 1) // cols, cols


def plot_report(report: dict, out: Path, title: str = "") -> list[Path]:
    plt = pyplot()
    layers = report["layers"]
    rows, cols = _grid(len(layers))
    paths = []

    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), dpi=80, squeeze=False,
                             layout="constrained")
    for ax, l in zip(axes.flat, layers):
        E = l["num_experts"]
        ax.bar(range(E), l["load_share"], color="C0")
        ax.axhline(1 / E, color="k", linestyle=":", linewidth=1, label="uniform")
        ax.set_title(f"MoE layer {l['layer']}: {l['experts_without_tokens']} idle, "
                     f"{100 * l['dropped_frac']:.1f}% dropped", fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("share of tokens", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"{title}expert load on {report['tokens']:,} validation tokens", fontsize=9)
    paths.append(out / "experts-load.png")
    save_png(fig, paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), dpi=80, squeeze=False,
                             layout="constrained")
    sims = [np.array(l["cosine_similarity"]) for l in layers]
    for s in sims:
        np.fill_diagonal(s, np.nan)  # 1 by definition; masked so the scale shows the off-diagonal
    lim = max([float(np.nanmax(np.abs(s))) for s in sims if s.size > 1 and not np.isnan(s).all()] or [1.0])
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    for ax, l, sim in zip(axes.flat, layers, sims):
        im = ax.imshow(sim, vmin=-lim, vmax=lim, cmap=cmap)
        mean = l["mean_offdiag_similarity"]
        ax.set_title(f"layer {l['layer']}" + (f": mean off-diag {mean:.3f}" if mean is not None else ""), fontsize=8)
        if sim.shape[0] <= 16:
            ax.set_xticks(range(sim.shape[0]))
            ax.set_yticks(range(sim.shape[0]))
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="cosine similarity")
    fig.suptitle(f"{title}cosine similarity of effective expert weights (diagonal masked)", fontsize=9)
    paths.append(out / "experts-similarity.png")
    save_png(fig, paths[-1])
    plt.close(fig)

    coefs = [l.get("coefficients") for l in layers]
    if all(c is not None for c in coefs):
        if np.array(coefs[0]).ndim == 1:  # granularity layer: one [L_moe, K] map
            fig, ax = plt.subplots(figsize=(2.4 + 0.6 * len(coefs[0]), 1.4 + 0.45 * len(coefs)), dpi=90,
                                   layout="constrained")
            axes_list, mats = [ax], [np.array(coefs)]
            labels = [("pool entry k", "MoE layer l")]
        else:  # granularity expert: [E, K] per layer
            fig, axs = plt.subplots(rows, cols, figsize=(2.8 * cols, 3.0 * rows), dpi=80, squeeze=False,
                                    layout="constrained")
            axes_list, mats = list(axs.flat), [np.array(c) for c in coefs]
            labels = [("pool entry k", f"expert e (layer {l['layer']})") for l in layers]
            for ax in axes_list[len(mats):]:
                ax.axis("off")
        for ax, mat, (xl, yl) in zip(axes_list, mats, labels):
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
            ax.set_xticks(range(mat.shape[1]))
            if mat.shape[0] <= 16:
                ax.set_yticks(range(mat.shape[0]))
                if mat.shape[1] <= 8:
                    for (i, j), v in np.ndenumerate(mat):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if v < 0.6 else "black")
            ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=axes_list, label="c = softmax(a / τ)")
        fig.suptitle(f"{title}SaMoE coefficients", fontsize=9)
        paths.append(out / "experts-coefficients.png")
        save_png(fig, paths[-1])
        plt.close(fig)
    return paths


def analyze_experts(run_dir: str | Path, out: str | Path, max_tokens: int | None = 65536,
                    device: str = "auto") -> dict:
    """Load the run's latest checkpoint, route its validation tokens, write JSON and PNGs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' does not exist")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens} is invalid; expected an integer >= 1")
    load_run_config(run_dir)  # CheckpointError: not a run directory (no config.yaml)
    latest_checkpoint(run_dir)  # CheckpointError: a run without a checkpoint
    cfg, model, tok = load_trained(run_dir, device)
    stream = load_splits(cfg.data, cfg.model.vocab_size, tok).val
    batch = micro_batch(cfg.train)
    report = expert_report(model, stream, batch, max_tokens)
    moe = cfg.model.moe
    report = {"run_dir": str(run_dir), "router": moe.router, "sharing": moe.sharing,
              "pool": {"size": moe.pool.size, "granularity": moe.pool.granularity} if moe.sharing == "pool" else None,
              **report}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "experts.json", json.dumps(report) + "\n")
    report["plots"] = [str(p) for p in plot_report(report, out, f"{moe.router} / {moe.sharing}: ")]
    return report


def format_report(report: dict, out: str | Path) -> str:
    """What `samoe analyze experts` prints: per layer its load, drops, similarity and
    coefficients; the similarity across layers and pool entries; where the files are."""
    lines = []
    for layer in report["layers"]:
        counts = layer["tokens_per_expert"]
        coef = layer.get("coefficients")
        lines.append(f"MoE layer {layer['layer']}: tokens per expert {counts}, dropped "
                     f"{100 * layer['dropped_frac']:.1f}%, mean off-diagonal cosine "
                     f"{layer['mean_offdiag_similarity'] or 0:.3f}"
                     + (f", coefficients {[round(c, 3) for c in coef]}" if coef and not isinstance(coef[0], list)
                        else ""))
    cross = [v for i, row in enumerate(report["cross_layer_similarity"]) for j, v in enumerate(row)
             if i < j and v is not None]
    if cross:
        lines.append(f"same expert slot across layers: cosine {min(cross):.3f} to {max(cross):.3f}")
    if "pool_entry_similarity" in report:
        sim = report["pool_entry_similarity"]
        off = [v for i, row in enumerate(sim) for j, v in enumerate(row) if i < j]
        if off:
            lines.append(f"pool entries P[k, e] vs P[k', e]: mean cosine {sum(off) / len(off):.3f}")
    lines.append(f"{len(report['layers'])} MoE layers, {report['tokens']:,} validation tokens; "
                 f"results in {out}/experts.json, plots in {out}/experts-*.png")
    return "\n".join(lines)
