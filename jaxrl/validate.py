"""The full check of a config. `jaxrl.config` checks its structure (types, ranges, cross-field rules) and
imports nothing from the package; the names a config gives to registries are checked by the modules that own
them, gathered here. Everything that runs or launches a config validates it through this module."""

from __future__ import annotations

from jaxrl import config as config_lib
from jaxrl import losses, rewards
from jaxrl.config import Config, ConfigError
from jaxrl.data import pipeline
from jaxrl.rl import advantages, kl


def validate(cfg: Config) -> Config:
    """Checks `cfg` (jaxrl.config.validate), then every name it gives a registry; returns cfg."""
    config_lib.validate(cfg)
    if cfg.stage in ("dpo", "online_dpo"):
        _check_preference_loss(cfg)
    pipeline.check_config(cfg)
    if cfg.stage in config_lib.RL_STAGES:
        kl.check_config(cfg.rl)
        advantages.check_config(cfg)
        rewards.check_config(cfg.rl)
    return cfg


def _check_preference_loss(cfg: Config) -> None:
    """loss.name is a registered preference loss (a paired one for online_dpo)."""
    try:
        spec = losses.get_preference_loss(cfg.loss.name)
    except KeyError as e:
        raise ConfigError(f"loss.name: {e.args[0]}") from None
    if cfg.stage == "online_dpo" and not spec.paired:
        raise ConfigError(f"online_dpo needs a paired preference loss, not {cfg.loss.name!r}")
