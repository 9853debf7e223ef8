"""FLOPs, PF-days and all-to-all traffic of a config, and FLOPs- or parameter-matched dense configs.

Forward FLOPs per token count matrix multiplies only, 2 FLOPs per multiply-add (as
torch.utils.flop_counter.FlopCounterMode does); norms, activations, softmax, bias adds,
residual adds and embedding lookups are left out. With d the width, S = block_size, V the
vocabulary, L blocks of which L_moe are MoE (E_l experts in MoE layer l), k experts per token:

    attention projections   L · 8·d²               qkv 2·d·3d + output 2·d·d
    attention scores        L · 4·S·d              QKᵀ and A·V over the full S×S window
    dense FFN               L_dense · F(f)  (+ L_moe · (F(f) + 4·d) for PR-MoE's dense branch)
    router                  Σ_l 2·d·E_l            (0 for hash routing)
    experts                 Σ_l k · F(f_e)         k slots per token, capacity drops ignored;
                                                   expert choice: k = E_l·C/T slots per token
    pool combination        Σ_l 2·K·E_l·P_e / T    SaMoE only: W_l[e] = Σ_k c[k]·P[k, e] is
                                                   elementwise, once per forward of T tokens
    LM head                 2·d·V

where F(f) = 2·d·h + 2·f·d is one FFN of hidden width f (h = f for gelu, 2f for swiglu),
P_e = d·h + h + f·d + d one expert's parameters, and T the tokens of one forward pass (one
micro-batch: `--batch-tokens`). Attention scores are counted over the whole S×S window, as
FlopCounterMode and Chinchilla count them; causal masking lets a kernel skip about half.

    training FLOPs per token = 3 × forward        (backward ≈ 2 × forward: Kaplan et al. 2020)
    PF-days = training FLOPs per token × tokens / 8.64e19      (1 PF-day = 1e15 FLOP/s · 86400 s)

All-to-all bytes per token per MoE layer under expert parallelism = dispatch + combine
= 2 · k · d · bytes(dtype), assuming every routed copy of a token crosses the network once
each way: an upper bound when some of a token's experts live on its own rank (and dropped
copies send nothing). SaMoE adds nothing to it: expert e of every layer combines the pool
entries P[:, e], which live where expert e lives.
"""

from __future__ import annotations

import copy
from pathlib import Path

from samoe.config import (
    ROUTER_KINDS,
    Config,
    ModelConfig,
    expert_hidden,
    experts_per_layer,
    fc1_width,
    ffn_hidden,
    micro_batch,
    moe_layer_ids,
    residual_hidden,
    router_top_k,
)
from samoe.config_load import load_config, save_config
from samoe.errors import ConfigError
from samoe.model.params import count_config_params
from samoe.moe.routers import capacity

PF_DAY = 1e15 * 86400  # 8.64e19 FLOPs
TRAIN_MULTIPLIER = 3  # forward + backward (2 × forward)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
COMPONENTS = ("attention_proj", "attention_scores", "dense_ffn", "router", "experts", "pool_combination",
              "lm_head")


def _ffn_flops(m: ModelConfig, hidden: int) -> int:
    """F(f): matmul FLOPs of one FFN of hidden width f for one token."""
    h = fc1_width(m.activation, hidden)
    return 2 * m.d_model * h + 2 * hidden * m.d_model


def _expert_params(m: ModelConfig, hidden: int) -> int:
    h = fc1_width(m.activation, hidden)
    return m.d_model * h + h + hidden * m.d_model + m.d_model


def slots_per_token(m: ModelConfig, num_experts: int, batch_tokens: int) -> float:
    """Experts each token visits: k for token-choice routers; E·C/T for expert choice."""
    moe, k = m.moe, router_top_k(m.moe)
    if ROUTER_KINDS[moe.router].token_choice:
        return float(k)
    cap = min(batch_tokens, capacity(batch_tokens, num_experts, k, moe.capacity_factor, moe.min_capacity))
    return num_experts * cap / batch_tokens


def forward_flops(m: ModelConfig, batch_tokens: int) -> dict[str, float]:
    """Forward matmul FLOPs per token by component (see the module docstring)."""
    d, L, moe = m.d_model, m.n_layers, m.moe
    moe_ids = moe_layer_ids(m)
    n_exp = experts_per_layer(m) if moe_ids else []  # a dense model may keep a stale pyramid list
    f, f_e = ffn_hidden(m), expert_hidden(m)
    out: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
    out["attention_proj"] = L * 8 * d * d
    out["attention_scores"] = L * 4 * m.block_size * d
    out["dense_ffn"] = (L - len(moe_ids)) * _ffn_flops(m, f)
    out["lm_head"] = 2 * d * m.vocab_size
    for E in n_exp:
        if moe.residual:
            gates = 2 if moe.residual_gate == "softmax" else 1  # the branch's gate: softmax over two, or a sigmoid
            out["dense_ffn"] += _ffn_flops(m, residual_hidden(m)) + 2 * d * gates
        if ROUTER_KINDS[moe.router].learned:
            out["router"] += 2 * d * E
        out["experts"] += slots_per_token(m, E, batch_tokens) * _ffn_flops(m, f_e)
        if moe.sharing == "pool":
            out["pool_combination"] += 2 * moe.pool.size * E * _expert_params(m, f_e) / batch_tokens
    return {k: float(v) for k, v in out.items()}


def default_batch_tokens(cfg: Config) -> int:
    """Tokens of one forward pass: a micro-batch of sequences of block_size tokens."""
    return micro_batch(cfg.train) * cfg.model.block_size


def default_tokens(cfg: Config) -> int:
    """The configured training budget: max_steps × batch_size × block_size."""
    return cfg.train.max_steps * cfg.train.batch_size * cfg.model.block_size


def a2a_bytes_per_token_per_layer(m: ModelConfig, dtype: str, batch_tokens: int) -> float:
    """2 · k · d · bytes(dtype) (mean over MoE layers for expert choice with a pyramid); 0 if dense."""
    n_exp = experts_per_layer(m) if m.moe.enabled else []
    if not n_exp:
        return 0.0
    k = sum(slots_per_token(m, E, batch_tokens) for E in n_exp) / len(n_exp)
    return 2 * k * m.d_model * DTYPE_BYTES[dtype]


def flops_report(cfg: Config, tokens: int | None = None, batch_tokens: int | None = None) -> dict:
    """Everything `samoe flops` prints, as a JSON-ready dict."""
    tokens = default_tokens(cfg) if tokens is None else tokens
    batch_tokens = default_batch_tokens(cfg) if batch_tokens is None else batch_tokens
    if tokens < 0:
        raise ConfigError(f"--tokens {tokens} is invalid; expected an integer >= 0")
    if batch_tokens < 1:
        raise ConfigError(f"--batch-tokens {batch_tokens} is invalid; expected an integer >= 1")
    m = cfg.model
    comps = forward_flops(m, batch_tokens)
    fwd = sum(comps.values())
    train = TRAIN_MULTIPLIER * fwd
    a2a = {dt: a2a_bytes_per_token_per_layer(m, dt, batch_tokens) for dt in DTYPE_BYTES}
    n_moe = len(moe_layer_ids(m))
    return {
        "forward_flops_per_token": fwd,
        "train_flops_per_token": train,
        "components": comps,
        "tokens": tokens,
        "batch_tokens": batch_tokens,
        "train_flops": train * tokens,
        "pf_days": train * tokens / PF_DAY,
        "moe_layers": n_moe,
        "dtype": cfg.train.dtype,
        "a2a_bytes_per_token_per_layer": a2a[cfg.train.dtype],
        "a2a_bytes_per_token": a2a[cfg.train.dtype] * n_moe,
        "a2a_bytes_per_token_per_layer_by_dtype": a2a,
    }


def run_summary_flops(cfg: Config, tokens: int) -> dict:
    """The FLOPs keys of a run's summary.json, for the tokens it trained on."""
    r = flops_report(cfg, tokens)
    return {k: r[k] for k in ("train_flops_per_token", "train_flops", "pf_days")}


def format_report(r: dict) -> str:
    fwd = r["forward_flops_per_token"]
    rows = [("forward FLOPs per token", f"{fwd:,.0f}", "share")]
    rows += [(f"  {name}", f"{v:,.0f}", f"{v / fwd:.1%}") for name, v in r["components"].items()]
    rows += [("train FLOPs per token (3x)", f"{r['train_flops_per_token']:,.0f}", ""),
             ("tokens", f"{r['tokens']:,}", ""),
             ("train FLOPs", f"{r['train_flops']:.4g}", ""),
             ("PF-days", f"{r['pf_days']:.4g}", "")]
    out = [f"{a:<28}{b:>20}  {c:>6}".rstrip() for a, b, c in rows]
    out.append(f"(pool combination amortised over {r['batch_tokens']:,} tokens per forward pass)")
    if r["moe_layers"]:
        by = r["a2a_bytes_per_token_per_layer_by_dtype"]
        out.append("all-to-all bytes per token per MoE layer (dispatch + combine): "
                   + ", ".join(f"{v:,.0f} at {dt}" for dt, v in by.items())
                   + f"; all {r['moe_layers']} MoE layers: {r['a2a_bytes_per_token']:,.0f} at {r['dtype']}")
    return "\n".join(out)


# --------------------------------------------------------------------------- targets


# --------------------------------------------------------------------------- matched dense configs


def _dense_with_width(cfg: Config, width: int) -> Config:
    out = copy.deepcopy(cfg)
    out.model.moe.enabled = False
    out.model.ffn_hidden = width
    return out


def _solve_width(value_at, target: float) -> int:
    """The FFN width w >= 1 with value_at(w) closest to target, value_at affine in w."""
    a, b = value_at(1), value_at(2)
    return max(1, round(1 + (target - a) / (b - a)))


def match_dense(cfg: Config, batch_tokens: int | None = None) -> tuple[Config, Config]:
    """(dense config with the MoE's training FLOPs per token, dense config with its total parameters).

    Both are the MoE config with every FFN dense (moe.enabled = false) and one FFN width for all
    blocks, solved for: the FLOPs match absorbs k experts of width f_e, routers and the
    amortised pool combination; the parameter match absorbs all experts.
    """
    if not cfg.model.moe.enabled:
        raise ConfigError("model.moe.enabled = false: the config is already dense; expected an MoE config")
    bt = default_batch_tokens(cfg) if batch_tokens is None else batch_tokens
    target_flops = sum(forward_flops(cfg.model, bt).values())
    w_flops = _solve_width(lambda w: sum(forward_flops(_dense_with_width(cfg, w).model, bt).values()), target_flops)
    target_params = count_config_params(cfg.model)["total"]
    w_params = _solve_width(lambda w: count_config_params(_dense_with_width(cfg, w).model)["total"], target_params)
    return _dense_with_width(cfg, w_flops), _dense_with_width(cfg, w_params)


def write_matched(cfg: Config, name: str, out_dir: str | Path) -> dict[str, Path]:
    """Write <name>-dense-flops.yaml and <name>-dense-params.yaml into out_dir; return their paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out '{out_dir}' is a file; expected a directory")
    flops_cfg, params_cfg = match_dense(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"flops": out_dir / f"{name}-dense-flops.yaml", "params": out_dir / f"{name}-dense-params.yaml"}
    save_config(flops_cfg, paths["flops"])
    save_config(params_cfg, paths["params"])
    return paths


def format_matched(cfg: Config, paths: dict[str, Path]) -> str:
    """What `samoe match-dense` prints: the MoE and its dense matches (write_matched's paths),
    one line each with FFN width, training FLOPs per token and parameters."""
    lines = []
    for label, c in [("moe", cfg), *((k, load_config(p)) for k, p in paths.items())]:
        where = f"  {paths[label]}" if label in paths else ""
        lines.append(f"{label:<7} ffn_hidden {c.model.ffn_hidden or 4 * c.model.d_model:>8}  "
                     f"train FLOPs/token {flops_report(c)['train_flops_per_token']:>16,.0f}  "
                     f"params {count_config_params(c.model)['total']:>16,}{where}")
    return "\n".join(lines)
