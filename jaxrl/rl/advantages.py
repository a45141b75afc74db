"""Advantage estimators (a registry by name) and token-aggregation functions, all pure JAX.

Estimators take `AdvantageInputs` (scalar scores, per-token KL estimates, values and the response mask of a
whole rollout batch) and `AdvantageHParams`, and return (advantages [B, T], returns [B, T]), zero on padding.
Rows of a rollout batch come in groups of `group_size` consecutive samples of one prompt.

Aggregations turn a per-token loss [B, T] into the scalar contribution of a (micro)batch, divided by totals of
the whole minibatch (`aggregation_totals`), so summing the contributions of accumulation microbatches gives
the loss of the whole minibatch:
  grpo     mean over each sequence's tokens, then sum / number of sequences. Invariant to padding and to
           accumulation; each sequence weighs the same whatever its length (the GRPO length bias).
  dapo     sum over all tokens / all valid tokens of the minibatch (token-level, "bnpo"). Invariant only
           because the token count is the whole minibatch's: dividing each microbatch by its own count (as
           TRL did before PR #6024) changes the loss with the number of accumulation steps.
  dr_grpo  sum over all tokens / (sequences × L_max) with L_max the generation budget, a constant: invariant
           to padding and accumulation, and free of the per-sequence length normalisation (Dr. GRPO).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.config import Config, check_choices
from jaxrl.rl.losses import token_rewards

# Group std and whitening add these before dividing (TRL's constants), so a constant group gives 0, not NaN.
GROUP_STD_EPS = 1e-4
WHITEN_EPS = 1e-8


@flax.struct.dataclass
class AdvantageInputs:
    """A rollout batch as the estimators see it."""

    scores_B: jax.Array  # scalar reward per sequence
    kl_BT: jax.Array  # per-token KL estimate to the reference (folded into the reward by kl_coef)
    values_BT: jax.Array  # value estimates V_t (zeros without a value model)
    mask_BT: jax.Array  # valid response tokens


@flax.struct.dataclass
class AdvantageHParams:
    """Shape-free estimator hyperparameters as float32 scalars; flags are 0/1."""

    gamma: jax.Array
    lam: jax.Array
    kl_coef: jax.Array  # β of the KL penalty in the reward (0 when the KL goes into the loss instead)
    whiten: jax.Array  # whiten GAE advantages over valid tokens
    scale_rewards: jax.Array  # divide group advantages by the group std (GRPO); 0 is Dr. GRPO's centring

    @classmethod
    def create(cls, **overrides) -> AdvantageHParams:
        """Defaults: γ 1, λ 0.95 (TRL), β 0.05 (Tulu 2.5), whitening and group std scaling on."""
        return jax.tree.map(jnp.asarray, cls.host(**overrides))

    @classmethod
    def host(cls, **overrides) -> AdvantageHParams:
        """`create`'s values as host float32 scalars, to be placed with `jax.device_put` (no hidden copy)."""
        values = dict(gamma=1.0, lam=0.95, kl_coef=0.05, whiten=1.0, scale_rewards=1.0)
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise TypeError(f"unknown advantage hyperparameter(s) {unknown}; valid keys are {sorted(values)}")
        values.update(overrides)
        return cls(**{k: np.asarray(v, np.float32) for k, v in values.items()})


def gae(rewards_BT, values_BT, mask_BT, gamma, lam) -> tuple[jax.Array, jax.Array]:
    """GAE advantages and returns [B, T] over valid tokens only, by a reverse scan over time.

    δ_t = r_t + γ V_next − V_t and A_t = δ_t + γλ A_next, where "next" is the next valid token of the row
    (V after the last one is 0); returns G_t = A_t + V_t; both are 0 on padding."""
    mask_BT = mask_BT.astype(jnp.float32)

    def step(carry, x):
        next_value_B, next_adv_B = carry
        reward_B, value_B, valid_B = x
        delta_B = reward_B + gamma * next_value_B - value_B
        adv_B = delta_B + gamma * lam * next_adv_B
        # A padded position passes the carry through, so gaps inside a row are skipped, not zero-valued.
        carry = (jnp.where(valid_B > 0, value_B, next_value_B), jnp.where(valid_B > 0, adv_B, next_adv_B))
        return carry, adv_B * valid_B

    B = rewards_BT.shape[0]
    zeros_B = jnp.zeros((B,), jnp.float32)
    xs = (rewards_BT.astype(jnp.float32).T, values_BT.astype(jnp.float32).T, mask_BT.T)
    _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), xs, reverse=True)
    adv_BT = adv_TB.T
    return adv_BT, (adv_BT + values_BT) * mask_BT


def discounted_returns(rewards_BT, mask_BT, gamma) -> jax.Array:
    """G_t = Σ_{k≥0} γ^k r_{t+k} [B, T] over valid tokens (GAE with V = 0 and λ = 1)."""
    return gae(rewards_BT, jnp.zeros_like(rewards_BT, jnp.float32), mask_BT, gamma, 1.0)[0]


def whiten(x_BT, mask_BT, shift_mean: bool = True) -> jax.Array:
    """(x − mean) / std over valid tokens [B, T] (unbiased variance, as TRL's masked_whiten); 0 on padding."""
    mask_BT = mask_BT.astype(jnp.float32)
    n = jnp.sum(mask_BT)
    mean = jnp.sum(x_BT * mask_BT) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(x_BT - mean) * mask_BT) / jnp.maximum(n - 1.0, 1.0)
    out_BT = (x_BT - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out_BT = out_BT + mean
    return out_BT * mask_BT


def group_advantages(rewards_B, group_size: int, scale_rewards) -> jax.Array:
    """GRPO advantage per sequence [B]: r − mean of its prompt group, divided by (group std + ε) when
    scale_rewards is set (unbiased std, as TRL); centring only is Dr. GRPO."""
    r_PG = rewards_B.reshape(-1, group_size)
    centred_PG = r_PG - jnp.mean(r_PG, axis=1, keepdims=True)
    std_P1 = jnp.std(r_PG, axis=1, keepdims=True, ddof=1)
    return jnp.where(scale_rewards > 0, centred_PG / (std_P1 + GROUP_STD_EPS), centred_PG).reshape(-1)


def rloo_advantages(rewards_B, group_size: int) -> jax.Array:
    """RLOO advantage per sequence [B]: r_i minus the mean of the other k−1 rewards of its group."""
    r_PG = rewards_B.reshape(-1, group_size)
    baseline_PG = (jnp.sum(r_PG, axis=1, keepdims=True) - r_PG) / (group_size - 1)
    return (r_PG - baseline_PG).reshape(-1)


def group_mean_centred(rewards_B, group_size: int) -> jax.Array:
    """r minus its prompt group's mean [B]."""
    r_PG = rewards_B.reshape(-1, group_size)
    return (r_PG - jnp.mean(r_PG, axis=1, keepdims=True)).reshape(-1)


def _sequence_rewards(inp: AdvantageInputs, hp: AdvantageHParams) -> jax.Array:
    # Sequence-level estimators fold β·Σ_t kl_t into the scalar reward (as TRL's RLOO does).
    return inp.scores_B - hp.kl_coef * jnp.sum(inp.kl_BT * inp.mask_BT, axis=-1)


def _broadcast(adv_B, mask_BT) -> tuple[jax.Array, jax.Array]:
    adv_BT = adv_B[:, None] * mask_BT.astype(jnp.float32)
    return adv_BT, adv_BT


def gae_estimator(inp: AdvantageInputs, hp: AdvantageHParams, group_size: int):
    """PPO: per-token RLHF rewards (−β·kl_t, score on the last token), GAE, advantages whitened."""
    rewards_BT = token_rewards(inp.scores_B, inp.kl_BT, inp.mask_BT, hp.kl_coef)
    adv_BT, returns_BT = gae(rewards_BT, inp.values_BT, inp.mask_BT, hp.gamma, hp.lam)
    return jnp.where(hp.whiten > 0, whiten(adv_BT, inp.mask_BT), adv_BT), returns_BT


def grpo_estimator(inp: AdvantageInputs, hp: AdvantageHParams, group_size: int):
    """GRPO: group-normalised sequence reward broadcast to every token (std scaling per scale_rewards)."""
    return _broadcast(group_advantages(_sequence_rewards(inp, hp), group_size, hp.scale_rewards), inp.mask_BT)


def dr_grpo_estimator(inp: AdvantageInputs, hp: AdvantageHParams, group_size: int):
    """Dr. GRPO: group-centred sequence reward (no std division) broadcast to every token."""
    return _broadcast(group_advantages(_sequence_rewards(inp, hp), group_size, 0.0), inp.mask_BT)


def rloo_estimator(inp: AdvantageInputs, hp: AdvantageHParams, group_size: int):
    """RLOO: leave-one-out baseline on the KL-folded sequence reward, broadcast to every token."""
    return _broadcast(rloo_advantages(_sequence_rewards(inp, hp), group_size), inp.mask_BT)


def reinforce_pp_estimator(inp: AdvantageInputs, hp: AdvantageHParams, group_size: int):
    """REINFORCE++: per-token KL-penalised rewards, γ returns, advantages whitened over the whole batch."""
    rewards_BT = token_rewards(inp.scores_B, inp.kl_BT, inp.mask_BT, hp.kl_coef)
    returns_BT = discounted_returns(rewards_BT, inp.mask_BT, hp.gamma)
    return whiten(returns_BT, inp.mask_BT), returns_BT


def reinforce_pp_baseline_estimator(inp: AdvantageInputs, hp: AdvantageHParams, group_size: int):
    """REINFORCE++-baseline: REINFORCE++ on scores centred by their prompt group's mean."""
    centred = inp.replace(scores_B=group_mean_centred(inp.scores_B, group_size))
    return reinforce_pp_estimator(centred, hp, group_size)


Estimator = Callable[[AdvantageInputs, AdvantageHParams, int], tuple[jax.Array, jax.Array]]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "gae": gae_estimator,
    "grpo": grpo_estimator,
    "dr_grpo": dr_grpo_estimator,
    "rloo": rloo_estimator,
    "reinforce_pp": reinforce_pp_estimator,
    "reinforce_pp_baseline": reinforce_pp_baseline_estimator,
}
# Estimators that compare samples of one prompt need at least two per prompt.
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def get_estimator(name: str) -> Estimator:
    """The advantage estimator registered under `name`."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def aggregation_totals(mask_BT, max_len: int) -> dict[str, jax.Array]:
    """Whole-minibatch denominators: sequences, valid tokens and the constant length budget L_max."""
    return {
        "sequences": jnp.asarray(mask_BT.shape[0], jnp.float32),
        "tokens": jnp.sum(mask_BT.astype(jnp.float32)),
        "max_len": jnp.asarray(max_len, jnp.float32),
    }


def aggregate_grpo(x_BT, mask_BT, totals) -> jax.Array:
    """Σ_b mean_t x_bt / sequences of the minibatch."""
    mask_BT = mask_BT.astype(jnp.float32)
    per_sequence_B = jnp.sum(x_BT * mask_BT, axis=-1) / jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
    return jnp.sum(per_sequence_B) / totals["sequences"]


def aggregate_dapo(x_BT, mask_BT, totals) -> jax.Array:
    """Σ x / valid tokens of the minibatch."""
    return jnp.sum(x_BT * mask_BT.astype(jnp.float32)) / jnp.maximum(totals["tokens"], 1.0)


def aggregate_dr_grpo(x_BT, mask_BT, totals) -> jax.Array:
    """Σ x / (sequences of the minibatch × L_max)."""
    return jnp.sum(x_BT * mask_BT.astype(jnp.float32)) / (totals["sequences"] * totals["max_len"])


AGGREGATIONS: dict[str, Callable] = {
    "grpo": aggregate_grpo,
    "dapo": aggregate_dapo,
    "dr_grpo": aggregate_dr_grpo,
}


def get_aggregation(name: str) -> Callable:
    """The token aggregation registered under `name`."""
    if name not in AGGREGATIONS:
        raise KeyError(f"unknown aggregation {name!r}; registered: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name]


def check_config(cfg: Config) -> None:
    """rl.advantage and rl.aggregation are registered names (ConfigError otherwise); whether an algorithm's
    estimator gets the groups it compares is `rl.algorithms.check_config`'s rule."""
    r = cfg.rl
    check_choices(
        {
            "rl.advantage": (r.advantage, ("",) + tuple(ADVANTAGE_ESTIMATORS)),
            "rl.aggregation": (r.aggregation, tuple(AGGREGATIONS)),
        }
    )
