"""The pure, jittable pieces of online RL: what the runner's programs compute, arrays in and arrays out.

  rollout_stats        old / reference log-probs, entropies and old values of a rollout batch (one forward)
  advantage_step       advantages, returns and the rollout-level metrics (TRL names) of a scored rollout batch
  sequence_data        a scored rollout as training data of sequences [B, ...] (PPO, GRPO, RLOO, REINFORCE++)
  pair_data            a scored rollout as training data of chosen/rejected pairs [R, 2, ...] (online DPO)
  policy_objective     the clipped surrogate (+ KL, entropy terms) of a (micro)batch of sequences
  value_objective      the clipped value loss of a (micro)batch of sequences
  online_dpo_objective a DPO-family loss of a (micro)batch of pairs
  mixture_advantage_step  advantage_step over the policy's rows of a rollout whose odd rows are mixtures'
  nash_md_data         a scored rollout as policy samples and their probabilities of beating the mixture's
  nash_md_objective    Nash-MD's REINFORCE preference term and KL penalty of a (micro)batch of policy samples
  rl_step              one minibatch update of the policy and, when there is one, the value model

Objectives are scaled by whole-minibatch totals, so `steps.accumulate` sums microbatches exactly. Shapes: B
rows of a rollout batch, N response tokens (max_new_tokens), V vocabulary, R pairs (M = 2R rows once
flattened).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl import losses, pairwise, rewards, steps
from jaxrl.rl import advantages, kl
from jaxrl.rl.losses import RLHParams, ppo_policy_loss, processed_logits, value_loss

ROLLOUT_KEYS = ("prompt", "prompt_mask", "response", "response_mask")


@flax.struct.dataclass
class RLState:
    """Everything an RL checkpoint holds on device: the policy's and the value model's train states."""

    policy: steps.TrainState
    value: steps.TrainState | None = None


def response_hidden(model, batch):
    """Hidden states [B, N, D] that predict (and value) each response token, after left-padded prompts."""
    tokens_BT, positions_BT, segments_BT = rewards.join_prompt_response(
        batch["prompt"], batch["prompt_mask"], batch["response"]
    )
    P = batch["prompt"].shape[1]
    return model.hidden(tokens_BT, positions_BT, segments_BT)[:, P - 1 : -1]


def policy_logps(model, batch, temperature):
    """Log-probs [B, N] of the response tokens and entropies [B, N] under logits / temperature, over chunks of
    model.logprob_chunk positions when set (no [B, N, V] logits: `Transformer.token_logps`).

    Never truncated by the run's top-k / top-p, which shape what the sampler draws, not the objective (TRL's
    convention; the sampler reports the same with logps_under="tempered"): a truncated distribution gives a
    token outside the nucleus a log-prob near -2.4e38, whose square (approximate KL, k2) is inf and whose
    ratios and gradients turn NaN, and the nucleus moves as the policy trains."""
    process = lambda logits_BCV: processed_logits(logits_BCV, temperature)
    return model.token_logps(
        response_hidden(model, batch), batch["response"], with_entropy=True, process=process
    )


def rollout_stats(params, batch, hp: RLHParams, *, graphdef, value_graphdef, sequence_logps: bool):
    """Old and reference per-token log-probs (tempered, untruncated: `policy_logps`), entropies and old values
    [B, N] of a rollout batch (once per batch), 0 off the response mask; with `sequence_logps`, also the
    reference's temperature-1 summed log-probs [B] (online DPO)."""
    mask_BN = batch["response_mask"].astype(bool)
    policy, ref = nnx.merge(graphdef, params["policy"]), nnx.merge(graphdef, params["ref"])
    response_BN = batch["response"]
    logp_BN, entropy_BN = policy_logps(policy, batch, hp.temperature)
    # The reference as the policy: tempered, never truncated (its own nucleus may exclude a token the policy
    # sampled: an infinite KL). Its log-probs come over chunks too (no [B, N, V]).
    ref_h_BND = response_hidden(ref, batch)
    tempered = lambda logits_BCV: processed_logits(logits_BCV, hp.temperature)
    ref_logp_BN, _ = ref.token_logps(ref_h_BND, response_BN, process=tempered)
    out = {
        "old_logps": jnp.where(mask_BN, logp_BN, 0.0),
        "ref_logps": jnp.where(mask_BN, ref_logp_BN, 0.0),
        "entropy": jnp.where(mask_BN, entropy_BN, 0.0),
    }
    if value_graphdef is not None:
        value = nnx.merge(value_graphdef, params["value"])
        out["old_values"] = jnp.where(mask_BN, value.scores(response_hidden(value, batch)), 0.0)
    else:
        out["old_values"] = jnp.zeros(mask_BN.shape, jnp.float32)
    if sequence_logps:
        # DPO's implicit reward is defined on the model's own distribution, not the tempered one.
        out["ref_logps_t1"] = jnp.sum(jnp.where(mask_BN, ref.token_logps(ref_h_BND, response_BN)[0], 0.0), -1)
    return out


def _token_mean(x_BN, mask_BN, totals):
    # where, not a product: a non-finite value off the mask must not turn the mean NaN (inf * 0).
    return jnp.sum(jnp.where(mask_BN > 0, x_BN, 0.0)) / jnp.maximum(totals["tokens"], 1.0)


def advantage_step(
    rollout,
    stats,
    scores_B,
    adv_hp: advantages.AdvantageHParams,
    *,
    estimator: str,
    group_size: int,
    kl_estimator: str,
):
    """Advantages and returns [B, N] of a rollout batch, and its rollout-level metrics (TRL names)."""
    mask_BN = rollout["response_mask"].astype(jnp.float32)
    kl_BN = kl.get_kl_estimator(kl_estimator)(stats["old_logps"], stats["ref_logps"]) * mask_BN
    inputs = advantages.AdvantageInputs(
        scores_B=scores_B, kl_BT=kl_BN, values_BT=stats["old_values"], mask_BT=mask_BN
    )
    adv_BN, returns_BN = advantages.get_estimator(estimator)(inputs, adv_hp, group_size)
    totals = {"tokens": jnp.sum(mask_BN)}
    non_score_B = -adv_hp.kl_coef * jnp.sum(kl_BN, axis=-1)
    gap_BN = jnp.abs(rollout["sampler_logps"] - stats["old_logps"]) * mask_BN
    adv_mean = _token_mean(adv_BN, mask_BN, totals)
    metrics = {
        "objective/kl": jnp.mean(jnp.sum(kl_BN, axis=-1)),
        "objective/entropy": jnp.mean(jnp.sum(-stats["old_logps"], axis=-1)),
        "objective/non_score_reward": jnp.mean(non_score_B),
        "objective/rlhf_reward": jnp.mean(scores_B + non_score_B),
        "objective/scores": jnp.mean(scores_B),
        "reward_std": jnp.std(scores_B),
        "val/advantages_mean": adv_mean,
        "val/advantages_std": jnp.sqrt(_token_mean(jnp.square(adv_BN - adv_mean), mask_BN, totals)),
        "val/returns_mean": _token_mean(returns_BN, mask_BN, totals),
        "val/values_mean": _token_mean(stats["old_values"], mask_BN, totals),
        "debug/logprob_gap_max": jnp.max(gap_BN),
        "debug/logprob_gap_mean": _token_mean(gap_BN, mask_BN, totals),
    }
    if group_size > 1:
        scores_PG = scores_B.reshape(-1, group_size)
        metrics["frac_reward_zero_std"] = jnp.mean((jnp.std(scores_PG, axis=1) < 1e-6).astype(jnp.float32))
    return {"advantages": adv_BN, "returns": returns_BN}, metrics


def sequence_data(rollout, stats, scores_B, adv):
    """Training data [B, ...] of one sequence per row: the rollout, its old / reference log-probs and values,
    its advantages and returns."""
    del scores_B  # already in the advantages
    return (
        {k: rollout[k] for k in ROLLOUT_KEYS}
        | {k: stats[k] for k in ("old_logps", "ref_logps", "old_values")}
        | adv
    )


def make_pairs(rollout, stats, chosen_second_R, weight_R):
    """Pair arrays [R, 2, ...] of an online-DPO rollout (rows 2p, 2p+1 answer prompt p), chosen first."""

    def pair(x):
        x_R2 = x.reshape((-1, 2) + x.shape[1:])
        flip = chosen_second_R.reshape((-1,) + (1,) * (x_R2.ndim - 1))
        return jnp.where(flip, x_R2[:, ::-1], x_R2)

    return {
        "prompt": rollout["prompt"][0::2],
        "prompt_mask": rollout["prompt_mask"][0::2],
        "response": pair(rollout["response"]),
        "response_mask": pair(rollout["response_mask"]),
        "ref_logps": pair(stats["ref_logps_t1"]),
        "weight": weight_R,
    }


def pair_data(rollout, stats, scores_B, adv):
    """Training data [R, 2, ...] of the two samples of each prompt as a pair, the higher score chosen; a tie
    weighs 0 (its loss is masked, the pair keeps its place so every minibatch has one shape)."""
    del adv  # online DPO's advantages only feed the rollout metrics
    scores_R2 = scores_B.reshape(-1, 2)
    chosen_second_R = scores_R2[:, 1] > scores_R2[:, 0]
    weight_R = (scores_R2[:, 0] != scores_R2[:, 1]).astype(jnp.float32)
    return make_pairs(rollout, stats, chosen_second_R, weight_R)


def policy_objective(
    params,
    batch,
    hp: RLHParams,
    totals,
    *,
    graphdef,
    aggregation: str,
    kl_loss_estimator: str,
    recompute_old_logps: bool,
):
    """Clipped-surrogate policy loss of a (micro)batch (+ KL, entropy terms), scaled by minibatch totals."""
    model = nnx.merge(graphdef, params)
    mask_BN = batch["response_mask"].astype(jnp.float32)
    logp_BN, entropy_BN = policy_logps(model, batch, hp.temperature)
    # The original implementation's bug, kept as a flag: old log-probs from this very forward, so ratio ≡ 1.
    old_BN = jax.lax.stop_gradient(logp_BN) if recompute_old_logps else batch["old_logps"]
    pg_BN, stats = ppo_policy_loss(logp_BN, old_BN, batch["advantages"], hp)
    aggregate = advantages.get_aggregation(aggregation)
    pg = aggregate(pg_BN, mask_BN, totals)
    loss = pg - hp.entropy_coef * aggregate(entropy_BN, mask_BN, totals)
    log_ratio_BN = jax.lax.stop_gradient(logp_BN - batch["ref_logps"])
    # Open-Instruct's four KL estimates at once: kl0 = k1, kl1 = k2, kl2 = k3, kl3 = ρ·l (importance weighted)
    metrics = {
        "loss/policy_avg": pg,
        "policy/approxkl_avg": _token_mean(stats["approxkl"], mask_BN, totals),
        "policy/clipfrac_avg": _token_mean(stats["clipfrac"], mask_BN, totals),
        "policy/clipfrac_low_avg": _token_mean(stats["clipfrac_low"], mask_BN, totals),
        "policy/clipfrac_high_avg": _token_mean(stats["clipfrac_high"], mask_BN, totals),
        "policy/entropy_avg": _token_mean(entropy_BN, mask_BN, totals),
        "val/ratio": _token_mean(stats["ratio"], mask_BN, totals),
        "val/ratio_sq": _token_mean(jnp.square(stats["ratio"]), mask_BN, totals),
        "objective/kl0_avg": _token_mean(log_ratio_BN, mask_BN, totals),
        "objective/kl1_avg": _token_mean(0.5 * jnp.square(log_ratio_BN), mask_BN, totals),
        "objective/kl2_avg": _token_mean(jnp.expm1(-log_ratio_BN) + log_ratio_BN, mask_BN, totals),
        "objective/kl3_avg": _token_mean(
            jax.lax.stop_gradient(stats["ratio"]) * log_ratio_BN, mask_BN, totals
        ),
    }
    if kl_loss_estimator:
        kl_loss = aggregate(
            kl.get_kl_estimator(kl_loss_estimator)(logp_BN, batch["ref_logps"]), mask_BN, totals
        )
        loss = loss + hp.kl_coef * kl_loss
        metrics["loss/kl_avg"] = kl_loss
    return loss, metrics


def value_objective(
    params, batch, hp: RLHParams, totals, *, graphdef, aggregation: str, recompute_old_logps: bool
):
    """Clipped value loss of a (micro)batch times the value coefficient, scaled by minibatch totals."""
    model = nnx.merge(graphdef, params)
    mask_BN = batch["response_mask"].astype(jnp.float32)
    values_BN = model.scores(response_hidden(model, batch))
    old_BN = jax.lax.stop_gradient(values_BN) if recompute_old_logps else batch["old_values"]
    loss_BN, clipped_BN = value_loss(values_BN, old_BN, batch["returns"], hp.value_clip)
    value_avg = advantages.get_aggregation(aggregation)(loss_BN, mask_BN, totals)
    metrics = {
        "loss/value_avg": value_avg,
        "val/clipfrac_avg": _token_mean(clipped_BN, mask_BN, totals),
        "val/values_pred": _token_mean(values_BN, mask_BN, totals),
    }
    return hp.value_coef * value_avg, metrics


def online_dpo_objective(params, batch, hp: pairwise.LossHParams, totals, *, graphdef, loss_name: str):
    """A DPO-family loss of a (micro)batch of pairs [R, 2, N], chosen first, weighted (ties weigh 0)."""
    model = nnx.merge(graphdef, params)
    R, _, N = batch["response"].shape  # M = 2R rows once flattened
    flat = {
        "prompt": jnp.repeat(batch["prompt"], 2, axis=0),
        "prompt_mask": jnp.repeat(batch["prompt_mask"], 2, axis=0),
        "response": batch["response"].reshape(2 * R, N),
    }
    mask_MN = batch["response_mask"].reshape(2 * R, N).astype(jnp.float32)
    logp_MN, _ = policy_logps(model, flat, 1.0)
    logp_R2 = jnp.sum(logp_MN * mask_MN, axis=-1).reshape(R, 2)
    len_R2 = jnp.sum(mask_MN, axis=-1).reshape(R, 2)
    ref_R2 = batch["ref_logps"]
    seq = pairwise.SeqLogps(
        chosen=logp_R2[:, 0],
        rejected=logp_R2[:, 1],
        ref_chosen=ref_R2[:, 0],
        ref_rejected=ref_R2[:, 1],
        chosen_len=len_R2[:, 0],
        rejected_len=len_R2[:, 1],
    )
    loss_R, metrics = losses.get_preference_loss(loss_name).fn(seq, hp)
    weight_R, n = batch["weight"], totals["pairs"]
    return jnp.sum(loss_R * weight_R) / n, {k: jnp.sum(v * weight_R) / n for k, v in metrics.items()}


def _policy_rows(tree):
    """Rows 0, 2, 4, ... of every array of a pytree: the policy's samples when odd rows are comparisons."""
    return jax.tree.map(lambda x: x[0::2], tree)


def mixture_advantage_step(rollout, stats, scores_B, adv_hp: advantages.AdvantageHParams, **kwargs):
    """`advantage_step` over the policy's own samples [B/2] of a rollout whose odd rows were drawn from the
    policy/reference mixture (Nash-MD): its KL, entropy and score metrics describe the policy alone."""
    return advantage_step(_policy_rows(rollout), _policy_rows(stats), scores_B[0::2], adv_hp, **kwargs)


def nash_md_data(rollout, stats, scores_B, adv):
    """Training data [R, ...] of Nash-MD: each prompt's policy sample (row 2p) with its per-token reference
    log-probs [R, N] and the probability [R] that it is preferred to the mixture sample (row 2p+1), σ(s − s')
    of their scores (the Bradley-Terry preference of TRL's NashMDTrainer); every pair weighs 1."""
    del adv  # the objective is its own REINFORCE estimator
    scores_R2 = scores_B.reshape(-1, 2)
    probability_R = jax.nn.sigmoid(scores_R2[:, 0] - scores_R2[:, 1])
    out = _policy_rows({k: rollout[k] for k in ROLLOUT_KEYS} | {"ref_logps": stats["ref_logps"]})
    return out | {"probability": probability_R, "weight": jnp.ones_like(probability_R)}


def nash_md_objective(params, batch, hp: RLHParams, totals, *, graphdef):
    """Nash-MD's loss of a (micro)batch of policy samples [R, N] (TRL's NashMDTrainer form), scaled by
    minibatch totals: β·Σ_t sg(log π/π_ref)·log π − (P − ½)·Σ_t log π, P the preference probability over the
    mixture sample. The first term's gradient is the REINFORCE estimate of ∇KL(π‖π_ref), the second raises a
    sample preferred to the mixture's (½ a control variate); β is the KL coefficient (hp.kl_coef). Log-probs
    are the policy's at the sampling temperature, untruncated (`policy_logps`)."""
    model = nnx.merge(graphdef, params)
    mask_RN = batch["response_mask"].astype(jnp.float32)
    logp_RN, entropy_RN = policy_logps(model, batch, hp.temperature)
    logp_RN = jnp.where(mask_RN > 0, logp_RN, 0.0)
    log_ratio_RN = jax.lax.stop_gradient(jnp.where(mask_RN > 0, logp_RN - batch["ref_logps"], 0.0))
    logp_R, ref_R = jnp.sum(logp_RN, axis=-1), jnp.sum(batch["ref_logps"] * mask_RN, axis=-1)
    score_R = (batch["probability"] - 0.5) * logp_R
    loss_R = hp.kl_coef * jnp.sum(log_ratio_RN * logp_RN, axis=-1) - score_R
    weight_R, n = batch["weight"], totals["pairs"]
    margin_R = jax.lax.stop_gradient(logp_R) - ref_R
    per_pair = {
        "loss/score": jax.lax.stop_gradient(score_R),
        "loss/kl": jnp.sum(log_ratio_RN, axis=-1),
        "rewards/probabilities": batch["probability"],
        # TRL's names for the policy's and the reference's log-probs of the policy's sample
        "logps/chosen": jax.lax.stop_gradient(logp_R),
        "logps/rejected": ref_R,
        "rewards/margins": margin_R,
        "rewards/accuracies": (margin_R > 0).astype(jnp.float32),
    }
    metrics = {k: jnp.sum(v * weight_R) / n for k, v in per_pair.items()}
    metrics["policy/entropy_avg"] = _token_mean(entropy_RN, mask_RN, totals)
    return jnp.sum(loss_R * weight_R) / n, metrics


def nash_md_totals(batch):
    """Whole-minibatch denominators of a minibatch of policy samples: their weight (pairs) and tokens."""
    return pair_totals(batch) | {"tokens": jnp.sum(batch["response_mask"].astype(jnp.float32))}


def sequence_totals(batch, *, max_len: int):
    """Whole-minibatch denominators of a minibatch of sequences (`advantages.aggregation_totals`)."""
    return advantages.aggregation_totals(batch["response_mask"], max_len)


def pair_totals(batch):
    """Whole-minibatch denominator of a minibatch of pairs: the weight of its untied pairs (at least 1)."""
    return {"pairs": jnp.maximum(jnp.sum(batch["weight"]), 1.0)}


def _renamed(metrics: dict, role: str) -> dict:
    names = {
        "loss": f"loss/{role}_total",
        "grad_norm": f"{role}/grad_norm",
        "skipped_steps": f"{role}/skipped_steps",
        "learning_rate": "lr" if role == "policy" else f"{role}/lr",
    }
    return {names.get(k, k): v for k, v in metrics.items()}


def rl_step(state: RLState, batch, hp, *, policy_step, value_step=None):
    """One minibatch update of the policy and, when there is one, the value model."""
    policy, metrics = policy_step(state.policy, batch, hp)
    metrics = _renamed(metrics, "policy")
    value = state.value
    if value is not None:
        # The value update waits for the policy's: with no edge between them the compiler may interleave the
        # two backward passes and hold both models' activations and gradients at once.
        policy, batch = jax.lax.optimization_barrier((policy, batch))
        value, value_metrics = value_step(value, batch, hp)
        metrics |= _renamed(value_metrics, "value")
    return RLState(policy=policy, value=value), metrics


def gather_rows(tree, indices):
    """The rows `indices` [K] of every array of a pytree (a minibatch of the training data)."""
    return jax.tree.map(lambda x: x[indices], tree)
