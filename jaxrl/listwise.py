"""Listwise preference losses over K ranked responses per prompt: the DPO paper's Plackett-Luce form, LiPO.

Every function here is pure. A loss takes a `ListLogps` (summed completion log-probs of the policy and the
reference [B, K], the labeller's scores [B, K], higher is better, and a mask [B, K] for lists shorter than K)
and the pairwise losses' `LossHParams`, and returns the per-list loss [B] and per-list metrics [B] under the
pairwise losses' names, so the step averages them with global counts as it does for pairs. Only the order of
the scores matters except in LiPO-λ, whose gains are 2^score - 1 (`scores_from_ranks` turns ranks into
scores in [0, 1]). Masked entries may hold anything, NaN included: they change neither the loss nor the
metrics, and their gradient is exactly 0. With K = 2 and distinct scores, `pl_dpo` and `list_mle` are
DPO and `lipo_lambda` is DPO times a constant (the lambda weight of positions 1 and 2).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxrl.losses import LossFn, LossSpec
from jaxrl.pairwise import LossHParams


@flax.struct.dataclass
class ListLogps:
    """K responses per prompt: summed completion log-probs of the policy and the reference [B, K] (fp32),
    the labeller's scores [B, K] (higher is better; ties allowed) and the mask [B, K] (1.0 for a response,
    0.0 for the padding of a shorter list). `lengths` [B, K] (token counts) is carried for losses that
    normalise by length; none of these does."""

    logps: jax.Array
    ref_logps: jax.Array
    scores: jax.Array
    mask: jax.Array
    lengths: jax.Array | None = None


LISTWISE_LOSSES: dict[str, LossSpec] = {}


def register_listwise_loss(name: str, *, needs_reference: bool = True):
    """Decorator adding fn(ListLogps, LossHParams) -> (loss [B], metrics) to LISTWISE_LOSSES under `name`."""

    def register(fn: LossFn) -> LossFn:
        if name in LISTWISE_LOSSES:
            raise ValueError(f"listwise loss {name!r} is already registered")
        LISTWISE_LOSSES[name] = LossSpec(fn=fn, needs_reference=needs_reference, paired=True)
        return fn

    return register


def get_listwise_loss(name: str) -> LossSpec:
    """The registered LossSpec for `name`."""
    if name not in LISTWISE_LOSSES:
        raise KeyError(f"unknown listwise loss {name!r}; registered: {sorted(LISTWISE_LOSSES)}")
    return LISTWISE_LOSSES[name]


def is_listwise(name: str) -> bool:
    """Whether loss.name names a listwise loss (stage dpo then trains on ranked lists, not pairs)."""
    return name in LISTWISE_LOSSES


def offline_loss(name: str) -> LossSpec:
    """The LossSpec of stage dpo's loss.name: a listwise loss or a pairwise one (jaxrl.losses)."""
    from jaxrl.losses import get_preference_loss

    return LISTWISE_LOSSES[name] if name in LISTWISE_LOSSES else get_preference_loss(name)


def scores_from_ranks(ranks_BK, mask_BK) -> jax.Array:
    """Scores in [0, 1] [B, K] from ranks (1 is best, ties share a rank): (n - rank)/(n - 1) over the n
    responses of each list, so the best is 1 and rank n is 0 (a list of one scores 1); 0 where masked."""
    mask_BK = jnp.asarray(mask_BK) > 0
    ranks_BK = jnp.where(mask_BK, jnp.asarray(ranks_BK, jnp.float32), 1.0)
    n_B1 = jnp.sum(mask_BK, axis=-1, keepdims=True).astype(jnp.float32)
    scores_BK = jnp.where(n_B1 > 1, (n_B1 - ranks_BK) / jnp.maximum(n_B1 - 1.0, 1.0), 1.0)
    return jnp.where(mask_BK, scores_BK, 0.0)


def _clean(ll: ListLogps, hp: LossHParams):
    """Mask [B, K] (bool), implicit rewards β(s - s_ref) [B, K] and scores [B, K], 0 where masked.

    The masked values are replaced before any arithmetic, so whatever they held (NaN, ±inf) reaches neither
    the loss nor, through `where`'s gradient, the inputs.
    """
    mask_BK = jnp.asarray(ll.mask) > 0
    logps_BK = jnp.where(mask_BK, jnp.asarray(ll.logps, jnp.float32), 0.0)
    ref_BK = jnp.where(mask_BK, jnp.asarray(ll.ref_logps, jnp.float32), 0.0)
    scores_BK = jnp.where(mask_BK, jnp.asarray(ll.scores, jnp.float32), 0.0)
    return mask_BK, hp.beta * (logps_BK - ref_BK), scores_BK, logps_BK


def _pairs(mask_BK: jax.Array, scores_BK: jax.Array) -> jax.Array:
    """[B, K, K]: True where responses i and j are both present and i scores strictly higher than j."""
    both_BKK = mask_BK[:, :, None] & mask_BK[:, None, :]
    return both_BKK & (scores_BK[:, :, None] > scores_BK[:, None, :])


def _masked_mean(values_BK: jax.Array, where_BK: jax.Array) -> jax.Array:
    count_B = jnp.sum(where_BK, axis=-1).astype(jnp.float32)
    return jnp.sum(jnp.where(where_BK, values_BK, 0.0), axis=-1) / jnp.maximum(count_B, 1.0)


def _list_metrics(mask_BK, rewards_BK, scores_BK, logps_BK) -> dict:
    """The pairwise losses' metrics for lists [B]: "chosen" is the top-scored response (the mean over a tie
    for the top), "rejected" the bottom-scored one; `rewards/accuracies` is the fraction of strictly ordered
    pairs whose implicit rewards are in the same order (0 for a list without one). At K = 2 these are the
    pairwise values."""
    top_B1 = jnp.max(jnp.where(mask_BK, scores_BK, -jnp.inf), axis=-1, keepdims=True)
    bottom_B1 = jnp.min(jnp.where(mask_BK, scores_BK, jnp.inf), axis=-1, keepdims=True)
    is_top_BK, is_bottom_BK = mask_BK & (scores_BK == top_B1), mask_BK & (scores_BK == bottom_B1)
    reward_chosen_B = _masked_mean(rewards_BK, is_top_BK)
    reward_rejected_B = _masked_mean(rewards_BK, is_bottom_BK)
    pairs_BKK = _pairs(mask_BK, scores_BK)
    agree_BKK = pairs_BKK & (rewards_BK[:, :, None] > rewards_BK[:, None, :])
    n_pairs_B = jnp.sum(pairs_BKK, axis=(1, 2)).astype(jnp.float32)
    return {
        "rewards/chosen": reward_chosen_B,
        "rewards/rejected": reward_rejected_B,
        "rewards/margins": reward_chosen_B - reward_rejected_B,
        "rewards/accuracies": jnp.sum(agree_BKK, axis=(1, 2)) / jnp.maximum(n_pairs_B, 1.0),
        "logps/chosen": _masked_mean(logps_BK, is_top_BK),
        "logps/rejected": _masked_mean(logps_BK, is_bottom_BK),
    }


def _plackett_luce_nll(mask_BK, rewards_BK, in_denominator_BKK) -> jax.Array:
    """-Σ_i (u_i - log Σ_j e^{u_j}) [B], i over present responses, j over in_denominator[i, j] and j = i."""
    K = mask_BK.shape[-1]
    in_BKK = in_denominator_BKK | jnp.eye(K, dtype=bool)[None]
    logits_BKK = jnp.where(in_BKK, rewards_BK[:, None, :], -jnp.inf)
    log_denominator_BK = jax.nn.logsumexp(logits_BKK, axis=-1)
    return -jnp.sum(jnp.where(mask_BK, rewards_BK - log_denominator_BK, 0.0), axis=-1)


@register_listwise_loss("pl_dpo")
def pl_dpo_loss(ll: ListLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """Plackett-Luce DPO (Rafailov et al. 2023, appendix A.3) [B]: -Σ_k log(e^{u_τ(k)} / Σ_{j≥k} e^{u_τ(j)}),
    u = β(s - s_ref), τ the ranking by score, best first.

    Each response's denominator holds itself and every response it is not ranked above (scored no higher):
    with distinct scores this is the Plackett-Luce likelihood of the ranking; tied responses share their
    denominators (Breslow's treatment of ties), which pulls their rewards together.
    """
    mask_BK, rewards_BK, scores_BK, logps_BK = _clean(ll, hp)
    # j is in i's denominator when j is present and scored no higher than i.
    not_above_BKK = mask_BK[:, None, :] & (scores_BK[:, None, :] <= scores_BK[:, :, None])
    loss_B = _plackett_luce_nll(mask_BK, rewards_BK, not_above_BKK)
    return loss_B, _list_metrics(mask_BK, rewards_BK, scores_BK, logps_BK)


@register_listwise_loss("list_mle")
def list_mle_loss(ll: ListLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """ListMLE (Xia et al. 2008) on u = β(s - s_ref) [B]: the Plackett-Luce negative log-likelihood of the
    labeller's ranking, as LiPO (Liu et al. 2024) applies it; with distinct scores it equals `pl_dpo`.

    Ties carry no signal: each response's denominator holds itself and the responses scored strictly lower,
    so tied responses are not ranked against each other (a list whose responses all tie costs 0), as
    binarisation drops tied pairs.
    """
    mask_BK, rewards_BK, scores_BK, logps_BK = _clean(ll, hp)
    below_BKK = mask_BK[:, None, :] & (scores_BK[:, None, :] < scores_BK[:, :, None])
    loss_B = _plackett_luce_nll(mask_BK, rewards_BK, below_BKK)
    return loss_B, _list_metrics(mask_BK, rewards_BK, scores_BK, logps_BK)


def rank_positions(mask_BK, rewards_BK, scores_BK) -> jax.Array:
    """1-based positions [B, K] of the present responses when sorted by reward, highest first (LiPO's τ).

    Reward ties are ordered by score, higher first (the labeller's order, so equal rewards, as at the start
    of training when the policy is the reference, give the ideal ranking); responses tied in both take the
    mean of the positions they share. Permutation-equivariant; no gradient.
    """
    u_BK, y_BK = jax.lax.stop_gradient(rewards_BK), jax.lax.stop_gradient(scores_BK)
    u_i, u_j = u_BK[:, :, None], u_BK[:, None, :]
    y_i, y_j = y_BK[:, :, None], y_BK[:, None, :]
    present_j = mask_BK[:, None, :]
    ahead_BKK = present_j & ((u_j > u_i) | ((u_j == u_i) & (y_j > y_i)))
    K = mask_BK.shape[-1]
    tied_BKK = present_j & (u_j == u_i) & (y_j == y_i) & ~jnp.eye(K, dtype=bool)[None]
    return 1.0 + jnp.sum(ahead_BKK, axis=-1) + 0.5 * jnp.sum(tied_BKK, axis=-1)


def lambda_weights(mask_BK, rewards_BK, scores_BK) -> jax.Array:
    """LiPO-λ's weights [B, K, K]: Δ_ij = |G_i - G_j| · |1/D(τ_i) - 1/D(τ_j)|, G = 2^score - 1 (the gain),
    D(τ) = log2(1 + τ) (the DCG discount of position τ, `rank_positions`); 0 where either is masked. The
    |ΔNDCG| of swapping i and j, unnormalised as in the paper. No gradient."""
    gain_BK = jnp.exp2(jax.lax.stop_gradient(scores_BK)) - 1.0
    inverse_discount_BK = 1.0 / jnp.log2(1.0 + rank_positions(mask_BK, rewards_BK, scores_BK))
    delta_BKK = jnp.abs(gain_BK[:, :, None] - gain_BK[:, None, :]) * jnp.abs(
        inverse_discount_BK[:, :, None] - inverse_discount_BK[:, None, :]
    )
    both_BKK = mask_BK[:, :, None] & mask_BK[:, None, :]
    return jnp.where(both_BKK, delta_BKK, 0.0)


@register_listwise_loss("lipo_lambda")
def lipo_lambda_loss(ll: ListLogps, hp: LossHParams) -> tuple[jax.Array, dict]:
    """LiPO-λ (Liu et al. 2024) [B]: -Σ_{i,j: ψ_i > ψ_j} Δ_ij log σ(u_i - u_j), u = β(s - s_ref), ψ the
    scores, Δ the LambdaLoss weights (`lambda_weights`), recomputed from the current rewards and detached.

    Every strictly ordered pair enters, weighted by how much swapping it would change the list's DCG: pairs
    far apart in label, or near the top, count most. At K = 2 it is DPO times Δ_12 = |G_1 - G_2|(1 -
    1/log2 3).
    """
    mask_BK, rewards_BK, scores_BK, logps_BK = _clean(ll, hp)
    pairs_BKK = _pairs(mask_BK, scores_BK)
    weights_BKK = lambda_weights(mask_BK, rewards_BK, scores_BK)
    pair_loss_BKK = -jax.nn.log_sigmoid(rewards_BK[:, :, None] - rewards_BK[:, None, :])
    loss_B = jnp.sum(jnp.where(pairs_BKK, weights_BKK * pair_loss_BKK, 0.0), axis=(1, 2))
    return loss_B, _list_metrics(mask_BK, rewards_BK, scores_BK, logps_BK)


def listwise_loss(name: str, logps, ref_logps=None, scores=None, mask=None, lengths=None, **hparams):
    """Notebook entry point: per-list loss [B] and metrics from log-probs [B, K] (or [K]), the reference's,
    scores (higher is better; pass `scores_from_ranks(ranks, mask)` for ranks) and an optional mask."""
    spec = get_listwise_loss(name)
    logps_BK = jnp.atleast_2d(jnp.asarray(logps, jnp.float32))
    if scores is None:
        raise ValueError(f"listwise loss {name!r} needs scores (higher is better) for the responses")
    if spec.needs_reference and ref_logps is None:
        raise ValueError(f"listwise loss {name!r} needs ref_logps")

    def fill(value, default):
        if value is None:
            return jnp.full(logps_BK.shape, default, jnp.float32)
        return jnp.broadcast_to(jnp.asarray(value, jnp.float32), logps_BK.shape)

    ll = ListLogps(
        logps=logps_BK,
        ref_logps=fill(ref_logps, 0.0),
        scores=fill(scores, 0.0),
        mask=fill(mask, 1.0),
        lengths=None if lengths is None else fill(lengths, 1.0),
    )
    return spec.fn(ll, LossHParams.create(**hparams))
