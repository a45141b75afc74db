"""The DPO family's pairwise losses and KTO: fn(SeqLogps, LossHParams) -> (loss [B], metrics [B]).

Every function here is pure: arrays in, arrays out. A loss takes per-example summed completion log-probs
(`SeqLogps`) and a `LossHParams` pytree, and returns the per-example loss [B] plus per-example metrics [B]
under one set of names (REFERENCE.md), so the caller can average with global counts and the result does not
depend on the number of gradient-accumulation microbatches. `jaxrl.losses` registers each by name.
"""

from __future__ import annotations

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


def dpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """DPO [B]: -log σ(β h), h the policy/reference log-ratio margin."""
    return -jax.nn.log_sigmoid(hp.beta * _margin(lp)), _dpo_metrics(lp, hp)


def cdpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """Conservative DPO [B]: -(1-ε) log σ(βh) - ε log σ(-βh); the gradient vanishes at σ(βh) = 1-ε."""
    logits_B, eps = hp.beta * _margin(lp), hp.label_smoothing
    loss_B = -(1.0 - eps) * jax.nn.log_sigmoid(logits_B) - eps * jax.nn.log_sigmoid(-logits_B)
    return loss_B, _dpo_metrics(lp, hp)


def robust_dpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """Robust DPO [B] (Chowdhury et al.): ((1-ε)ℓ(h) - εℓ(-h)) / (1-2ε), ℓ(h) = -log σ(βh), ε < 1/2."""
    logits_B, eps = hp.beta * _margin(lp), hp.label_smoothing
    # The flipped-label term enters with a minus sign: an unbiased estimate of the clean loss, not a smoother.
    loss_B = (-(1.0 - eps) * jax.nn.log_sigmoid(logits_B) + eps * jax.nn.log_sigmoid(-logits_B)) / (
        1.0 - 2.0 * eps
    )
    return loss_B, _dpo_metrics(lp, hp)


def ipo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """IPO on summed log ratios [B]: (h - 1/(2β))^2 (OpenRLHF form)."""
    return (_margin(lp) - 0.5 / hp.beta) ** 2, _dpo_metrics(lp, hp)


def ipo_mean_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """IPO on per-token mean log ratios [B]: (r_w/|y_w| - r_l/|y_l| - 1/(2β))^2 (TRL form)."""
    return (_mean_token_margin(lp) - 0.5 / hp.beta) ** 2, _dpo_metrics(lp, hp)


def hinge_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """Hinge / SLiC (RSO form) [B]: max(0, 1 - βh)."""
    return jax.nn.relu(1.0 - hp.beta * _margin(lp)), _dpo_metrics(lp, hp)


def dpo_norm_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """Length-normalised DPO [B]: -log σ(β[r_w/|y_w| - r_l/|y_l|]); metrics keep the summed-ratio rewards."""
    return -jax.nn.log_sigmoid(hp.beta * _mean_token_margin(lp)), _dpo_metrics(lp, hp)


def rpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """RPO [B]: DPO + α·NLL(y_w), NLL the mean per-token negative log-likelihood -s_w/|y_w|."""
    nll_B = _chosen_nll(lp)
    loss_B = -jax.nn.log_sigmoid(hp.beta * _margin(lp)) + hp.nll_alpha * nll_B
    return loss_B, _dpo_metrics(lp, hp) | {"nll_loss": nll_B}


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


def orpo_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """ORPO [B]: NLL(y_w) - λ log σ(log odds(y_w) - log odds(y_l)), p = exp(s/|y|), λ = beta; no reference."""
    len_chosen_B, len_rejected_B = _lengths(lp)
    log_odds_B = _log_odds(lp.chosen / len_chosen_B) - _log_odds(lp.rejected / len_rejected_B)
    log_odds_ratio_B = jax.nn.log_sigmoid(log_odds_B)
    nll_B = _chosen_nll(lp)
    metrics = _reward_metrics(hp.beta * lp.chosen, hp.beta * lp.rejected, lp)
    metrics |= {"nll_loss": nll_B, "log_odds_ratio": log_odds_ratio_B, "log_odds_chosen": log_odds_B}
    return nll_B - hp.beta * log_odds_ratio_B, metrics


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


def bco_pair_loss(lp: SeqLogps, hp: LossHParams, delta=0.0) -> tuple[jax.Array, dict]:
    """BCO, pairwise (Jung et al. 2024) [B]: -log σ(βr_w - δ) - log σ(-(βr_l - δ)).

    A binary classifier with logit βr - δ: chosen completions are class 1, rejected class 0. δ, the paper's
    reward shift, is the running mean of past implicit rewards β·r (chosen and rejected alike); it enters
    detached. The caller carries it as a `RunningMean` (jaxrl.losses, `update_running_mean`) and passes its
    `mean`; with the default δ = 0 this is TRL's current `bco_pair` (since its DPO refactor), which dropped
    the shift.
    """
    delta = jax.lax.stop_gradient(jnp.asarray(delta, jnp.float32))
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    logit_chosen_B = hp.beta * ratio_chosen_B - delta
    logit_rejected_B = hp.beta * ratio_rejected_B - delta
    loss_B = -jax.nn.log_sigmoid(logit_chosen_B) - jax.nn.log_sigmoid(-logit_rejected_B)
    return loss_B, _dpo_metrics(lp, hp)


def sppo_hard_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """SPPO with hard labels (Wu et al. 2024) [B]: (r_w - 1/(2β))² + (r_l + 1/(2β))².

    SPPO regresses each log ratio onto η(P(y ≻ π) - ½); TRL's hard form takes P = 1 for y_w, 0 for y_l and
    η = 1/β. Summed log ratios, as TRL.
    """
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    target = 0.5 / hp.beta
    loss_B = (ratio_chosen_B - target) ** 2 + (ratio_rejected_B + target) ** 2
    return loss_B, _dpo_metrics(lp, hp)


def apo_zero_loss(lp: SeqLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7) [B]: (1 - σ(βr_w)) + σ(βr_l).

    Raises the chosen likelihood and lowers the rejected one, each on its own: for data whose chosen
    completions are better than the model's own.
    """
    ratio_chosen_B, ratio_rejected_B = _log_ratios(lp)
    # 1 - σ(x) written as σ(-x): no cancellation when σ(x) is close to 1.
    loss_B = jax.nn.sigmoid(-hp.beta * ratio_chosen_B) + jax.nn.sigmoid(hp.beta * ratio_rejected_B)
    return loss_B, _dpo_metrics(lp, hp)


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
