"""Config: dotted overrides, type coercion, errors that name the valid keys, validation, experiment files."""

import dataclasses
import json
import re
from pathlib import Path

import jax
import pytest

from jaxrl import config as config_lib
from jaxrl import sharding, steps
from jaxrl.config import Config, ConfigError
from jaxrl.models import init as model_init
from jaxrl.validate import validate

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.py"))


def test_overrides_from_strings_mapping_and_double_underscore_agree():
    from_strings = config_lib.override(
        Config(), ["loss.beta=0.3", "model.layers=3", "train.tensorboard=false"]
    )
    from_mapping = config_lib.override(
        Config(), {"loss.beta": 0.3, "model.layers": 3, "train.tensorboard": False}
    )
    from_kwargs = config_lib.override(
        Config(), {"loss__beta": 0.3, "model__layers": 3, "train__tensorboard": False}
    )
    assert from_strings == from_mapping == from_kwargs
    assert from_strings.loss.beta == 0.3 and from_strings.model.layers == 3
    assert from_strings.train.tensorboard is False
    # Everything not overridden keeps its default.
    assert from_strings.model.hidden == Config().model.hidden and from_strings.optim == Config().optim


def test_override_of_top_level_keys_and_values_containing_equals():
    cfg = config_lib.override(Config(), ["stage=dpo", "seed=7", "name=a=b", "data.source=/tmp/x"])
    assert (cfg.stage, cfg.seed, cfg.name, cfg.data.source) == ("dpo", 7, "a=b", "/tmp/x")


@pytest.mark.parametrize(
    "key,raw,expected",
    [
        ("model.hidden", "128", 128),
        ("model.hidden", 256.0, 256),
        ("loss.beta", "0.25", 0.25),
        ("loss.beta", 1, 1.0),
        ("loss.beta", "1e-2", 0.01),
        ("model.qkv_bias", "true", True),
        ("model.qkv_bias", "False", False),
        ("model.qkv_bias", "1", True),
        ("train.progress", "no", False),
        ("model.remat", "full", "full"),
        ("data.source", "synthetic", "synthetic"),
    ],
)
def test_values_are_coerced_to_the_declared_type(key, raw, expected):
    cfg = config_lib.override(Config(), {key: raw})
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "key,raw",
    [
        ("model.hidden", "abc"),
        ("model.hidden", "1.5"),
        ("model.hidden", 1.5),
        ("model.hidden", True),  # a bool is not an int here, although Python says it is
        ("loss.beta", "fast"),
        ("loss.beta", True),
        ("model.qkv_bias", "maybe"),
        ("model.qkv_bias", 2),
        ("model.remat", 3),
        ("seed", "zero"),
    ],
)
def test_wrong_types_are_config_errors_naming_the_key(key, raw):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_lib.override(Config(), {key: raw})


@pytest.mark.parametrize("key", ["loss.betta", "modell.hidden", "model.hidden.size", "bogus", "loss__betta"])
def test_unknown_key_lists_the_valid_keys(key):
    with pytest.raises(ConfigError) as info:
        config_lib.override(Config(), {key: 1})
    message = str(info.value)
    assert "unknown config key" in message and key.replace("__", ".") in message
    for valid in (
        "loss.beta",
        "model.hidden",
        "train.batch_size",
        "mesh.preset",
        "data.max_len",
        "stage",
        "seed",
    ):
        assert valid in message


def test_malformed_override_string_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        config_lib.override(Config(), ["loss.beta"])


@pytest.mark.parametrize("key", ["model", "loss", "train"])
def test_setting_a_whole_section_is_an_error(key):
    with pytest.raises(ConfigError, match="section"):
        config_lib.override(Config(), {key: "x"})


def test_bad_stage_is_an_error():
    with pytest.raises(ConfigError, match="stage"):
        config_lib.override(Config(), ["stage=ppo_but_misspelt"])


def test_config_is_frozen_and_override_returns_a_new_object():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss.beta = 3.0
    new = config_lib.override(cfg, {"loss.beta": 0.5})
    assert cfg.loss.beta == 0.1 and new.loss.beta == 0.5


def test_to_dict_from_dict_round_trip_through_json(tmp_path):
    cfg = config_lib.override(
        Config(),
        {
            "stage": "dpo",
            "seed": 3,
            "loss.name": "ipo",
            "loss.beta": 0.3,
            "model.qk_norm": "head",
            "model.tie_embeddings": True,
            "mesh.data": 2,
            "mesh.preset": "fsdp_tp",
            "train.init_from": "/x/y",
        },
    )
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg
    config_lib.save(cfg, tmp_path / "config.json")
    assert config_lib.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg


def test_from_dict_rejects_unknown_keys():
    data = config_lib.to_dict(Config())
    data["loss"]["not_a_key"] = 1
    with pytest.raises(ConfigError, match="loss.not_a_key"):
        config_lib.from_dict(data)


def test_default_config_validates():
    for stage in ("sft", "rm", "dpo"):
        validate(config_lib.override(Config(), {"stage": stage}))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"model.remat": "bogus"}, "model.remat"),
        ({"model.qk_norm": "layer"}, "model.qk_norm"),
        ({"model.norm_position": "middle"}, "model.norm_position"),
        ({"model.head": "value"}, "model.head"),
        ({"model.rope_scaling": "yarn"}, "model.rope_scaling"),
        ({"model.dtype": "float64"}, "model.dtype"),
        ({"optim.schedule": "exponential"}, "optim.schedule"),
        ({"loss.sft_aggregation": "sum"}, "loss.sft_aggregation"),
        ({"data.truncation": "wrap"}, "data.truncation"),
        ({"train.reference": "none"}, "train.reference"),
        ({"model.heads": 6, "model.kv_heads": 4}, "kv_heads"),
        ({"train.batch_size": 10, "train.grad_accum": 4}, "grad_accum"),
        ({"stage": "dpo", "loss.name": "not_a_loss"}, "not_a_loss"),
        ({"data.max_prompt_len": 48, "data.max_len": 48}, "max_prompt_len"),
    ],
)
def test_validate_catches_bad_choices_and_combinations(overrides, match):
    cfg = config_lib.override(Config(), overrides)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


# A valid base per stage: the RL stages need a reward, online_dpo two samples per prompt.
RL_BASE = {"stage": "ppo", "rl.reward_model": "/runs/rm"}
ONLINE_DPO_BASE = {"stage": "online_dpo", "rl.reward_model": "/runs/rm", "rl.samples_per_prompt": 2}
OUT_OF_RANGE = [
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.grad_accum": 0}, "train.grad_accum"),
    ({"train.log_every": 0}, "train.log_every"),
    ({"train.steps": -5}, "train.steps"),
    ({"train.checkpoint_every": 0}, "train.checkpoint_every"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints"),
    ({"train.eval_every": -1}, "train.eval_every"),
    ({"train.max_skipped_fraction": "nan"}, "train.max_skipped_fraction"),
    ({"seed": -1}, "seed"),
    ({"model.layers": 0}, "model.layers"),
    ({"model.heads": 0}, "model.heads"),
    ({"model.kv_heads": 0}, "model.kv_heads"),
    ({"model.hidden": -64}, "model.hidden"),
    ({"model.vocab_size": 0}, "model.vocab_size"),
    ({"model.mlp": 0}, "model.mlp"),
    ({"model.head_dim": -1}, "model.head_dim"),
    ({"model.norm_eps": 0}, "model.norm_eps"),
    ({"model.init_std": "nan"}, "model.init_std"),
    ({"model.rope_theta": "inf"}, "model.rope_theta"),
    ({"model.rope_scaling": "llama3", "model.rope_low_freq_factor": 4.0}, "model.rope_high_freq_factor"),
    ({"mesh.tensor": 0}, "mesh.tensor"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh.fsdp"),
    ({"data.max_len": 0}, "data.max_len"),
    ({"data.max_prompt_len": 0}, "data.max_prompt_len"),
    ({"data.bucket_multiple": 0}, "data.bucket_multiple"),
    ({"data.num_eval": -1}, "data.num_eval"),
    ({"data.eval_max_new": 0}, "data.eval_max_new"),
    ({"optim.lr": "nan"}, "optim.lr"),
    ({"optim.lr": -1}, "optim.lr"),
    ({"optim.lr": "inf"}, "optim.lr"),
    ({"optim.warmup_ratio": 1.5}, "optim.warmup_ratio"),
    ({"optim.end_lr_ratio": -0.1}, "optim.end_lr_ratio"),
    ({"optim.weight_decay": -0.01}, "optim.weight_decay"),
    ({"optim.grad_clip": "nan"}, "optim.grad_clip"),
    ({"optim.b1": 1.0}, "optim.b1"),
    ({"optim.b2": -0.1}, "optim.b2"),
    ({"optim.eps": 0}, "optim.eps"),
    ({"stage": "dpo", "loss.beta": 0}, "loss.beta"),
    ({"stage": "dpo", "loss.beta": "nan"}, "loss.beta"),
    ({"stage": "dpo", "loss.beta": "inf"}, "loss.beta"),
    ({"stage": "dpo", "loss.beta": -0.1}, "loss.beta"),
    ({"stage": "dpo", "loss.name": "robust", "loss.label_smoothing": 0.5}, "loss.label_smoothing"),
    ({"stage": "dpo", "loss.name": "cdpo", "loss.label_smoothing": 0.5}, "loss.label_smoothing"),
    ({"stage": "dpo", "loss.label_smoothing": 1.5}, "loss.label_smoothing"),
    ({"stage": "dpo", "loss.label_smoothing": -0.1}, "loss.label_smoothing"),
    ({"stage": "dpo", "loss.name": "simpo", "loss.gamma": "nan"}, "loss.gamma"),
    ({"stage": "dpo", "loss.name": "rpo", "loss.nll_alpha": -1}, "loss.nll_alpha"),
    ({"stage": "dpo", "loss.name": "kto", "loss.desirable_weight": "inf"}, "loss.desirable_weight"),
    ({"stage": "dpo", "loss.name": "kto", "loss.undesirable_weight": -1}, "loss.undesirable_weight"),
    ({"stage": "rm", "loss.rm_center": -0.01}, "loss.rm_center"),
    ({**ONLINE_DPO_BASE, "loss.beta": 0}, "loss.beta"),
    ({**RL_BASE, "rl.top_p": 1.5}, "rl.top_p"),
    ({**RL_BASE, "rl.top_p": 0}, "rl.top_p"),
    ({**RL_BASE, "rl.top_k": -1}, "rl.top_k"),
    ({**RL_BASE, "rl.temperature": 0}, "rl.temperature"),
    ({**RL_BASE, "rl.temperature": "nan"}, "rl.temperature"),
    ({**RL_BASE, "rl.num_prompts": 0}, "rl.num_prompts"),
    ({**RL_BASE, "rl.rollout_batch": 0}, "rl.rollout_batch"),
    ({**RL_BASE, "rl.samples_per_prompt": 0}, "rl.samples_per_prompt"),
    ({**RL_BASE, "rl.minibatch": 0}, "rl.minibatch"),
    ({**RL_BASE, "rl.epochs": 0}, "rl.epochs"),
    ({**RL_BASE, "rl.max_new_tokens": 0}, "rl.max_new_tokens"),
    ({**RL_BASE, "rl.kl_horizon": 0}, "rl.kl_horizon"),
    ({**RL_BASE, "rl.gamma": 1.5}, "rl.gamma"),
    ({**RL_BASE, "rl.lam": -0.1}, "rl.lam"),
    ({**RL_BASE, "rl.clip": 0}, "rl.clip"),
    ({**RL_BASE, "rl.clip_high": -0.1}, "rl.clip_high"),
    ({**RL_BASE, "rl.value_clip": "nan"}, "rl.value_clip"),
    ({**RL_BASE, "rl.dual_clip": 0.5}, "rl.dual_clip"),
    ({**RL_BASE, "rl.value_lr": -1e-4}, "rl.value_lr"),
    ({**RL_BASE, "rl.value_lr": "inf"}, "rl.value_lr"),
    ({**RL_BASE, "rl.value_coef": -1}, "rl.value_coef"),
    ({**RL_BASE, "rl.kl_coef": -0.05}, "rl.kl_coef"),
    ({**RL_BASE, "rl.kl_target": "nan"}, "rl.kl_target"),
    ({**RL_BASE, "rl.entropy_coef": "nan"}, "rl.entropy_coef"),
    ({**RL_BASE, "rl.length_penalty": "inf"}, "rl.length_penalty"),
    ({**RL_BASE, "rl.missing_eos_penalty": "-inf"}, "rl.missing_eos_penalty"),
    ({**RL_BASE, "rl.uncertainty_coef": "nan"}, "rl.uncertainty_coef"),
]


@pytest.mark.parametrize(
    "overrides,key", OUT_OF_RANGE, ids=[f"{k}={list(o.values())[-1]}" for o, k in OUT_OF_RANGE]
)
def test_validate_refuses_values_out_of_range_naming_key_value_and_range(overrides, key):
    cfg = config_lib.override(Config(), overrides)  # a dotted override of the right type is read fine ...
    with pytest.raises(ConfigError) as info:  # ... and refused by validate, before anything runs
        validate(cfg)
    message = str(info.value)
    assert re.search(rf"(^| ){re.escape(key)}\b", message), message
    assert "\n" not in message and "must be" in message and "got" in message


@pytest.mark.parametrize(
    "overrides",
    [
        {"stage": "sft"},
        {"stage": "rm"},
        {"stage": "dpo"},
        RL_BASE,
        ONLINE_DPO_BASE,
        {"optim.lr": 0},
        {"optim.warmup_ratio": 0, "optim.end_lr_ratio": 1, "optim.grad_clip": 0, "optim.b1": 0},
        {"optim.warmup_ratio": 1, "optim.weight_decay": 0},
        {"stage": "dpo", "loss.name": "robust", "loss.label_smoothing": 0.49},
        {"stage": "dpo", "loss.name": "robust", "loss.label_smoothing": 0.0},
        {"stage": "dpo", "loss.name": "cdpo", "loss.label_smoothing": 0.3},
        {"stage": "dpo", "loss.name": "simpo", "loss.gamma": 0, "loss.nll_alpha": 0},
        {"stage": "sft", "loss.beta": 0},  # only the preference stages read loss.beta
        {"mesh.data": 1, "mesh.fsdp": -1},
        {"data.num_train": 0, "data.eval_prompts_per_domain": 0, "train.eval_every": 0, "model.head_dim": 0},
        {**RL_BASE, "rl.top_p": 1.0, "rl.top_k": 0, "rl.gamma": 1.0, "rl.lam": 0.0, "rl.kl_coef": 0.0},
        {**RL_BASE, "rl.dual_clip": 0.0, "rl.clip_high": 0.0, "rl.value_lr": 0.0},
        {**RL_BASE, "rl.missing_eos_penalty": -10.0, "rl.length_penalty": 0.0, "rl.entropy_coef": 0.0},
        {**RL_BASE, "rl.dual_clip": 3.0, "rl.top_p": 1e-3, "rl.temperature": 1e-3},
    ],
)
def test_validate_accepts_defaults_and_edge_values(overrides):
    validate(config_lib.override(Config(), overrides))


def test_cli_validate_refuses_an_out_of_range_override(capsys):
    from jaxrl import cli

    experiment = str(Path(__file__).parent.parent / "experiments" / "tiny_pipeline.py")
    assert cli.main(["validate", "--config", experiment, "--set", "train.grad_accum=0"]) == 2
    assert "train.grad_accum must be a positive integer, got 0" in capsys.readouterr().err


def test_unknown_loss_name_is_fine_outside_dpo():
    validate(config_lib.override(Config(), {"stage": "sft", "loss.name": "not_a_loss"}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stage": "dpo", "loss.name": "not_a_loss"}, "loss.name: "),
        ({"stage": "dpo", "data.synthetic_kind": "nope"}, "data.synthetic_kind must be one of"),
        ({"data.source": "rows.jsonl", "data.format": "nope"}, "data.format must name a reader"),
        ({**RL_BASE, "rl.kl_estimator": "k9"}, "rl.kl_estimator must be one of"),
        ({**RL_BASE, "rl.advantage": "nope"}, "rl.advantage must be one of"),
        ({**RL_BASE, "rl.ensemble": "nope"}, "rl.ensemble must be one of"),
        ({**RL_BASE, "stage": "grpo"}, "compares samples of one prompt"),
    ],
)
def test_registry_names_are_checked_by_the_entry_point_not_by_config(overrides, message):
    cfg = config_lib.override(Config(), overrides)
    assert config_lib.validate(cfg) is cfg  # structure only: jaxrl.config knows no registry
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


def test_load_experiment_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load_experiment(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        config_lib.load_experiment(tmp_path / "empty.py")


def _abstract_train_state(cfg: Config):
    model_cfg = model_init.stage_model_config(cfg)
    _, abstract_params = model_init.abstract_model(model_cfg)
    tx, _ = steps.make_optimizer(cfg.optim, cfg.train.steps)
    return jax.eval_shape(lambda: steps.new_train_state(abstract_params, tx, cfg.seed, None))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_and_sweep_point_validates_and_builds_an_abstract_state(path):
    module = config_lib.load_experiment(path)
    base = module.get_config()
    assert isinstance(base, Config)
    points = list(module.sweep()) if hasattr(module, "sweep") else [{}]
    assert points, f"{path.name}: sweep() is empty"
    # A pod config's own mesh needs its pod; the rule table is checked with its preset on the 8 test devices.
    mesh = sharding.make_mesh(dataclasses.replace(base.mesh, data=2, fsdp=2, tensor=2))
    for point in points:
        cfg = validate(config_lib.override(base, point))
        state = _abstract_train_state(cfg)
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        assert n_params > 0 and int(state.step.size) == 1
        # Adam moments mirror the parameters.
        assert sum(x.size for x in jax.tree.leaves(state.opt_state)) >= 2 * n_params
        # Every leaf of the whole state gets a sharding from the rule table (no unmatched large parameter).
        specs = sharding.tree_specs(state, cfg.mesh.preset, mesh)
        assert len(
            jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        ) == len(jax.tree.leaves(state))
    if hasattr(module, "metrics"):
        assert all(isinstance(m, str) and "/" in m for m in module.metrics())
