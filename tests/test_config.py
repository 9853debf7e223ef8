"""Configs: defaults and presets that validate, overrides, YAML round trip, and a ConfigError
naming the field (dotted path) and the allowed values for every bad value."""

import dataclasses

import pytest

from samoe.config import Config, ModelConfig, MoEConfig, experts_per_layer, moe_layer_ids, router_top_k
from samoe.config_load import field_paths, from_dict, load_config, preset_names, save_config, to_dict, validate
from samoe.errors import ConfigError, UserError


def bad(*overrides, preset="tiny"):
    """The ConfigError message for these overrides."""
    with pytest.raises(ConfigError) as info:
        load_config(preset=preset, overrides=list(overrides))
    return str(info.value)


def test_defaults_and_every_preset_validate():
    assert validate(Config()) == Config()
    assert set(preset_names()) >= {"tiny", "default", "350m-moe128", "350m-samoe128-k2"}
    for name in preset_names():
        assert isinstance(load_config(preset=name), Config)
    assert load_config() == Config()


def test_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  n_layers: 6\n  moe:\n    num_experts: 6\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, preset="tiny", overrides=["model.moe.num_experts=3", "train.min_lr=0.001"])
    assert cfg.model.d_model == 64  # from the preset
    assert cfg.model.n_layers == 6 and cfg.train.lr == 0.01  # the file over the preset
    assert cfg.model.moe.num_experts == 3 and cfg.train.min_lr == 0.001  # overrides over the file
    assert cfg.model.moe.pool.size == 2  # nested keys merge, not replace


def test_override_values_are_yaml():
    cfg = load_config(preset="tiny", overrides=["model.moe.experts_per_layer=[2, 3]", "model.ffn_hidden=null",
                                                "model.moe.dropless=true", "model.moe.capacity_factor=2"])
    assert cfg.model.moe.experts_per_layer == [2, 3]
    assert cfg.model.ffn_hidden is None and cfg.model.moe.dropless is True
    assert cfg.model.moe.capacity_factor == 2.0 and isinstance(cfg.model.moe.capacity_factor, float)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 3e-4 as a string; a float field takes it as the number."""
    assert load_config(overrides=["train.lr=3e-4", "train.min_lr=1E-5"]).train.lr == 3e-4
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-3\n")
    assert load_config(path).train.lr == 2e-3


@pytest.mark.parametrize("preset", ["tiny", "default", "350m-samoe128-k2"])
def test_yaml_round_trip(tmp_path, preset):
    cfg = load_config(preset=preset, overrides=["model.moe.experts_per_layer=null", "train.micro_batch_size=2",
                                                "model.moe.pool.temperature=0.5", "data.path=corpus dir/a.txt"])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left


def test_derived_values():
    m = load_config(preset="default").model
    assert moe_layer_ids(m) == [0, 1, 2, 3]
    m = ModelConfig(n_layers=6, moe=MoEConfig(every=2))
    assert moe_layer_ids(m) == [1, 3, 5] and experts_per_layer(m) == [8, 8, 8]
    m.moe.sharing = "shared"
    assert experts_per_layer(m) == [16, 16, 16]
    m.moe.enabled = False
    assert moe_layer_ids(m) == []
    assert [router_top_k(MoEConfig(router=r, top_k=3)) for r in ("switch", "gshard", "topk", "base", "hash",
                                                                 "expert_choice")] == [1, 2, 3, 1, 1, 3]


def test_field_paths_list_every_leaf():
    paths = dict(field_paths())
    assert paths["model.moe.pool.size"] == "2" and paths["train.lr"] == "0.003"
    assert len(paths) == sum(1 for _ in _leaves(to_dict(Config())))


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides,field,allowed", [
    (["model.moe.router=topk", "model.moe.top_k=5"], "model.moe.top_k", "the number of experts (4)"),
    (["model.moe.router=expert_choice", "model.moe.top_k=0"], "model.moe.top_k", ">= 1"),
    (["model.moe.router=gshard", "model.moe.num_experts=1"], "model.moe.num_experts", "top_k = 2"),
    (["model.moe.capacity_factor=0"], "model.moe.capacity_factor", "> 0"),
    (["model.moe.capacity_factor=-1.5"], "model.moe.capacity_factor", "> 0"),
    (["model.moe.eval_capacity_factor=0"], "model.moe.eval_capacity_factor", "> 0"),
    (["model.d_model=65"], "model.d_model", "a multiple of model.n_heads = 2"),
    (["model.positions=rotary", "model.d_model=6", "model.n_heads=2"], "model.d_model", "even head size"),
    (["model.moe.pool.size=0"], "model.moe.pool.size", ">= 1"),
    (["model.moe.residual_hidden=0"], "model.moe.residual_hidden", ">= 1 or null"),
    (["model.moe.pool.temperature=0"], "model.moe.pool.temperature", "> 0"),
    (["model.moe.router=mixtral"], "model.moe.router", "switch, gshard, topk, base, hash, expert_choice"),
    (["model.moe.sharing=global"], "model.moe.sharing", "private, pool, shared"),
    (["model.moe.pool.init=random"], "model.moe.pool.init", "uniform, noisy, cycle, sequence"),
    (["model.moe.pool.granularity=token"], "model.moe.pool.granularity", "layer, expert"),
    (["model.activation=relu"], "model.activation", "gelu, swiglu"),
    (["model.positions=alibi"], "model.positions", "learned, rotary"),
    (["model.moe.hash_map=modulo"], "model.moe.hash_map", "balanced, random"),
    (["model.moe.experts_per_layer=[4, 4, 4]"], "model.moe.experts_per_layer", "a list of 2 expert counts"),
    (["model.moe.experts_per_layer=[4, 0]"], "model.moe.experts_per_layer", ">= 1"),
    (["model.moe.experts_per_layer=[4, 4]", "model.moe.sharing=shared"], "model.moe.experts_per_layer", "null"),
    (["model.moe.every=3"], "model.moe.every", "some block is MoE"),
    (["model.moe.aux_free_bias=true", "model.moe.router=base"], "model.moe.aux_free_bias", "switch, gshard or topk"),
    (["model.n_layers=0"], "model.n_layers", ">= 1"),
    (["model.dropout=1.0"], "model.dropout", "[0, 1)"),
    (["train.micro_batch_size=3"], "train.micro_batch_size", "a divisor of train.batch_size = 8"),
    (["train.min_lr=1.0"], "train.min_lr", "[0, train.lr"),
    (["train.dtype=float16"], "train.dtype", "float32, bfloat16"),
    (["data.val_fraction=0"], "data.val_fraction", "(0, 1)"),
])
def test_bad_values_name_the_field_and_the_allowed_values(overrides, field, allowed):
    message = bad(*overrides)
    assert field in message and allowed in message, message


@pytest.mark.parametrize("override,field,expected", [
    ("model.n_layers=abc", "model.n_layers", "an integer"),
    ("model.n_layers=2.5", "model.n_layers", "an integer"),
    ("model.n_layers=true", "model.n_layers", "an integer"),
    ("model.moe.capacity_factor=high", "model.moe.capacity_factor", "a number"),
    ("model.moe.dropless=1", "model.moe.dropless", "true or false"),
    ("model.moe.router=3", "model.moe.router", "a string"),
    ("model.moe.experts_per_layer=4", "model.moe.experts_per_layer", "a list"),
    ("model.moe.experts_per_layer=[4, x]", "model.moe.experts_per_layer[1]", "an integer"),
    ("model.moe.pool=2", "model.moe.pool", "mapping"),
])
def test_wrong_types_name_the_field(override, field, expected):
    message = bad(override)
    assert field in message and expected in message, message


def test_unknown_keys_name_the_key_and_the_known_ones():
    message = bad("model.moe.num_expert=4")
    assert "model.moe.num_expert" in message and "num_experts" in message and "router" in message
    assert "'bogus'" in bad("bogus=1")


def test_bad_override_syntax():
    assert "key.path=value" in bad("model.n_layers")
    assert "not valid YAML" in bad("model.moe.experts_per_layer=[1, 2")


def test_bad_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  n_layers: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml.*not valid YAML at line"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_config(preset="huge")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


def test_validate_rejects_values_set_in_code():
    cfg = Config()
    cfg.model.moe.top_k = 9
    cfg.model.moe.router = "topk"
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        validate(cfg)
    assert dataclasses.replace(Config().model, n_heads=3).d_model == 128  # dataclasses stay plain
