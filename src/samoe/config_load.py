"""Configs from dicts, YAML files, presets and `key.path=value` overrides, validated, and back.

A run's config is the dataclass defaults (samoe.config), then `--preset`, then `--config FILE`,
then the overrides, then `validate`, which raises a ConfigError naming the field (dotted path)
and the values it allows.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from samoe.config import (
    ACTIVATIONS,
    BALANCES,
    CORPORA,
    DEVICES,
    DTYPES,
    EVAL_WINDOWS,
    GRANULARITIES,
    HASH_MAPS,
    LOGGERS,
    NORMS,
    POOL_INITS,
    POSITIONS,
    RESIDUAL_GATES,
    ROUTER_KINDS,
    ROUTERS,
    SAMPLINGS,
    SHARING,
    TOKENIZERS,
    Config,
    experts_per_layer,
    moe_layer_ids,
    router_top_k,
)
from samoe.errors import ConfigError
from samoe.fileio import write_text_atomic

PRESET_DIR = Path(__file__).parent / "configs"


# --------------------------------------------------------------------------- validation


def _check(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r} is invalid; expected {expected}")


def _choice(name: str, value, allowed: tuple) -> None:
    _check(value in allowed, name, "one of " + ", ".join(allowed), value)


def validate(cfg: Config) -> Config:
    """Reject impossible values with a ConfigError naming the field; return cfg."""
    m, moe, pool, t, d = cfg.model, cfg.model.moe, cfg.model.moe.pool, cfg.train, cfg.data
    for name, value in [("model.vocab_size", m.vocab_size), ("model.block_size", m.block_size),
                        ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                        ("model.d_model", m.d_model), ("train.max_steps", t.max_steps),
                        ("train.batch_size", t.batch_size), ("train.log_every", t.log_every),
                        ("train.eval_every", t.eval_every), ("train.ckpt_every", t.ckpt_every),
                        ("train.eval_tokens", t.eval_tokens)]:
        _check(value >= 1, name, "an integer >= 1", value)
    _check(m.d_model % m.n_heads == 0, "model.d_model", f"a multiple of model.n_heads = {m.n_heads}", m.d_model)
    if m.positions == "rotary":
        _check((m.d_model // m.n_heads) % 2 == 0, "model.d_model",
               "an even head size (d_model / n_heads) for rotary positions", m.d_model)
    for name, value in [("model.ffn_hidden", m.ffn_hidden), ("model.moe.ffn_hidden", moe.ffn_hidden),
                        ("model.moe.residual_hidden", moe.residual_hidden)]:
        _check(value is None or value >= 1, name, "an integer >= 1 or null", value)
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "a number in [0, 1)", m.dropout)
    _choice("model.activation", m.activation, ACTIVATIONS)
    _choice("train.eval_windows", t.eval_windows, EVAL_WINDOWS)
    _choice("data.sampling", d.sampling, SAMPLINGS)
    _choice("model.positions", m.positions, POSITIONS)
    _choice("model.norm", m.norm, NORMS)
    _check(m.norm_eps > 0, "model.norm_eps", "a number > 0", m.norm_eps)
    _check(m.rope_base > 1, "model.rope_base", "a number > 1", m.rope_base)
    _choice("model.moe.residual_gate", moe.residual_gate, RESIDUAL_GATES)

    _check(moe.every >= 1, "model.moe.every", "an integer >= 1", moe.every)
    _choice("model.moe.router", moe.router, ROUTERS)
    _choice("model.moe.sharing", moe.sharing, SHARING)
    _choice("model.moe.hash_map", moe.hash_map, HASH_MAPS)
    _choice("model.moe.balance", moe.balance, BALANCES)
    if moe.enabled and moe.balance == "pool":
        _check(moe.sharing == "shared", "model.moe.balance",
               "'layer' unless model.moe.sharing = 'shared' (only a bank every layer routes into is one pool)",
               moe.balance)
    if moe.enabled and moe.norm_router:
        _check(ROUTER_KINDS[moe.router].softmax_top_k and router_top_k(moe) > 1, "model.moe.norm_router",
               "false unless model.moe.router is gshard or topk with top_k > 1 (one gate renormalised is 1)",
               moe.norm_router)
    if moe.enabled and moe.pool.depth_embedding:
        _check(moe.sharing != "private", "model.moe.pool.depth_embedding",
               "false when model.moe.sharing = 'private' (it tells shared experts which layer calls them)",
               moe.pool.depth_embedding)
    _check(moe.num_experts >= 1, "model.moe.num_experts", "an integer >= 1", moe.num_experts)
    _check(moe.shared_experts >= 1, "model.moe.shared_experts", "an integer >= 1", moe.shared_experts)
    if moe.enabled:
        n_moe = len(moe_layer_ids(m))
        _check(n_moe >= 1, "model.moe.every", f"at most model.n_layers = {m.n_layers} so that some block is MoE",
               moe.every)
        if moe.experts_per_layer is not None:
            _check(moe.sharing != "shared", "model.moe.experts_per_layer",
                   "null when model.moe.sharing = 'shared' (the bank fixes E)", moe.experts_per_layer)
            _check(len(moe.experts_per_layer) == n_moe, "model.moe.experts_per_layer",
                   f"a list of {n_moe} expert counts, one per MoE layer", moe.experts_per_layer)
            _check(all(e >= 1 for e in moe.experts_per_layer), "model.moe.experts_per_layer",
                   "expert counts >= 1", moe.experts_per_layer)
        k = router_top_k(moe)
        smallest = min(experts_per_layer(m))
        _check(moe.top_k >= 1, "model.moe.top_k", "an integer >= 1", moe.top_k)
        uses_top_k = ROUTER_KINDS[moe.router].k is None
        _check(k <= smallest, "model.moe.top_k" if uses_top_k else "model.moe.num_experts",
               f"top_k = {k} (router {moe.router!r}) <= the number of experts ({smallest})",
               moe.top_k if uses_top_k else smallest)
    _check(moe.capacity_factor > 0, "model.moe.capacity_factor", "a number > 0", moe.capacity_factor)
    _check(moe.eval_capacity_factor > 0, "model.moe.eval_capacity_factor", "a number > 0", moe.eval_capacity_factor)
    _check(moe.min_capacity >= 0, "model.moe.min_capacity", "an integer >= 0", moe.min_capacity)
    _check(moe.jitter >= 0, "model.moe.jitter", "a number >= 0", moe.jitter)
    _check(moe.load_balance_weight >= 0, "model.moe.load_balance_weight", "a number >= 0", moe.load_balance_weight)
    _check(moe.z_loss_weight >= 0, "model.moe.z_loss_weight", "a number >= 0", moe.z_loss_weight)
    if moe.aux_free_bias:
        _check(ROUTER_KINDS[moe.router].softmax_top_k, "model.moe.aux_free_bias",
               "false unless model.moe.router is switch, gshard or topk", moe.aux_free_bias)
    _check(pool.size >= 1, "model.moe.pool.size", "an integer >= 1", pool.size)
    _check(pool.temperature > 0, "model.moe.pool.temperature", "a number > 0", pool.temperature)
    _check(pool.lr_scale > 0, "model.moe.pool.lr_scale", "a number > 0", pool.lr_scale)
    _choice("model.moe.pool.granularity", pool.granularity, GRANULARITIES)
    _choice("model.moe.pool.init", pool.init, POOL_INITS)

    _check(t.ep >= 1, "train.ep", "an integer >= 1", t.ep)
    if moe.enabled and t.ep > 1:
        uneven = [e for e in experts_per_layer(m) if e % t.ep]
        counts = sorted(set(experts_per_layer(m)))
        _check(not uneven, "train.ep", f"a divisor of every layer's expert count {counts}", t.ep)
    _check(t.micro_batch_size is None or (t.micro_batch_size >= 1 and t.batch_size % t.micro_batch_size == 0),
           "train.micro_batch_size", f"null or a divisor of train.batch_size = {t.batch_size}", t.micro_batch_size)
    _check(t.lr > 0, "train.lr", "a number > 0", t.lr)
    _check(0 <= t.min_lr <= t.lr, "train.min_lr", f"a number in [0, train.lr = {t.lr}]", t.min_lr)
    _check(t.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", t.warmup_steps)
    _check(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    _check(t.grad_clip >= 0, "train.grad_clip", "a number >= 0 (0 turns clipping off)", t.grad_clip)
    for i, name in enumerate(t.loggers):
        _choice(f"train.loggers[{i}]", name, LOGGERS)
    _choice("train.dtype", t.dtype, DTYPES)
    _choice("train.device", t.device, DEVICES)
    _choice("data.tokenizer", d.tokenizer, TOKENIZERS)
    _choice("data.corpus", d.corpus, CORPORA)
    _check(0 < d.val_fraction < 1, "data.val_fraction", "a number in (0, 1)", d.val_fraction)
    return cfg


# --------------------------------------------------------------------------- dict <-> dataclass


def _coerce(name: str, value, hint):
    """Check `value` against a field's type hint (int, float, bool, str, list[int], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, name)
    if origin is typing.Literal:  # a string first (as the field's type says), then one of the choices
        if not isinstance(value, str):
            raise ConfigError(f"{name} = {value!r} has the wrong type; expected a string")
        _choice(name, value, args)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} = {value!r} has the wrong type; expected a list")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4, without a dot, as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
        raise ConfigError(f"{name} = {value!r} has the wrong type; expected {expected}")
    return value


def _from_dict(cls, data, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise ConfigError(f"unknown config key {name!r}; expected one of: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(name, value, hints[key])
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    return validate(_from_dict(Config, data))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------- files and presets


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_dict(name: str) -> dict:
    """A preset's values; a preset with `base: OTHER` is OTHER's values with its own over them."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; expected one of: {', '.join(preset_names())}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    return _merge(preset_dict(base), data) if base else data


def parse_override(text: str) -> dict:
    """'model.moe.num_experts=8' -> {'model': {'moe': {'num_experts': 8}}}; values are YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, preset: str | None = None,
                overrides: list[str] = ()) -> Config:
    """Defaults <- preset <- YAML file <- `key.path=value` overrides, then validate."""
    data: dict = {}
    if preset:
        data = _merge(data, preset_dict(preset))
    if path:
        data = _merge(data, _read_yaml(Path(path)))
    for o in overrides:
        data = _merge(data, parse_override(o))
    return from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_paths(cls=Config, prefix: str = "") -> list[tuple[str, str]]:
    """Every overridable key with its default, for `--help`."""
    out = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += field_paths(hint, name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((name, repr(default)))
    return out
