"""Pure per-token pieces of the online-RL objectives: the processed sampling distribution, the PPO clipped
surrogate, the clipped value loss, entropy and the per-token RLHF reward.

Every loss here returns per-token values [B, T] (and per-token statistics); `advantages.AGGREGATIONS` turns
them into a scalar with whole-minibatch denominators, so the caller decides the length weighting.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class RLHParams:
    """Shape-free RL loss hyperparameters as float32 scalars (a new value never recompiles)."""

    temperature: jax.Array
    clip_low: jax.Array
    clip_high: jax.Array
    dual_clip: jax.Array  # > 1 enables the dual clip: the loss is capped at -c·A when A < 0
    value_clip: jax.Array
    value_coef: jax.Array
    entropy_coef: jax.Array
    kl_coef: jax.Array  # coefficient of the KL term in the loss (0 when the KL is in the reward instead)

    @classmethod
    def create(cls, **overrides) -> RLHParams:
        """TRL-like defaults (ε 0.2, value ε 0.2, c_v 0.1, no entropy bonus, no KL in the loss)."""
        return jax.tree.map(jnp.asarray, cls.host(**overrides))

    @classmethod
    def host(cls, **overrides) -> RLHParams:
        """`create`'s values as host float32 scalars, to be placed with `jax.device_put` (no hidden copy)."""
        values = dict(
            temperature=1.0,
            clip_low=0.2,
            clip_high=0.2,
            dual_clip=0.0,
            value_clip=0.2,
            value_coef=0.1,
            entropy_coef=0.0,
            kl_coef=0.0,
        )
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise TypeError(f"unknown RL hyperparameter(s) {unknown}; valid keys are {sorted(values)}")
        values.update(overrides)
        return cls(**{k: np.asarray(v, np.float32) for k, v in values.items()})


def processed_logits(logits_BTV: jax.Array, temperature, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits [B, T, V] of the distribution tokens are sampled from (/ temperature, top-k, top-p): the
    sampler's own `jaxrl.sampling.process_logits`, so trainer and sampler log-probs share one definition."""
    from jaxrl.sampling import process_logits

    return process_logits(logits_BTV, temperature, top_k=top_k, top_p=top_p)


def token_logps_and_entropy(x_BTV: jax.Array, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(token) [B, T] and the entropy [B, T] of the (processed) logits, in fp32."""
    logz_BT = jax.nn.logsumexp(x_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(x_BTV, tokens_BT[..., None], axis=-1)[..., 0]
    probs_BTV = jnp.exp(x_BTV - logz_BT[..., None])
    entropy_BT = logz_BT - jnp.sum(probs_BTV * x_BTV, axis=-1)
    return picked_BT - logz_BT, entropy_BT


def ppo_policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, advantages_BT: jax.Array, hp: RLHParams):
    """Clipped surrogate per token [B, T]: max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), optionally dual-clipped,
    and per-token statistics (ratio, clipped indicators by side, approximate KL to the old policy)."""
    log_ratio_BT = logp_BT - old_logp_BT
    ratio_BT = jnp.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * jnp.clip(ratio_BT, 1.0 - hp.clip_low, 1.0 + hp.clip_high)
    loss_BT = jnp.maximum(unclipped_BT, clipped_BT)
    dual_BT = jnp.minimum(loss_BT, -hp.dual_clip * advantages_BT)
    loss_BT = jnp.where((hp.dual_clip > 1.0) & (advantages_BT < 0), dual_BT, loss_BT)
    # The clipped branch is the larger exactly where the ratio left the range on the side the advantage
    # pushes it; counted from that, not from comparing the two branches, whose products may differ by a
    # rounding step inside the range (a spurious count that depends on how the compiler fused them).
    low_BT = (ratio_BT < 1.0 - hp.clip_low) & (advantages_BT < 0)
    high_BT = (ratio_BT > 1.0 + hp.clip_high) & (advantages_BT > 0)
    stats = {
        "ratio": ratio_BT,
        "clipfrac": (low_BT | high_BT).astype(jnp.float32),
        "clipfrac_low": low_BT.astype(jnp.float32),
        "clipfrac_high": high_BT.astype(jnp.float32),
        "approxkl": 0.5 * jnp.square(log_ratio_BT),
    }
    return loss_BT, stats


def value_loss(values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array, value_clip):
    """Clipped value loss per token [B, T]: ½·max((V−G)², (V_clip−G)²), V_clip = V_old + clip(V−V_old, ±ε_v);
    and the indicator [B, T] of tokens where the clipped branch is the larger."""
    clipped_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -value_clip, value_clip)
    plain_BT = jnp.square(values_BT - returns_BT)
    clipped_loss_BT = jnp.square(clipped_BT - returns_BT)
    # Inside the range V_old + (V − V_old) may differ from V by a rounding step: only a value that left the
    # range is counted as clipped.
    outside_BT = jnp.abs(values_BT - old_values_BT) > value_clip
    clipfrac_BT = (outside_BT & (clipped_loss_BT > plain_BT)).astype(jnp.float32)
    return 0.5 * jnp.maximum(plain_BT, clipped_loss_BT), clipfrac_BT


def last_index(mask_BT: jax.Array) -> jax.Array:
    """Index [B] of the last valid token (0 when none is)."""
    T = mask_BT.shape[-1]
    return jnp.max(jnp.where(mask_BT > 0, jnp.arange(T), 0), axis=-1)


def token_rewards(scores_B: jax.Array, kl_BT: jax.Array, mask_BT: jax.Array, kl_coef) -> jax.Array:
    """Per-token RLHF reward [B, T]: −β·kl_t on every valid token, plus the scalar score on the last one."""
    mask_BT = mask_BT.astype(jnp.float32)
    last_BT = jax.nn.one_hot(last_index(mask_BT), mask_BT.shape[-1], dtype=jnp.float32) * mask_BT
    return (-kl_coef * kl_BT + scores_B[:, None] * last_BT) * mask_BT
