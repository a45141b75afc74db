"""Per-token KL(π‖π_ref) estimators from log-probs of tokens sampled from π (a registry by name).

With l = log π(a) − log π_ref(a):
  k1 = l                  unbiased, high variance, can be negative
  k2 = l² / 2             biased, non-negative
  k3 = exp(−l) − 1 + l    unbiased, non-negative, lower variance (Schulman's estimator)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrl.config import RLConfig, check_choices

KLEstimator = Callable[[jax.Array, jax.Array], jax.Array]


def k1(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
    """k1 [B, T] = log π − log π_ref."""
    return logp_BT - ref_logp_BT


def k2(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
    """k2 [B, T] = (log π − log π_ref)² / 2."""
    return 0.5 * jnp.square(logp_BT - ref_logp_BT)


def k3(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
    """k3 [B, T] = exp(−l) − 1 + l with l = log π − log π_ref."""
    log_ratio_BT = logp_BT - ref_logp_BT
    # expm1 keeps precision where l is tiny (the usual case close to the reference).
    return jnp.expm1(-log_ratio_BT) + log_ratio_BT


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": k1, "k2": k2, "k3": k3}


def get_kl_estimator(name: str) -> KLEstimator:
    """The estimator registered under `name`."""
    if name not in KL_ESTIMATORS:
        raise KeyError(f"unknown KL estimator {name!r}; registered: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def check_config(rl: RLConfig) -> None:
    """rl.kl_estimator and rl.kl_loss_estimator name registered estimators (ConfigError otherwise)."""
    names = tuple(KL_ESTIMATORS)
    check_choices(
        {"rl.kl_estimator": (rl.kl_estimator, names), "rl.kl_loss_estimator": (rl.kl_loss_estimator, names)}
    )
