"""Held-out evaluation of an online-RL run on real data (a prompts file), where no gold reward exists.

`rl.eval_prompts` prompts that the run never trains on (the last of `rl.prompt_set`, which training then
stops short of, or the first of `rl.eval_prompt_set`) are answered by the policy as it samples in training
(the run's temperature, `rl.samples_per_prompt` responses each), with the same sampling keys at every
evaluation (so two points of the curve differ by the policy, not by the draws), and scored by the run's own
reward. Metrics (the runner writes them as val/*, every `train.eval_every` iterations and at the end):

  score, score_se        the run's reward of the responses (mean; standard error over prompts)
  rewards/<part>         each part of it (rm: the reward model's raw score; missing_eos_penalty, ...)
  kl                     KL(policy || reference) per response, sum over tokens of log pi - log pi_ref on the
                         samples (both at the sampling temperature, as objective/kl)
  length                 response tokens
  contain_eos_token      the fraction of responses that end with EOS
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from jaxrl import rewards, steps
from jaxrl.config import Config, ConfigError

EVAL_STREAM = 11  # a key stream of its own (rollouts and minibatch orders use others)


@dataclasses.dataclass(frozen=True)
class HeldOut:
    records: list
    ids: np.ndarray  # [n, P] left-padded to data.max_prompt_len
    mask: np.ndarray


def source(cfg: Config) -> str:
    return cfg.rl.eval_prompt_set or cfg.rl.prompt_set


def check(cfg: Config) -> None:
    """Config-level checks (no file read): held-out prompts come from a prompts file."""
    from jaxrl.synthetic import PROMPT_SETS

    r = cfg.rl
    if r.eval_prompt_set and not r.eval_prompts:
        raise ConfigError("rl.eval_prompt_set is set but rl.eval_prompts is 0 (how many to evaluate on)")
    if r.eval_prompts and source(cfg) in PROMPT_SETS:
        raise ConfigError(
            f"rl.eval_prompts: held-out prompts come from a prompts file, not the synthetic set "
            f"{source(cfg)!r} (the synthetic world evaluates with its gold reward: "
            "data.eval_prompts_per_domain)"
        )


def load(cfg: Config, tok) -> tuple[HeldOut | None, list[str]]:
    """The held-out prompts (None when rl.eval_prompts is 0) and a report line."""
    from jaxrl.data import readers
    from jaxrl.rl.context import fixed_left_pad

    r = cfg.rl
    if not r.eval_prompts:
        return None, []
    check(cfg)
    path = source(cfg)
    if not Path(path).exists():
        raise ConfigError(f"rl.eval_prompt_set {path!r}: no such prompts file")
    records = list(readers.read(path, "prompts", on_error=cfg.data.on_error).records)
    if r.eval_prompt_set:
        records, where = records[: r.eval_prompts], "(its first)"
    else:  # the last of the training file, which the training prompts stop short of (rl.context.prompt_set)
        if len(records) <= r.eval_prompts:
            raise ConfigError(
                f"rl.eval_prompts={r.eval_prompts}: {path} has only {len(records)} prompts, none would be "
                f"left to train on (hold out fewer, or give rl.eval_prompt_set)"
            )
        records, where = records[-r.eval_prompts :], "(its last, never trained on)"
    encoded = [tok.encode_prompt(rec.prompt) for rec in records]
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= cfg.data.max_prompt_len]
    report = [
        f"held-out prompts {path} {where}: {len(keep)} of {len(records)} kept (longer than "
        f"data.max_prompt_len={cfg.data.max_prompt_len} dropped)"
    ]
    if not keep:
        raise ConfigError(f"rl.eval_prompts: no held-out prompt of {path} fits data.max_prompt_len")
    ids, mask = fixed_left_pad([encoded[i] for i in keep], cfg.data.max_prompt_len, tok.pad_id)
    return HeldOut([records[i] for i in keep], ids, mask), report


def evaluate(ctx, state, heldout: HeldOut) -> dict[str, float]:
    """The metrics of the module docstring for the policy of `state` (an RLState) on `heldout`, in batches of
    the run's rollout shape (the last batch wraps around to the first prompts; only the real ones count)."""
    from jaxrl.rl import algorithms, context

    cfg, r = ctx.cfg, ctx.cfg.rl
    n, per_call = len(heldout.records), r.rollout_batch
    rl_hp, _ = jax.device_put(algorithms.hparams(cfg, float(r.kl_coef)), ctx.replicated)
    policy_params = steps.model_params(state.policy)
    params = {"policy": policy_params, "ref": ctx.ref.get()}
    if ctx.value_graphdef is not None:
        params["value"] = state.value.params
    parts: dict[str, list[np.ndarray]] = {}
    for b, start in enumerate(range(0, n, per_call)):
        index = np.repeat(np.arange(start, start + per_call) % n, r.samples_per_prompt)
        prompts = rewards.PromptBatch(
            [heldout.records[i] for i in index], heldout.ids[index], heldout.mask[index]
        )
        ids, mask = jax.device_put((prompts.ids_BP, prompts.mask_BP), ctx.batch_sharding)
        key = context.stream_key(
            jax.device_put(np.asarray([cfg.seed, EVAL_STREAM, b], np.int32), ctx.replicated)
        )
        if ctx.mixture_coef is None:
            args = (ctx.graphdef, policy_params, ids, mask, key, ctx.temperature)
        else:  # every row from the policy: a zero mixture coefficient
            zeros = jax.device_put(np.zeros(ctx.mixture_coef.shape, np.float32), ctx.batch_sharding)
            args = (ctx.graphdef, policy_params, ctx.ref.get(), ids, mask, key, ctx.temperature, zeros)
        response, sampler_logps, response_mask = ctx.programs["generate"](*args)
        tokens, host_mask = context.fetch((response, response_mask))
        rollout = {"prompt": ids, "prompt_mask": mask, "response": response, "response_mask": response_mask}
        stats = ctx.programs["rollout_stats"](params, rollout, rl_hp)
        old, ref = context.fetch((stats["old_logps"], stats["ref_logps"]))
        components = ctx.reward_fn.components(
            prompts, tokens, host_mask, context.decode(ctx.tok, tokens, host_mask)
        )
        real = np.arange(len(index)) < min(per_call, n - start) * r.samples_per_prompt
        values = {f"rewards/{k}": v for k, v in components.items() if k != "score"}
        values |= {
            "score": components["score"],
            "kl": np.sum(np.where(host_mask, old - ref, 0.0), axis=-1),
            "length": host_mask.sum(axis=-1),
            "contain_eos_token": ~rewards.missing_eos(tokens, host_mask, ctx.tok.eos_id),
            "prompt": index,
        }
        for k, v in values.items():
            parts.setdefault(k, []).append(np.asarray(v)[real])
    return summarize({k: np.concatenate(v) for k, v in parts.items()})


def summarize(values: dict[str, np.ndarray]) -> dict[str, float]:
    """Means of every per-response value, and the standard error of the score over prompts (a prompt's
    samples averaged first)."""
    prompt = values.pop("prompt")
    out = {k: float(np.mean(np.asarray(v, np.float64))) for k, v in values.items()}
    _, inverse = np.unique(prompt, return_inverse=True)
    per_prompt = np.bincount(inverse, values["score"]) / np.bincount(inverse)
    out["score_se"] = (
        float(np.std(per_prompt, ddof=1) / np.sqrt(len(per_prompt))) if len(per_prompt) > 1 else 0.0
    )
    return out
