"""Losses: the registry of DPO-family preference losses by name, SFT token NLL and the Bradley-Terry reward
model.

Every function here is pure: arrays in, arrays out. The preference losses themselves are in `jaxrl.pairwise`
(with their inputs `SeqLogps` and hyperparameters `LossHParams`); `PREFERENCE_LOSSES` below names each one
with what it needs, and `jaxrl.listwise` has the listwise ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from jaxrl import pairwise
from jaxrl.pairwise import LossHParams, SeqLogps

LossFn = Callable[[SeqLogps, LossHParams], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    needs_reference: bool = True
    paired: bool = True
    # fn also takes `delta=` [], a detached shift of the implicit rewards that the step carries across steps
    # as a RunningMean (bco_pair); called as fn(lp, hp) the shift is 0.
    running_shift: bool = False


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(pairwise.dpo_loss),
    "cdpo": LossSpec(pairwise.cdpo_loss),
    "robust": LossSpec(pairwise.robust_dpo_loss),
    "ipo": LossSpec(pairwise.ipo_loss),
    "ipo_mean": LossSpec(pairwise.ipo_mean_loss),
    "hinge": LossSpec(pairwise.hinge_loss),
    "dpo_norm": LossSpec(pairwise.dpo_norm_loss),
    "rpo": LossSpec(pairwise.rpo_loss),
    "simpo": LossSpec(pairwise.simpo_loss, needs_reference=False),
    "orpo": LossSpec(pairwise.orpo_loss, needs_reference=False),
    "kto": LossSpec(pairwise.kto_loss, paired=False),
    # TRL's other pairwise DPOTrainer losses.
    "nca_pair": LossSpec(pairwise.nca_pair_loss),
    "bco_pair": LossSpec(pairwise.bco_pair_loss, running_shift=True),
    "sppo_hard": LossSpec(pairwise.sppo_hard_loss),
    "apo_zero": LossSpec(pairwise.apo_zero_loss),
    "apo_down": LossSpec(pairwise.apo_down_loss),
    "exo_pair": LossSpec(pairwise.exo_pair_loss),
}
# Other names for registered losses (TRL's where jaxrl's differ): alias -> the name it stands for.
PREFERENCE_LOSS_ALIASES: dict[str, str] = {}


def register_preference_loss(
    name: str, *, needs_reference: bool = True, paired: bool = True, running_shift: bool = False
):
    """Decorator adding a `LossFn` to PREFERENCE_LOSSES under `name`."""

    def register(fn: LossFn) -> LossFn:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss {name!r} is already registered")
        PREFERENCE_LOSSES[name] = LossSpec(
            fn=fn, needs_reference=needs_reference, paired=paired, running_shift=running_shift
        )
        return fn

    return register


def register_preference_loss_alias(alias: str, name: str) -> None:
    """Registers `alias` as another name for the registered loss `name` (the same LossSpec)."""
    if alias in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss {alias!r} is already registered")
    PREFERENCE_LOSSES[alias] = get_preference_loss(name)
    PREFERENCE_LOSS_ALIASES[alias] = name


def get_preference_loss(name: str) -> LossSpec:
    """The registered LossSpec for `name`."""
    if name not in PREFERENCE_LOSSES:
        raise KeyError(f"unknown preference loss {name!r}; registered: {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name]


# TRL's names for jaxrl losses. TRL's "ipo" is jaxrl's "ipo_mean" (jaxrl's "ipo" sums the log ratios), so
# it cannot be an alias; TRL's "sigmoid" is "dpo" (no label smoothing, as TRL >= 0.29; cDPO is "cdpo").
register_preference_loss_alias("sigmoid", "dpo")
register_preference_loss_alias("sigmoid_norm", "dpo_norm")


@flax.struct.dataclass
class RunningMean:
    """A running mean [] of a stream of values and the weight behind it [] (fp32; a pytree for the state)."""

    mean: jax.Array
    count: jax.Array

    @classmethod
    def create(cls) -> RunningMean:
        """Empty: mean 0 (BCO's δ before any step), count 0."""
        return cls(mean=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.float32))


def update_running_mean(running: RunningMean, batch_mean, weight=1.0) -> RunningMean:
    """`running` with a batch of mean `batch_mean` and weight `weight` folded in (detached); pure, jittable.

    TRL's RunningMoments mean update, mean += (x̄ - mean)·w/(count + w). For bco_pair, x̄ is the step's mean
    implicit reward over chosen and rejected (the mean of the `rewards/chosen` and `rewards/rejected` metrics
    averaged over the batch's real examples). weight=1 weighs every step alike, as TRL's DPO `bco_pair` did
    (one update per step with the batch mean); weight = the number of rewards (2 × examples) weighs every
    reward alike, as TRL's BCOTrainer does; the two agree when batches are the same size. A zero weight
    (a step with no examples) leaves `running` as it was.
    """
    x = jax.lax.stop_gradient(jnp.asarray(batch_mean, jnp.float32))
    w = jnp.asarray(weight, jnp.float32)
    count = running.count + w
    step = jnp.where(count > 0, w / jnp.where(count > 0, count, 1.0), 0.0)
    return RunningMean(mean=running.mean + (x - running.mean) * step, count=count)


def preference_loss(
    name: str,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    chosen_lengths=None,
    rejected_lengths=None,
    desirable=None,
    delta=None,
    **hparams,
) -> tuple[jax.Array, dict]:
    """Notebook entry point: per-example loss [B] and metrics from sequence log-probs and lengths (and, for
    bco_pair, the reward shift `delta`)."""
    spec = get_preference_loss(name)
    if delta is not None and not spec.running_shift:
        raise ValueError(f"preference loss {name!r} takes no reward shift (delta)")
    if spec.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"preference loss {name!r} needs ref_chosen_logps and ref_rejected_logps")
    chosen_B = jnp.atleast_1d(jnp.asarray(chosen_logps, jnp.float32))
    rejected_B = jnp.atleast_1d(jnp.asarray(rejected_logps, jnp.float32))

    def or_fill(value, fill):
        if value is None:
            return jnp.full(chosen_B.shape, fill, jnp.float32)
        return jnp.broadcast_to(jnp.asarray(value, jnp.float32), chosen_B.shape)

    lp = SeqLogps(
        chosen=chosen_B,
        rejected=jnp.broadcast_to(rejected_B, chosen_B.shape),
        ref_chosen=or_fill(ref_chosen_logps, 0.0),
        ref_rejected=or_fill(ref_rejected_logps, 0.0),
        chosen_len=or_fill(chosen_lengths, 1.0),
        rejected_len=or_fill(rejected_lengths, 1.0),
        desirable=None if desirable is None else or_fill(desirable, 0.0),
    )
    hp = LossHParams.create(**hparams)
    return spec.fn(lp, hp) if delta is None else spec.fn(lp, hp, delta=delta)


SFT_AGGREGATIONS = ("token_mean", "sequence_mean")


def _segment_totals(values_BT: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
    """Sums of values over each (row, segment) of packed rows [B*T]; segment id 0 (padding) included."""
    B, T = segment_ids_BT.shape
    ids = (jnp.arange(B)[:, None] * T + jnp.asarray(segment_ids_BT, jnp.int32)).reshape(-1)
    return jax.ops.segment_sum(values_BT.reshape(-1), ids, num_segments=B * T)


def sft_denominator(
    mask_BT: jax.Array, aggregation: str, segment_ids_BT: jax.Array | None = None
) -> jax.Array:
    """Whole-batch denominator []: target tokens, or sequences with a target (segments of packed rows, given
    their segment ids); at least 1."""
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    if aggregation == "token_mean":
        count = jnp.sum(mask_BT)
    elif aggregation == "sequence_mean":
        if segment_ids_BT is None:
            per_sequence = jnp.sum(mask_BT, axis=-1)
        else:
            per_sequence = _segment_totals(mask_BT, segment_ids_BT)
        count = jnp.sum(per_sequence > 0).astype(jnp.float32)
    else:
        raise ValueError(f"unknown SFT aggregation {aggregation!r}; expected one of {SFT_AGGREGATIONS}")
    # A batch with no targets contributes a zero numerator; 1 keeps that 0 rather than 0/0.
    return jnp.maximum(count, 1.0)


def sft_token_loss(
    logp_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    aggregation: str,
    denominator,
    segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
    """Summed NLL contribution of this (micro)batch divided by a global denominator []. With segment ids
    (packed rows), "sequence_mean" averages within each packed sequence."""
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    nll_BT = -jnp.asarray(logp_BT, jnp.float32) * mask_BT
    if aggregation == "token_mean":
        total = jnp.sum(nll_BT)
    elif aggregation == "sequence_mean":
        # Fully masked sequences give 0/1 = 0 and are not counted by sft_denominator either.
        if segment_ids_BT is None:
            nll, count = jnp.sum(nll_BT, axis=-1), jnp.sum(mask_BT, axis=-1)
        else:
            nll, count = _segment_totals(nll_BT, segment_ids_BT), _segment_totals(mask_BT, segment_ids_BT)
        total = jnp.sum(nll / jnp.maximum(count, 1.0))
    else:
        raise ValueError(f"unknown SFT aggregation {aggregation!r}; expected one of {SFT_AGGREGATIONS}")
    return total / denominator


def reward_model_loss(
    reward_chosen_B: jax.Array, reward_rejected_B: jax.Array, margin_B: jax.Array | None, hp: LossHParams
) -> tuple[jax.Array, dict]:
    """Bradley-Terry loss per pair [B]: -log σ(R_w − R_l − m) + rm_center*(R_w+R_l)^2; metrics per pair."""
    reward_chosen_B = jnp.asarray(reward_chosen_B, jnp.float32)
    reward_rejected_B = jnp.asarray(reward_rejected_B, jnp.float32)
    diff_B = reward_chosen_B - reward_rejected_B
    margin_B = jnp.zeros_like(diff_B) if margin_B is None else jnp.asarray(margin_B, jnp.float32)
    # Centering pins the reward's free additive constant near zero (Eisenstein et al.).
    loss_B = (
        -jax.nn.log_sigmoid(diff_B - margin_B) + hp.rm_center * (reward_chosen_B + reward_rejected_B) ** 2
    )
    metrics = {
        "accuracy": (diff_B > 0).astype(jnp.float32),
        "margin": diff_B,
        "rewards/chosen": reward_chosen_B,
        "rewards/rejected": reward_rejected_B,
    }
    return loss_B, metrics
