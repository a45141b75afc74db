"""The online-RL runner for stages ppo, grpo, rloo, reinforce_pp and online_dpo; it mirrors `train.run`.

One iteration (the unit of `train.steps`, `train.checkpoint_every`, `train.log_every`) is one rollout batch:
  generation  `rl.samples_per_prompt` responses to each of `rl.rollout_batch` prompts (`sampling.sample`)
  scoring     the reward function; old log-probs, reference log-probs and values computed ONCE (jitted,
              sharded), then advantages (PPO's GAE, GRPO, RLOO, REINFORCE++ ...) or, for online_dpo, pairs
  training    `rl.epochs` passes of shuffled minibatch updates, jitted with the rule-table shardings and the
              state donated; `rl.recompute_old_logps` reproduces the original JAX bug (ratio exactly 1)

Roles: the policy (train.init_from, an SFT run), a frozen reference (the same init, no optimizer state), the
reward (rl.reward_model and/or rl.verifiable) and, for ppo, a value model (a scalar head initialised from the
reward model or the policy, per rl.value_init) with its own optimizer.

The trainer scores tokens under the distribution they were sampled from (logits / temperature, top-k/top-p
truncation); the gap to the sampler's own log-probs is logged as debug/logprob_gap_{max,mean}.

Exact resume: the prompts, sampling key and minibatch order of iteration i are pure functions of (seed, i);
checkpoints hold the policy and value states and the adaptive KL coefficient.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl import checkpoint, losses, rewards, sampling, sharding, steps
from jaxrl import config as config_lib
from jaxrl import metrics as metrics_lib
from jaxrl import workdir as workdir_lib
from jaxrl.config import Config, ConfigError
from jaxrl.data import pipeline
from jaxrl.metrics import MetricWriter
from jaxrl.models import init as model_init
from jaxrl.rl import advantages, kl
from jaxrl.rl.losses import RLHParams, ppo_policy_loss, processed_logits, token_logps_and_entropy, value_loss

ROLLOUT_STREAM, MINIBATCH_STREAM = 1, 2
STAGE_ESTIMATORS = {"ppo": "gae", "grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp"}


@flax.struct.dataclass
class RLState:
    """Everything an RL checkpoint holds on device: the policy's and the value model's train states."""

    policy: steps.TrainState
    value: steps.TrainState | None = None


def estimator_name(cfg: Config) -> str:
    """The advantage estimator of a PPO-family stage (rl.advantage, or the stage's own)."""
    return cfg.rl.advantage or STAGE_ESTIMATORS[cfg.stage]


def kl_in_loss(cfg: Config) -> bool:
    """Whether the KL penalty is a loss term (GRPO) rather than a token reward (PPO, RLOO, REINFORCE++)."""
    return cfg.rl.kl_mode == "loss" or (cfg.rl.kl_mode == "auto" and cfg.stage == "grpo")


def response_hidden(model, batch):
    """Hidden states [B, N, D] that predict (and value) each response token, after left-padded prompts."""
    tokens_BT, positions_BT, segments_BT = rewards.join_prompt_response(
        batch["prompt"], batch["prompt_mask"], batch["response"]
    )
    P = batch["prompt"].shape[1]
    return model.hidden(tokens_BT, positions_BT, segments_BT)[:, P - 1 : -1]


def policy_logps(model, batch, temperature, *, top_k: int, top_p: float):
    """Log-probs [B, N] of the response tokens and entropies [B, N] under the processed distribution."""
    x_BNV = processed_logits(
        model.logits(response_hidden(model, batch)), temperature, top_k=top_k, top_p=top_p
    )
    return token_logps_and_entropy(x_BNV, batch["response"])


def rollout_stats(
    params, batch, hp: RLHParams, *, graphdef, value_graphdef, top_k: int, top_p: float, sequence_logps: bool
):
    """Old and reference per-token log-probs, entropies and old values [B, N] of a rollout batch (once per
    batch); with `sequence_logps`, also the reference's temperature-1 summed log-probs [B] (online DPO)."""
    mask_BN = batch["response_mask"].astype(jnp.float32)
    policy, ref = nnx.merge(graphdef, params["policy"]), nnx.merge(graphdef, params["ref"])
    logits_BNV = policy.logits(response_hidden(policy, batch))
    ref_logits_BNV = ref.logits(response_hidden(ref, batch))
    processed_BNV = processed_logits(logits_BNV, hp.temperature, top_k=top_k, top_p=top_p)
    logp_BN, entropy_BN = token_logps_and_entropy(processed_BNV, batch["response"])
    # The reference is tempered but never truncated: its own top-k / top-p set may exclude a token the policy
    # sampled, which would make the KL estimate infinite.
    ref_logp_BN, _ = token_logps_and_entropy(
        processed_logits(ref_logits_BNV, hp.temperature), batch["response"]
    )
    out = {
        "old_logps": logp_BN * mask_BN,
        "ref_logps": ref_logp_BN * mask_BN,
        "entropy": entropy_BN * mask_BN,
    }
    if value_graphdef is not None:
        value = nnx.merge(value_graphdef, params["value"])
        out["old_values"] = value.scores(response_hidden(value, batch)) * mask_BN
    else:
        out["old_values"] = jnp.zeros_like(mask_BN)
    if sequence_logps:
        # DPO's implicit reward is defined on the model's own distribution, not the tempered one.
        out["ref_logps_t1"] = jnp.sum(
            token_logps_and_entropy(ref_logits_BNV, batch["response"])[0] * mask_BN, -1
        )
    return out


def _token_mean(x_BN, mask_BN, totals):
    return jnp.sum(x_BN * mask_BN) / jnp.maximum(totals["tokens"], 1.0)


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
    top_k: int,
    top_p: float,
):
    """Clipped-surrogate policy loss of a (micro)batch (+ KL, entropy terms), scaled by minibatch totals."""
    model = nnx.merge(graphdef, params)
    mask_BN = batch["response_mask"].astype(jnp.float32)
    logp_BN, entropy_BN = policy_logps(model, batch, hp.temperature, top_k=top_k, top_p=top_p)
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


def online_dpo_objective(params, batch, hp: losses.LossHParams, totals, *, graphdef, loss_name: str):
    """A DPO-family loss of a (micro)batch of pairs [R, 2, N], chosen first, weighted (ties weigh 0)."""
    model = nnx.merge(graphdef, params)
    R, _, N = batch["response"].shape  # M = 2R rows once flattened
    flat = {
        "prompt": jnp.repeat(batch["prompt"], 2, axis=0),
        "prompt_mask": jnp.repeat(batch["prompt_mask"], 2, axis=0),
        "response": batch["response"].reshape(2 * R, N),
    }
    mask_MN = batch["response_mask"].reshape(2 * R, N).astype(jnp.float32)
    logp_MN, _ = policy_logps(model, flat, 1.0, top_k=0, top_p=1.0)
    logp_R2 = jnp.sum(logp_MN * mask_MN, axis=-1).reshape(R, 2)
    len_R2 = jnp.sum(mask_MN, axis=-1).reshape(R, 2)
    ref_R2 = batch["ref_logps"]
    seq = losses.SeqLogps(
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
        value, value_metrics = value_step(value, batch, hp)
        metrics |= _renamed(value_metrics, "value")
    return RLState(policy=policy, value=value), metrics


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


def fixed_left_pad(prompts: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`sampling.left_pad` to a fixed width, so every rollout batch has one shape (one compile)."""
    ids, mask = sampling.left_pad(prompts, pad_id)
    extra = width - ids.shape[1]
    return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (extra, 0))))


def prompt_set(cfg: Config, tok) -> tuple[list, np.ndarray, np.ndarray, list[str]]:
    """Policy-training prompt records and their fixed-width left-padded ids / masks [n, P]; a report."""
    r = cfg.rl
    if r.prompt_set in _synthetic_prompt_sets():
        from jaxrl.synthetic import make_prompt_set

        records = make_prompt_set(r.prompt_set, r.num_prompts, seed=cfg.seed)
    else:
        from jaxrl.data import readers

        if not Path(r.prompt_set).exists():
            raise ConfigError(
                f"rl.prompt_set {r.prompt_set!r} is neither a synthetic prompt set "
                f"{_synthetic_prompt_sets()} nor an existing prompts file"
            )
        records = list(readers.read(r.prompt_set, "prompts", on_error=cfg.data.on_error).records)[
            : r.num_prompts
        ]
    encoded = [tok.encode_prompt(rec.prompt) for rec in records]
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= cfg.data.max_prompt_len]
    report = [
        f"prompts {r.prompt_set}: {len(keep)} of {len(records)} kept (longer than "
        f"data.max_prompt_len={cfg.data.max_prompt_len} dropped)"
    ]
    if len(keep) < r.rollout_batch:
        raise ConfigError(f"only {len(keep)} prompts fit data.max_prompt_len, fewer than rl.rollout_batch")
    ids, mask = fixed_left_pad([encoded[i] for i in keep], cfg.data.max_prompt_len, tok.pad_id)
    return [records[i] for i in keep], ids, mask, report


def _synthetic_prompt_sets() -> tuple[str, ...]:
    from jaxrl.synthetic import PROMPT_SETS

    return PROMPT_SETS


def _config_hash(source: str) -> str | None:
    path = Path(source) / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else None


def lineage(cfg: Config) -> dict:
    """Which checkpoints this run's roles come from (paths and config hashes)."""
    r = cfg.rl
    sources = {"policy_init": cfg.train.init_from, "reference": cfg.train.init_from}
    for k, source in enumerate(config_lib.reward_model_sources(r.reward_model)):
        sources[f"reward_model{k}"] = source
    if cfg.stage == "ppo":
        sources["value_init"] = (
            config_lib.reward_model_sources(r.reward_model)[0]
            if r.value_init == "reward_model"
            else cfg.train.init_from
        )
    out = {
        name: {"path": str(Path(p).absolute()) if p else "", "config_hash": _config_hash(p) if p else None}
        for name, p in sources.items()
    }
    out["verifiable"] = r.verifiable
    return out


class _Frozen:
    """Frozen parameters (reference), on device or, with offload, on the host between uses."""

    def __init__(self, params, shardings, offload: bool):
        self.shardings, self.offload = shardings, offload
        self._params = jax.device_get(params) if offload else params

    def get(self):
        return jax.device_put(self._params, self.shardings) if self.offload else self._params


def _value_params(cfg: Config, reward_fn, policy_params, mesh, preset, log):
    """(value graphdef, initial value params): the first reward model's, or the policy's with a fresh head."""
    if cfg.rl.value_init == "reward_model":
        rm = reward_fn.models[0]
        return rm.graphdef, rm.params
    value_cfg = dataclasses.replace(model_init.stage_model_config(cfg), head="scalar")
    graphdef, _ = model_init.abstract_model(value_cfg)
    fresh = model_init.init_params(value_cfg, cfg.seed + 1, mesh, preset)
    return graphdef, model_init.merge_init(fresh, policy_params, log)


def _mean_rows(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _host_rollout_metrics(tokens_BN, mask_BN, eos_id: int, components: dict) -> dict[str, float]:
    lengths_B = mask_BN.sum(axis=-1)
    contains_eos_B = ~rewards.missing_eos(tokens_BN, mask_BN, eos_id)
    out = {
        "completions/mean_length": float(lengths_B.mean()),
        "completions/min_length": float(lengths_B.min()),
        "completions/max_length": float(lengths_B.max()),
        "completions/clipped_ratio": float(1.0 - contains_eos_B.mean()),
        "val/contain_eos_token": float(contains_eos_B.mean()),
        "val/num_eos_tokens": float(np.sum((tokens_BN == eos_id) & mask_BN)),
    }
    for name, values in components.items():
        if name != "score":
            out[f"rewards/{name}/mean"] = float(np.mean(values))
            out[f"rewards/{name}/std"] = float(np.std(values))
    return out


def _world_eval(
    cfg: Config, graphdef, params, ref_params, tok, split: str = "test"
) -> tuple[dict, dict | None]:
    """(metrics, per-prompt record) of the synthetic world's evaluation on a split; nothing for other data."""
    if cfg.data.source != "synthetic" or not cfg.data.eval_prompts_per_domain:
        return {}, None
    if split == "validation" and not cfg.data.val_prompts_per_domain:
        return {}, None
    from jaxrl import evaluate

    return evaluate.synthetic_eval(cfg, graphdef, params, ref_params, tok, split=split)


def _gather_rows(tree, indices):
    return jax.tree.map(lambda x: x[indices], tree)


@dataclasses.dataclass
class _Context:
    """What a run builds once besides the train state: tokenizer, prompts, mesh, models, frozen roles."""

    cfg: Config
    tok: object
    records: list
    prompt_ids: np.ndarray  # [n, P] left-padded to data.max_prompt_len
    prompt_mask: np.ndarray
    order: pipeline.BatchOrder
    mesh: object
    preset: str
    batch_sharding: object
    graphdef: object
    value_graphdef: object
    ref: _Frozen
    reward_fn: rewards.CompositeReward
    units: int  # what a rollout batch trains on: sequences, or pairs for online DPO
    mb_units: int  # ... per minibatch


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The jitted programs of an iteration."""

    stats: object  # (params, rollout, rl_hp) -> old / reference log-probs, values [B, N]
    advantages: object  # (rollout, stats, scores, adv_hp) -> ({advantages, returns}, rollout metrics)
    pairs: object  # (rollout, stats, chosen_second, weight) -> online-DPO pair arrays
    gather: object  # (data, indices) -> a minibatch, batch-sharded
    update: object  # (state, minibatch, hp) -> (state, metrics), state donated


def _hparams(cfg: Config, kl_coef: float) -> tuple[RLHParams, advantages.AdvantageHParams]:
    """The loss and estimator hyperparameters of an iteration (the KL coefficient may adapt)."""
    r, in_loss = cfg.rl, kl_in_loss(cfg)
    rl_hp = RLHParams.create(
        temperature=r.temperature,
        clip_low=r.clip,
        clip_high=r.clip_high or r.clip,
        dual_clip=r.dual_clip,
        value_clip=r.value_clip,
        value_coef=r.value_coef,
        entropy_coef=r.entropy_coef,
        kl_coef=kl_coef if in_loss else 0.0,
    )
    reward_kl = 0.0 if (in_loss or cfg.stage == "online_dpo") else kl_coef
    adv_hp = advantages.AdvantageHParams.create(
        gamma=r.gamma,
        lam=r.lam,
        kl_coef=reward_kl,
        whiten=float(r.whiten_advantages),
        scale_rewards=float(r.scale_rewards),
    )
    return rl_hp, adv_hp


def _rollout_example(cfg: Config, rows: int) -> dict:
    P, N = cfg.data.max_prompt_len, cfg.rl.max_new_tokens
    return {
        "prompt": jax.ShapeDtypeStruct((rows, P), jnp.int32),
        "prompt_mask": jax.ShapeDtypeStruct((rows, P), jnp.int32),
        "response": jax.ShapeDtypeStruct((rows, N), jnp.int32),
        "response_mask": jax.ShapeDtypeStruct((rows, N), jnp.bool_),
    }


def _minibatch_example(cfg: Config, mb_units: int) -> dict:
    P, N = cfg.data.max_prompt_len, cfg.rl.max_new_tokens
    if cfg.stage == "online_dpo":
        shapes = {
            "prompt": (mb_units, P),
            "prompt_mask": (mb_units, P),
            "response": (mb_units, 2, N),
            "response_mask": (mb_units, 2, N),
            "ref_logps": (mb_units, 2),
            "weight": (mb_units,),
        }
    else:
        shapes = {
            "prompt": (mb_units, P),
            "prompt_mask": (mb_units, P),
            "response": (mb_units, N),
            "response_mask": (mb_units, N),
        }
        shapes |= {
            k: (mb_units, N) for k in ("old_logps", "ref_logps", "old_values", "advantages", "returns")
        }
    dtypes = {
        "prompt": jnp.int32,
        "prompt_mask": jnp.int32,
        "response": jnp.int32,
        "response_mask": jnp.bool_,
    }
    return {k: jax.ShapeDtypeStruct(shape, dtypes.get(k, jnp.float32)) for k, shape in shapes.items()}


def update_fn(cfg: Config, graphdef, value_graphdef, optimizers: dict):
    """The pure minibatch update (policy and, for ppo, value) of the stage; preflight compiles this one."""
    r, t, N = cfg.rl, cfg.train, cfg.rl.max_new_tokens
    if cfg.stage == "online_dpo":
        objective = functools.partial(online_dpo_objective, graphdef=graphdef, loss_name=cfg.loss.name)
        totals_fn = lambda b: {"pairs": jnp.maximum(jnp.sum(b["weight"]), 1.0)}
        policy_step = steps.bind_step(objective, totals_fn, optimizers["policy"], t.grad_accum)
        return functools.partial(rl_step, policy_step=policy_step)
    totals_fn = lambda b: advantages.aggregation_totals(b["response_mask"], N)
    objective = functools.partial(
        policy_objective,
        graphdef=graphdef,
        aggregation=r.aggregation,
        kl_loss_estimator=r.kl_loss_estimator if kl_in_loss(cfg) else "",
        recompute_old_logps=r.recompute_old_logps,
        top_k=r.top_k,
        top_p=r.top_p,
    )
    policy_step = steps.bind_step(objective, totals_fn, optimizers["policy"], t.grad_accum)
    value_step = None
    if value_graphdef is not None:
        objective = functools.partial(
            value_objective,
            graphdef=value_graphdef,
            aggregation=r.aggregation,
            recompute_old_logps=r.recompute_old_logps,
        )
        value_step = steps.bind_step(objective, totals_fn, optimizers["value"], t.grad_accum)
    return functools.partial(rl_step, policy_step=policy_step, value_step=value_step)


def _programs(cfg: Config, ctx: _Context, abstract_state, optimizers: dict) -> _Programs:
    """Jits the iteration's programs with the rule-table shardings (built once; shapes never change)."""
    r = cfg.rl
    abstract_policy = jax.eval_shape(lambda: abstract_state.policy.params)
    stats_params = {"policy": abstract_policy, "ref": abstract_policy}
    if ctx.value_graphdef is not None:
        stats_params["value"] = jax.eval_shape(lambda: abstract_state.value.params)
    stats_fn = functools.partial(
        rollout_stats,
        graphdef=ctx.graphdef,
        value_graphdef=ctx.value_graphdef,
        top_k=r.top_k,
        top_p=r.top_p,
        sequence_logps=cfg.stage == "online_dpo",
    )
    rows = r.rollout_batch * r.samples_per_prompt
    estimator = "gae" if cfg.stage == "online_dpo" else estimator_name(cfg)  # online DPO: metrics only
    advantage_fn = functools.partial(
        advantage_step, estimator=estimator, group_size=r.samples_per_prompt, kl_estimator=r.kl_estimator
    )
    update = steps.make_step(
        update_fn(cfg, ctx.graphdef, ctx.value_graphdef, optimizers),
        abstract_state,
        _minibatch_example(cfg, ctx.mb_units),
        ctx.mesh,
        ctx.preset,
    )
    return _Programs(
        stats=steps.make_eval_step(stats_fn, stats_params, _rollout_example(cfg, rows), ctx.mesh, ctx.preset),
        advantages=jax.jit(advantage_fn),
        pairs=jax.jit(make_pairs, out_shardings=ctx.batch_sharding),
        gather=jax.jit(_gather_rows, out_shardings=ctx.batch_sharding),
        update=update,
    )


@dataclasses.dataclass
class _Generation:
    """A sampled rollout batch: prompts, device arrays [B, N] and their host copies and texts."""

    prompts: rewards.PromptBatch
    rollout: dict  # device: prompt, prompt_mask, response, response_mask, sampler_logps
    tokens: np.ndarray
    mask: np.ndarray
    texts: list[str]


def _generate(ctx: _Context, params, iteration: int) -> _Generation:
    """Samples `samples_per_prompt` responses to each of the iteration's prompts (key folded from it)."""
    r = ctx.cfg.rl
    index = np.repeat(ctx.order.indices(iteration), r.samples_per_prompt)
    prompts = rewards.PromptBatch(
        [ctx.records[i] for i in index], ctx.prompt_ids[index], ctx.prompt_mask[index]
    )
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(ctx.cfg.seed), ROLLOUT_STREAM), iteration)
    ids, mask = jax.device_put((prompts.ids_BP, prompts.mask_BP), ctx.batch_sharding)
    # Truncation keywords go to the sampler only when set.
    truncation = ({"top_k": r.top_k} if r.top_k else {}) | ({"top_p": r.top_p} if r.top_p < 1.0 else {})
    with sharding.use_mesh(ctx.mesh, ctx.preset):  # the sampler lays out its batch and KV cache by the preset
        response, sampler_logps, response_mask = sampling.sample(
            ctx.graphdef,
            params,
            ids,
            mask,
            key,
            np.float32(r.temperature),
            max_new=r.max_new_tokens,
            eos_id=ctx.tok.eos_id,
            pad_id=ctx.tok.pad_id,
            **truncation,
        )
    tokens, host_mask = _fetch((response, response_mask))
    rollout = {
        "prompt": ids,
        "prompt_mask": mask,
        "response": response,
        "response_mask": response_mask,
        "sampler_logps": sampler_logps,
    }
    return _Generation(
        prompts,
        jax.device_put(rollout, ctx.batch_sharding),
        tokens,
        host_mask,
        _decode(ctx.tok, tokens, host_mask),
    )


def _score(ctx: _Context, programs: _Programs, state: RLState, gen: _Generation, kl_coef: float):
    """Rewards, then old / reference log-probs and values once, then advantages (or online-DPO pairs):
    (training data, its hyperparameters, rollout metrics on device, reward components)."""
    components = ctx.reward_fn.components(gen.prompts, gen.tokens, gen.mask, gen.texts)
    scores_B = components["score"]
    rl_hp, adv_hp = _hparams(ctx.cfg, kl_coef)
    params = {"policy": state.policy.params, "ref": ctx.ref.get()}
    if ctx.value_graphdef is not None:
        params["value"] = state.value.params
    rollout_inputs = {k: gen.rollout[k] for k in ("prompt", "prompt_mask", "response", "response_mask")}
    stats = programs.stats(params, rollout_inputs, rl_hp)
    adv, metrics = programs.advantages(
        gen.rollout, stats, jax.device_put(scores_B, ctx.batch_sharding), adv_hp
    )
    if ctx.cfg.stage != "online_dpo":
        data = rollout_inputs | {k: stats[k] for k in ("old_logps", "ref_logps", "old_values")} | adv
        return data, rl_hp, metrics, components
    pair_scores = scores_B.reshape(-1, 2)
    chosen_second, weight = jax.device_put(
        (pair_scores[:, 1] > pair_scores[:, 0], (pair_scores[:, 0] != pair_scores[:, 1]).astype(np.float32)),
        ctx.batch_sharding,
    )
    data = programs.pairs(gen.rollout, stats, chosen_second, weight)
    return data, steps.loss_hparams(ctx.cfg), metrics, components


def _train(ctx: _Context, programs: _Programs, state: RLState, data, hp, iteration: int):
    """`rl.epochs` shuffled passes of minibatch updates; the order is a function of (seed, iteration, epoch).
    Metrics stay on device (no host sync per minibatch)."""
    collected = []
    for epoch in range(ctx.cfg.rl.epochs):
        permutation = np.random.default_rng([ctx.cfg.seed, MINIBATCH_STREAM, iteration, epoch]).permutation(
            ctx.units
        )
        for k in range(ctx.units // ctx.mb_units):
            minibatch = programs.gather(data, permutation[k * ctx.mb_units : (k + 1) * ctx.mb_units])
            state, metrics = programs.update(state, minibatch, hp)
            collected.append(metrics)
    return state, collected


def _iteration_metrics(ctx: _Context, gen: _Generation, components, step_metrics, rollout_metrics) -> dict:
    """One row of the iteration's metrics (TRL / Open-Instruct names), fetched once."""
    values = _mean_rows(jax.device_get(step_metrics))
    values |= {k: float(v) for k, v in jax.device_get(rollout_metrics).items()}
    if "val/ratio_sq" in values:
        values["val/ratio_var"] = values.pop("val/ratio_sq") - values["val/ratio"] ** 2
    values |= _host_rollout_metrics(gen.tokens, gen.mask, ctx.tok.eos_id, components)
    if ctx.cfg.stage == "online_dpo":
        pair_scores = components["score"].reshape(-1, 2)
        values["objective/scores_margin"] = float(np.mean(np.abs(pair_scores[:, 0] - pair_scores[:, 1])))
        values["val/tie_rate"] = float(np.mean(pair_scores[:, 0] == pair_scores[:, 1]))
        values["beta"] = ctx.cfg.loss.beta
    return values


def _adapted_kl_coef(cfg: Config, kl_coef: float, kl: float) -> float:
    """Ziegler et al.'s proportional controller towards rl.kl_target (TRL's AdaptiveKLController)."""
    r = cfg.rl
    if r.kl_target <= 0 or cfg.stage == "online_dpo":
        return kl_coef
    error = float(np.clip(kl / r.kl_target - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * r.rollout_batch * r.samples_per_prompt / r.kl_horizon)


def _check_divisible(cfg: Config, mesh, preset: str) -> tuple[int, int]:
    """(units, minibatch units) per rollout batch; both must split over the mesh's batch shards."""
    r, dpo = cfg.rl, cfg.stage == "online_dpo"
    rows = r.rollout_batch * r.samples_per_prompt
    units, mb_units = (r.rollout_batch, r.minibatch // 2) if dpo else (rows, r.minibatch)
    divisor = sharding.batch_divisor(mesh, preset)
    micro = mb_units // cfg.train.grad_accum
    if rows % divisor or micro % divisor:
        raise ConfigError(
            f"the rollout batch ({rows} sequences) and each microbatch ({micro} "
            f"{'pairs' if dpo else 'sequences'}) must divide over the {divisor} batch shards of "
            f"mesh {dict(mesh.shape)}"
        )
    return units, mb_units


def _context(cfg: Config, workdir: Path, log) -> tuple[_Context, dict, list[str]]:
    """Tokenizer, prompts, mesh, the policy / reference / reward / value roles, the initial trainables."""
    r, t = cfg.rl, cfg.train
    mesh, preset = sharding.make_mesh(cfg.mesh), cfg.mesh.preset
    units, mb_units = _check_divisible(cfg, mesh, preset)
    batch_sharding = sharding.batch_sharding(mesh, preset)
    tok = pipeline.load_tokenizer(cfg)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}"
        )
    if jax.process_index() == 0 and hasattr(tok, "save"):
        tok.save(workdir / "tokenizer.json")
    records, prompt_ids, prompt_mask, report = prompt_set(cfg, tok)

    model_cfg = model_init.stage_model_config(cfg)
    graphdef, abstract_params = model_init.abstract_model(model_cfg)
    params = model_init.init_params(model_cfg, cfg.seed, mesh, preset)
    if t.init_from:
        params = model_init.merge_init(params, model_init.load_run_params(t.init_from, mesh, preset)[0], log)
    else:
        log("warning: no train.init_from: the policy and its reference are the random initialisation")
    # The train state is built from these by a jit, so it holds new buffers: donating it never frees the ref.
    ref = _Frozen(params, sharding.tree_shardings(abstract_params, preset, mesh), r.offload_frozen)

    def reference_responder(prompts: rewards.PromptBatch):
        arrays = jax.device_put((prompts.ids_BP, prompts.mask_BP), batch_sharding)
        with sharding.use_mesh(mesh, preset):
            tokens, _, mask = sampling.sample(
                graphdef,
                ref.get(),
                *arrays,
                jax.random.PRNGKey(0),
                np.float32(0.0),
                max_new=r.max_new_tokens,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
            )
        tokens, mask = _fetch((tokens, mask))
        return tokens, mask, _decode(tok, tokens, mask)

    reward_fn = rewards.make_reward_fn(
        r, tokenizer=tok, mesh=mesh, preset=preset, reference_responder=reference_responder
    )
    trainable = {"policy": params, "value": None}
    value_graphdef = None
    if cfg.stage == "ppo":
        value_graphdef, trainable["value"] = _value_params(cfg, reward_fn, params, mesh, preset, log)
    ctx = _Context(
        cfg=cfg,
        tok=tok,
        records=records,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        order=pipeline.BatchOrder(len(records), r.rollout_batch, cfg.seed),
        mesh=mesh,
        preset=preset,
        batch_sharding=batch_sharding,
        graphdef=graphdef,
        value_graphdef=value_graphdef,
        ref=ref,
        reward_fn=reward_fn,
        units=units,
        mb_units=mb_units,
    )
    return ctx, trainable, report


def _optimizers(cfg: Config, ctx: _Context) -> dict:
    """(tx, schedule) per trainable role; the schedules count minibatch updates."""
    updates = cfg.train.steps * cfg.rl.epochs * (ctx.units // ctx.mb_units)
    out = {"policy": steps.make_optimizer(cfg.optim, updates)}
    if ctx.value_graphdef is not None:
        out["value"] = steps.make_optimizer(
            dataclasses.replace(cfg.optim, lr=cfg.rl.value_lr or cfg.optim.lr), updates
        )
    return out


def _world_eval_of(ctx: _Context, state: RLState, split: str = "test") -> tuple[dict, dict | None]:
    return _world_eval(ctx.cfg, ctx.graphdef, state.policy.params, ctx.ref.get(), ctx.tok, split)


def run(cfg: Config, workdir: str | Path, *, log=print, stop_after: int | None = None) -> dict:
    """Trains one online-RL stage in `workdir` (resuming if it holds a checkpoint); returns the final summary.

    `cfg` is resolved and validated (train.run, which calls this, does it). `stop_after` ends the loop early
    at that iteration without finishing the run (for tests of resume)."""
    workdir = Path(workdir).absolute()
    return workdir_lib.run_in(
        workdir, cfg, lambda commit: _run(cfg, workdir, commit, log, stop_after), log=log
    )


def _run(cfg: Config, workdir: Path, commit, log, stop_after: int | None) -> dict:
    t = cfg.train
    ctx, trainable, report = _context(cfg, workdir, log)
    for line in report:
        log(line)
    run_lineage = lineage(cfg)
    if jax.process_index() == 0:
        (workdir / "lineage.json").write_text(json.dumps(run_lineage, indent=2) + "\n")
    optimizers = _optimizers(cfg, ctx)

    def build(policy, value):
        value_state = (
            None if value is None else steps.new_train_state(value, optimizers["value"][0], cfg.seed, None)
        )
        return RLState(
            policy=steps.new_train_state(policy, optimizers["policy"][0], cfg.seed, None), value=value_state
        )

    abstract_state = jax.eval_shape(build, trainable["policy"], trainable["value"])
    state_shardings = sharding.tree_shardings(abstract_state, ctx.preset, ctx.mesh)
    state = jax.jit(build, out_shardings=state_shardings)(trainable["policy"], trainable["value"])
    del trainable
    programs = _programs(cfg, ctx, abstract_state, optimizers)

    commit()  # the run has started: from here on the workdir belongs to this config
    kl_coef, eval_initial, initial_per_prompt, start = float(cfg.rl.kl_coef), None, None, 0
    ckpt = checkpoint.Checkpointer(workdir, every=t.checkpoint_every, keep=t.keep_checkpoints)
    restored = ckpt.restore_latest(
        checkpoint.abstract_with_shardings(abstract_state, state_shardings), log=log
    )
    if restored is not None:
        latest, state, meta = restored
        start, kl_coef, eval_initial = int(meta["step"]), float(meta["kl_coef"]), meta.get("eval_initial")
        initial_per_prompt = meta.get("eval_initial_per_prompt")
        log(f"resumed from {workdir}/checkpoints/{latest} at iteration {start}")
    metrics_lib.truncate_after(workdir, start if start else -1, final=start >= t.steps)
    resumed_last = metrics_lib.last_logged(workdir, prefix="") if start else {}
    meta = lambda step: {"step": step, "kl_coef": kl_coef, "eval_initial": eval_initial,
                         "eval_initial_per_prompt": initial_per_prompt}

    writer = MetricWriter(workdir, tensorboard=t.tensorboard)
    if start == 0:
        eval_initial, initial_per_prompt = _world_eval_of(ctx, state)
        writer.write(0, {f"eval/{k}": v for k, v in eval_initial.items()})
    progress = workdir_lib.progress(start, t.steps, enabled=t.progress and jax.process_index() == 0)
    last: dict[str, float] = resumed_last
    end = t.steps if stop_after is None else min(stop_after, t.steps)
    failure, updates_per_iteration = None, None
    for it in range(start, end):
        t0 = time.perf_counter()
        gen = _generate(ctx, state.policy.params, it)
        t1 = time.perf_counter()
        data, hp, rollout_metrics, components = _score(ctx, programs, state, gen, kl_coef)
        jax.block_until_ready(data)
        t2 = time.perf_counter()
        state, step_metrics = _train(ctx, programs, state, data, hp, it)
        jax.block_until_ready(state)
        t3 = time.perf_counter()

        values = _iteration_metrics(ctx, gen, components, step_metrics, rollout_metrics)
        values |= {
            "objective/kl_coef": kl_coef,
            "episode": float((it + 1) * len(gen.texts)),
            "time/generation": t1 - t0,
            "time/scoring": t2 - t1,
            "time/training": t3 - t2,
            "time/iteration": t3 - t0,
        }
        kl_coef = _adapted_kl_coef(cfg, kl_coef, values["objective/kl"])
        last = values
        applied, skipped = (int(x) for x in jax.device_get((state.policy.step, state.policy.skipped)))
        updates_per_iteration = updates_per_iteration or max(1, (applied + skipped) // (it + 1))
        failure = workdir_lib.skip_verdict(skipped, applied + skipped, updates_per_iteration * t.steps,
                                           t.max_skipped_fraction)
        if failure:
            break
        if (it + 1) % t.log_every == 0 or it + 1 == end:
            writer.write(it + 1, values)
        if t.eval_every and (it + 1) % t.eval_every == 0 and it + 1 < t.steps:
            writer.write(
                it + 1, {f"val/{k}": v for k, v in _world_eval_of(ctx, state, "validation")[0].items()}
            )
        ckpt.save(it + 1, state, meta(it + 1))
        progress.update(1)
        progress.set_postfix(score=f"{values['objective/scores']:.3f}", kl=f"{values['objective/kl']:.3f}")
    progress.close()
    skipped = int(jax.device_get(state.policy.skipped))
    if failure:
        ckpt.close()
        writer.close()
        raise workdir_lib.fail(
            workdir, cfg, failure, log=log, steps=t.steps, skipped_steps=skipped, train=last
        )

    if stop_after is not None and end < t.steps:
        ckpt.save(end, state, meta(end), force=True)
        ckpt.close()
        writer.close()
        return {"stopped_at": end}

    ckpt.save(t.steps, state, meta(t.steps), force=True)
    ckpt.close()
    val_metrics = _world_eval_of(ctx, state, "validation")[0]
    eval_metrics, per_prompt = _world_eval_of(ctx, state)
    writer.write(t.steps, {f"val/{k}": v for k, v in val_metrics.items()}
                 | {f"eval/{k}": v for k, v in eval_metrics.items()})
    writer.close()
    if bad := workdir_lib.nonfinite_eval(eval_metrics):
        raise workdir_lib.fail(workdir, cfg, f"the final evaluation is not finite: {', '.join(bad)}", log=log,
                               steps=t.steps, skipped_steps=skipped, train=last, eval=eval_metrics)
    checkpoint.save_params(checkpoint.final_params_dir(workdir), state.policy.params)
    summary = {
        "stage": cfg.stage,
        "status": "finished",
        "steps": t.steps,
        "skipped_steps": skipped,
        "train": last,
        "eval": eval_metrics,
        "val": val_metrics,
        "eval_initial": eval_initial or {},
        "lineage": run_lineage,
        "data": report,
    }
    if per_prompt is not None:
        summary["eval_per_prompt"] = per_prompt
    if initial_per_prompt is not None:  # the starting policy on the same prompts: paired differences
        summary["eval_initial_per_prompt"] = initial_per_prompt
    workdir_lib.write_summary(workdir, summary)
    log(f"finished {cfg.stage}: eval {json.dumps({k: round(v, 4) for k, v in eval_metrics.items()})}")
    return summary


def _fetch(arrays):
    # Every process needs the whole batch to decode and score it; on one process this is a plain fetch.
    if jax.process_count() == 1:
        return tuple(np.asarray(a) for a in jax.device_get(arrays))
    from jax.experimental import multihost_utils

    return tuple(np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in arrays)


def _decode(tok, tokens_BN: np.ndarray, mask_BN: np.ndarray) -> list[str]:
    return [
        tok.decode(row[: int(n)].tolist()) for row, n in zip(tokens_BN, mask_BN.sum(axis=-1), strict=True)
    ]
