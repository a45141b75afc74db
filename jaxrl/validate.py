"""The full check of a config. `jaxrl.config` checks its structure (types, ranges, cross-field rules) and
imports nothing from the package; the names a config gives to registries are checked by the modules that own
them, gathered here. Everything that runs or launches a config validates it through this module."""

from __future__ import annotations

from jaxrl import config as config_lib
from jaxrl import losses, rewards
from jaxrl.config import Config, ConfigError
from jaxrl.data import pipeline
from jaxrl.models import lora
from jaxrl.rl import advantages, algorithms, heldout, kl


def validate(cfg: Config) -> Config:
    """Checks `cfg` (jaxrl.config.validate), then every name it gives a registry; returns cfg."""
    config_lib.validate(cfg)
    if cfg.model.lora_rank:
        lora.check_targets(cfg.model)  # the adapters' path regex (jaxrl.models.lora)
    if cfg.stage == "dpo" or (cfg.stage in algorithms.ALGORITHMS and algorithms.of(cfg).preference_loss):
        _check_preference_loss(cfg)
    pipeline.check_config(cfg)
    if cfg.stage in config_lib.RL_STAGES:
        kl.check_config(cfg.rl)
        advantages.check_config(cfg)
        rewards.check_config(cfg.rl)
        algorithms.check_config(cfg)  # the algorithm's own rules (rl.algorithms.ALGORITHMS)
        heldout.check(cfg)
    return cfg


def _check_preference_loss(cfg: Config) -> None:
    """loss.name is a registered preference loss, pairwise or (stage dpo) listwise (whether an algorithm needs
    a paired one is its rule)."""
    from jaxrl import listwise
    from jaxrl.config_ranges import LABEL_SMOOTHING_RANGES, PREFERENCE_LOSS_RANGES, UNIT

    config_lib.check_ranges(cfg, PREFERENCE_LOSS_RANGES)
    smoothing = LABEL_SMOOTHING_RANGES.get(cfg.loss.name, UNIT)
    if not smoothing.test(cfg.loss.label_smoothing):
        raise ConfigError(
            f"loss.label_smoothing must be {smoothing.text} for "
            f"loss.name={cfg.loss.name!r}, got {cfg.loss.label_smoothing!r}"
        )
    if cfg.stage == "dpo" and listwise.is_listwise(cfg.loss.name):
        if cfg.data.source == "synthetic" and cfg.data.list_size < 2:
            raise ConfigError(
                f"loss.name={cfg.loss.name!r} is listwise: set data.list_size >= 2 (the "
                "synthetic world's ranked lists of that many responses per prompt)"
            )
        return
    try:
        losses.get_preference_loss(cfg.loss.name)
    except KeyError as e:
        known = sorted(listwise.LISTWISE_LOSSES)
        raise ConfigError(f"loss.name: {e.args[0]}; listwise (stage dpo): {known}") from None
