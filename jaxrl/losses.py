"""Losses: SFT token NLL, the Bradley-Terry reward model, and the registry of DPO-family preference losses.

Every function here is pure: arrays in, arrays out. Preference losses take per-example summed completion
log-probs (`SeqLogps`) and a `LossHParams` pytree, and return the per-example loss [B] plus per-example
metrics [B] under one set of names (REFERENCE.md), so the caller can average with global counts and the
result does not depend on the number of gradient-accumulation microbatches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

# Keeps ORPO's mean token log-prob strictly below 0, where log(1 - p) is finite.
_ORPO_LOGP_CEILING = -1e-6


@flax.struct.dataclass
class LossHParams:
    """Shape-free loss hyperparameters as float32 scalars: a new value never recompiles, and they vmap."""

    beta: jax.Array
    label_smoothing: jax.Array
    gamma: jax.Array
    nll_alpha: jax.Array
    rm_center: jax.Array
    desirable_weight: jax.Array
    undesirable_weight: jax.Array

    @classmethod
    def create(cls, **overrides) -> LossHParams:
        """Defaults (beta 0.1, KTO weights 1, the rest 0) with overrides, each as a float32 array."""
        values = dict(
            beta=0.1,
            label_smoothing=0.0,
            gamma=0.0,
            nll_alpha=0.0,
            rm_center=0.0,
            desirable_weight=1.0,
            undesirable_weight=1.0,
        )
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise TypeError(f"unknown loss hyperparameter(s) {unknown}; valid keys are {sorted(values)}")
        values.update(overrides)
        return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


@flax.struct.dataclass
class SeqLogps:
    """Per-example summed completion log-probs [B] (fp32) and completion lengths [B] (token counts).

    For KTO, `chosen` is the example's completion and `rejected` the mismatched prompt/completion pair
    scored for the KL reference point; `desirable` [B] holds the 1.0/0.0 labels.
    """

    chosen: jax.Array
    rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_len: jax.Array
    rejected_len: jax.Array
    desirable: jax.Array | None = None


LossFn = Callable[[SeqLogps, LossHParams], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    needs_reference: bool
    paired: bool
    # fn also takes `delta=` [], a detached shift of the implicit rewards that the step carries across steps
    # as a RunningMean (bco_pair); called as fn(lp, hp) the shift is 0.
    running_shift: bool = False


PREFERENCE_LOSSES: dict[str, LossSpec] = {}
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


def _lengths(lp: SeqLogps) -> tuple[jax.Array, jax.Array]:
    # Padding rows of a fixed-size batch may carry length 0; clamping keeps their (zero-weighted) loss finite.
    return jnp.maximum(lp.chosen_len, 1.0), jnp.maximum(lp.rejected_len, 1.0)


def _log_ratios(lp: SeqLogps) -> tuple[jax.Array, jax.Array]:
    return lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected


def _chosen_nll(lp: SeqLogps) -> jax.Array:
    return -lp.chosen / _lengths(lp)[0]


def _reward_metrics(reward_chosen_B: jax.Array, reward_rejected_B: jax.Array, lp: SeqLogps) -> dict:
    return {
        "rewards/chosen": reward_chosen_B,
        "rewards/rejected": reward_rejected_B,
        "rewards/margins": reward_chosen_B - reward_rejected_B,
        "rewards/accuracies": (reward_chosen_B > reward_rejected_B).astype(jnp.float32),
        "logps/chosen": lp.chosen,
        "logps/rejected": lp.rejected,
    }


def _dpo_metrics(lp: SeqLogps, hp: LossHParams) -> dict:
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    return _reward_metrics(hp.beta * ratio_chosen_B, hp.beta * ratio_rejected_B, lp)


def _margin(lp: SeqLogps) -> jax.Array:
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    return ratio_chosen_B - ratio_rejected_B


def _mean_token_margin(lp: SeqLogps) -> jax.Array:
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    len_chosen_B, len_rejected_B = _lengths(lp)
    return ratio_chosen_B / len_chosen_B - ratio_rejected_B / len_rejected_B


@register_preference_loss("dpo")
def dpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """DPO [B]: -log σ(β h), h the policy/reference log-ratio margin."""
    return -jax.nn.log_sigmoid(hp.beta * _margin(lp)), _dpo_metrics(lp, hp)


@register_preference_loss("cdpo")
def cdpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """Conservative DPO [B]: -(1-ε) log σ(βh) - ε log σ(-βh); the gradient vanishes at σ(βh) = 1-ε."""
    logits_B, eps = hp.beta * _margin(lp), hp.label_smoothing
    loss_B = -(1.0 - eps) * jax.nn.log_sigmoid(logits_B) - eps * jax.nn.log_sigmoid(-logits_B)
    return loss_B, _dpo_metrics(lp, hp)


@register_preference_loss("robust")
def robust_dpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """Robust DPO [B] (Chowdhury et al.): ((1-ε)ℓ(h) - εℓ(-h)) / (1-2ε), ℓ(h) = -log σ(βh), ε < 1/2."""
    logits_B, eps = hp.beta * _margin(lp), hp.label_smoothing
    # The flipped-label term enters with a minus sign: an unbiased estimate of the clean loss, not a smoother.
    loss_B = (-(1.0 - eps) * jax.nn.log_sigmoid(logits_B) + eps * jax.nn.log_sigmoid(-logits_B)) / (
        1.0 - 2.0 * eps
    )
    return loss_B, _dpo_metrics(lp, hp)


@register_preference_loss("ipo")
def ipo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """IPO on summed log ratios [B]: (h - 1/(2β))^2 (OpenRLHF form)."""
    return (_margin(lp) - 0.5 / hp.beta) ** 2, _dpo_metrics(lp, hp)


@register_preference_loss("ipo_mean")
def ipo_mean_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """IPO on per-token mean log ratios [B]: (r_w/|y_w| - r_l/|y_l| - 1/(2β))^2 (TRL form)."""
    return (_mean_token_margin(lp) - 0.5 / hp.beta) ** 2, _dpo_metrics(lp, hp)


@register_preference_loss("hinge")
def hinge_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """Hinge / SLiC (RSO form) [B]: max(0, 1 - βh)."""
    return jax.nn.relu(1.0 - hp.beta * _margin(lp)), _dpo_metrics(lp, hp)


@register_preference_loss("dpo_norm")
def dpo_norm_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """Length-normalised DPO [B]: -log σ(β[r_w/|y_w| - r_l/|y_l|]); metrics keep the summed-ratio rewards."""
    return -jax.nn.log_sigmoid(hp.beta * _mean_token_margin(lp)), _dpo_metrics(lp, hp)


@register_preference_loss("rpo")
def rpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """RPO [B]: DPO + α·NLL(y_w), NLL the mean per-token negative log-likelihood -s_w/|y_w|."""
    nll_B = _chosen_nll(lp)
    loss_B = -jax.nn.log_sigmoid(hp.beta * _margin(lp)) + hp.nll_alpha * nll_B
    return loss_B, _dpo_metrics(lp, hp) | {"nll_loss": nll_B}


@register_preference_loss("simpo", needs_reference=False)
def simpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """SimPO [B]: -log σ(β s_w/|y_w| - β s_l/|y_l| - γ) + α·NLL(y_w) (α = 0 in the paper); reference-free."""
    len_chosen_B, len_rejected_B = _lengths(lp)
    reward_chosen_B = hp.beta * lp.chosen / len_chosen_B
    reward_rejected_B = hp.beta * lp.rejected / len_rejected_B
    nll_B = _chosen_nll(lp)
    loss_B = -jax.nn.log_sigmoid(reward_chosen_B - reward_rejected_B - hp.gamma) + hp.nll_alpha * nll_B
    return loss_B, _reward_metrics(reward_chosen_B, reward_rejected_B, lp) | {"nll_loss": nll_B}


def _log_odds(mean_logp_B: jax.Array) -> jax.Array:
    """log(p / (1 - p)) for p = exp(mean_logp_B) [B], finite for every mean log-prob."""
    x_B = jnp.minimum(mean_logp_B, _ORPO_LOGP_CEILING)
    # log(1 - e^x): expm1 is exact near x = 0 where 1 - e^x cancels; log1p is exact where e^x is small.
    log1m_exp_B = jnp.where(x_B > -jnp.log(2.0), jnp.log(-jnp.expm1(x_B)), jnp.log1p(-jnp.exp(x_B)))
    return x_B - log1m_exp_B


@register_preference_loss("orpo", needs_reference=False)
def orpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """ORPO [B]: NLL(y_w) - λ log σ(log odds(y_w) - log odds(y_l)), p = exp(s/|y|), λ = beta; no reference."""
    len_chosen_B, len_rejected_B = _lengths(lp)
    log_odds_B = _log_odds(lp.chosen / len_chosen_B) - _log_odds(lp.rejected / len_rejected_B)
    log_odds_ratio_B = jax.nn.log_sigmoid(log_odds_B)
    nll_B = _chosen_nll(lp)
    metrics = _reward_metrics(hp.beta * lp.chosen, hp.beta * lp.rejected, lp)
    metrics |= {"nll_loss": nll_B, "log_odds_ratio": log_odds_ratio_B, "log_odds_chosen": log_odds_B}
    return nll_B - hp.beta * log_odds_ratio_B, metrics


@register_preference_loss("kto", paired=False)
def kto_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """KTO [B]: λ_D(1 - σ(β(r - z))) if desirable else λ_U(1 - σ(β(z - r))), r = s - s_ref.

    z = stop_gradient(max(0, mean_B(rejected - ref_rejected))) is the KL reference point from the mismatched
    pairs, averaged over the arrays given: a caller that splits a batch into microbatches and wants the
    whole-batch z must pass whole-batch mismatched log-probs. KTO has no chosen/rejected pairs, so instead of
    rewards/chosen and rewards/rejected it reports `rewards/desirable` and `rewards/undesirable` (β·r where
    the label matches, else 0) with `count/desirable` and `count/undesirable` (the 0/1 label masks), so
    sums of the two give the per-class means; plus `logps/chosen` (s) and `kl` (z broadcast to [B]).
    """
    if lp.desirable is None:
        raise ValueError("kto needs SeqLogps.desirable (1.0 desirable, 0.0 undesirable per example)")
    desirable_B = jnp.asarray(lp.desirable, jnp.float32)
    ratio_B, mismatched_ratio_B = _log_ratios(lp)
    kl = jax.lax.stop_gradient(jnp.maximum(jnp.mean(mismatched_ratio_B), 0.0))
    # 1 - σ(x) written as σ(-x): no cancellation when σ(x) is close to 1.
    desirable_loss_B = hp.desirable_weight * jax.nn.sigmoid(-hp.beta * (ratio_B - kl))
    undesirable_loss_B = hp.undesirable_weight * jax.nn.sigmoid(-hp.beta * (kl - ratio_B))
    loss_B = desirable_B * desirable_loss_B + (1.0 - desirable_B) * undesirable_loss_B
    reward_B = hp.beta * ratio_B
    metrics = {
        "rewards/desirable": reward_B * desirable_B,
        "rewards/undesirable": reward_B * (1.0 - desirable_B),
        "count/desirable": desirable_B,
        "count/undesirable": 1.0 - desirable_B,
        "logps/chosen": lp.chosen,
        "kl": jnp.broadcast_to(kl, ratio_B.shape),
    }
    return loss_B, metrics


# TRL's other pairwise DPOTrainer losses. r_w, r_l are the policy/reference log ratios, h = r_w - r_l; every
# one reports the DPO metrics (rewards β·r, unshifted).


@register_preference_loss("nca_pair")
def nca_pair_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """NCA, pairwise (Chen et al. 2024) [B]: -log σ(βr_w) - ½ log σ(-βr_w) - ½ log σ(-βr_l).

    Absolute rather than relative: the chosen term is least at βr_w = log 2 (σ = 2/3), and r_l is pushed
    down on its own, not against r_w.
    """
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    reward_chosen_B, reward_rejected_B = hp.beta * ratio_chosen_B, hp.beta * ratio_rejected_B
    loss_B = (
        -jax.nn.log_sigmoid(reward_chosen_B)
        - 0.5 * jax.nn.log_sigmoid(-reward_chosen_B)
        - 0.5 * jax.nn.log_sigmoid(-reward_rejected_B)
    )
    return loss_B, _dpo_metrics(lp, hp)


@register_preference_loss("bco_pair", running_shift=True)
def bco_pair_loss(lp: SeqLogps, hp: LossHParams, delta=0.0) -> tuple[jax.Array, dict]:
    """BCO, pairwise (Jung et al. 2024) [B]: -log σ(βr_w - δ) - log σ(-(βr_l - δ)).

    A binary classifier with logit βr - δ: chosen completions are class 1, rejected class 0. δ, the paper's
    reward shift, is the running mean of past implicit rewards β·r (chosen and rejected alike); it enters
    detached. The caller carries it as a `RunningMean` (`update_running_mean`) and passes its `mean`; with
    the default δ = 0 this is TRL's current `bco_pair` (since its DPO refactor), which dropped the shift.
    """
    delta = jax.lax.stop_gradient(jnp.asarray(delta, jnp.float32))
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    logit_chosen_B = hp.beta * ratio_chosen_B - delta
    logit_rejected_B = hp.beta * ratio_rejected_B - delta
    loss_B = -jax.nn.log_sigmoid(logit_chosen_B) - jax.nn.log_sigmoid(-logit_rejected_B)
    return loss_B, _dpo_metrics(lp, hp)


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


@register_preference_loss("sppo_hard")
def sppo_hard_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """SPPO with hard labels (Wu et al. 2024) [B]: (r_w - 1/(2β))² + (r_l + 1/(2β))².

    SPPO regresses each log ratio onto η(P(y ≻ π) - ½); TRL's hard form takes P = 1 for y_w, 0 for y_l and
    η = 1/β. Summed log ratios, as TRL.
    """
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    target = 0.5 / hp.beta
    loss_B = (ratio_chosen_B - target) ** 2 + (ratio_rejected_B + target) ** 2
    return loss_B, _dpo_metrics(lp, hp)


@register_preference_loss("apo_zero")
def apo_zero_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7) [B]: (1 - σ(βr_w)) + σ(βr_l).

    Raises the chosen likelihood and lowers the rejected one, each on its own: for data whose chosen
    completions are better than the model's own.
    """
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    # 1 - σ(x) written as σ(-x): no cancellation when σ(x) is close to 1.
    loss_B = jax.nn.sigmoid(-hp.beta * ratio_chosen_B) + jax.nn.sigmoid(hp.beta * ratio_rejected_B)
    return loss_B, _dpo_metrics(lp, hp)


@register_preference_loss("apo_down")
def apo_down_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8) [B]: σ(βr_w) + (1 - σ(βh)).

    Lowers both likelihoods, the rejected one more (the gradient on r_w is β[σ'(βr_w) - σ'(βh)], zero where
    r_l = 0): for data whose chosen completions are worse than the model's own.
    """
    ratio_chosen_B, _ = _log_ratios(lp)
    loss_B = jax.nn.sigmoid(hp.beta * ratio_chosen_B) + jax.nn.sigmoid(-hp.beta * _margin(lp))
    return loss_B, _dpo_metrics(lp, hp)


# EXO's recommended ε; label_smoothing = 0 (jaxrl's default) stands for it, as in TRL <= 0.28.
EXO_DEFAULT_EPSILON = 1e-3


@register_preference_loss("exo_pair")
def exo_pair_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """EXO, pairwise (Ji et al. 2024, eq. 16) [B]: KL(q ‖ p) = q_w log(q_w/(1-ε)) + q_l log(q_l/ε).

    q = (σ(βh), σ(-βh)) is the policy's softmax over the pair, p = (1-ε, ε) the label smoothed by ε =
    label_smoothing (0 means EXO's 1e-3). Reverse KL: mode seeking, ≥ 0, zero (with zero gradient) where
    σ(βh) = 1-ε. ε must lie in (0, 1) (or be 0); at ε ≥ ½ the target prefers y_l.
    """
    logits_B = hp.beta * _margin(lp)
    eps = jnp.where(hp.label_smoothing > 0, hp.label_smoothing, EXO_DEFAULT_EPSILON)
    log_q_chosen_B, log_q_rejected_B = jax.nn.log_sigmoid(logits_B), jax.nn.log_sigmoid(-logits_B)
    loss_B = jnp.exp(log_q_chosen_B) * (log_q_chosen_B - jnp.log1p(-eps)) + jnp.exp(log_q_rejected_B) * (
        log_q_rejected_B - jnp.log(eps)
    )
    return loss_B, _dpo_metrics(lp, hp)


# TRL's names for jaxrl losses. TRL's "ipo" is jaxrl's "ipo_mean" (jaxrl's "ipo" sums the log ratios), so
# it cannot be an alias; TRL's "sigmoid" is "dpo" (no label smoothing, as TRL >= 0.29; cDPO is "cdpo").
register_preference_loss_alias("sigmoid", "dpo")
register_preference_loss_alias("sigmoid_norm", "dpo_norm")


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
