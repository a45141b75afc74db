"""The online-RL runner for the stages of `rl.algorithms.ALGORITHMS` (ppo, grpo, rloo, reinforce_pp,
online_dpo, nash_md); it mirrors `train.run`.

One iteration (the unit of `train.steps`, `train.checkpoint_every`, `train.log_every`) is one rollout batch:
  generation  `rl.samples_per_prompt` responses to each of `rl.rollout_batch` prompts (the `generate` program)
  scoring     the reward function; old log-probs, reference log-probs and values computed ONCE (jitted,
              sharded), then advantages (PPO's GAE, GRPO, RLOO, REINFORCE++ ...) and the algorithm's training
              data (sequences, or pairs for online DPO)
  training    `rl.epochs` passes of shuffled minibatch updates, jitted with the rule-table shardings and the
              state donated; `rl.recompute_old_logps` reproduces the original JAX bug (ratio exactly 1)

The algorithm's differences live in its table entry (`rl.algorithms`), the pure computations in
`rl.objectives`, the jitted programs in `rl.programs` (which `jaxrl preflight` compiles too) and what a run
builds once in `rl.context`. The loop passes its programs device arrays only: host arrays (prompts, scores,
hyperparameters, minibatch indices) are placed with `jax.device_put`, so an iteration and the world evaluation
pass under `jax.transfer_guard("disallow")` (tests/test_rl_programs.py).

The trainer scores tokens under the distribution they were sampled from (logits / temperature, top-k/top-p
truncation); the gap to the sampler's own log-probs is logged as debug/logprob_gap_{max,mean}.

With rl.constraints the policy is trained on the Lagrangian reward and the multipliers take one projected
step per iteration (`rl.constraints`).

Exact resume: the prompts, sampling key and minibatch order of iteration i are pure functions of (seed, i);
checkpoints hold the policy and value states, the adaptive KL coefficient and the Lagrange multipliers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxrl import checkpoint, rewards, sharding, steps
from jaxrl import metrics as metrics_lib
from jaxrl import workdir as workdir_lib
from jaxrl.config import Config
from jaxrl.metrics import MetricWriter
from jaxrl.models import lora
from jaxrl.rl import algorithms, constraints, context, heldout, programs
from jaxrl.rl.context import Context
from jaxrl.rl.objectives import ROLLOUT_KEYS, RLState

ROLLOUT_STREAM, MINIBATCH_STREAM = 1, 2


_rollout_key = context.stream_key  # the sampling key of an iteration: (seed, ROLLOUT_STREAM, iteration)


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


def _world_eval_of(ctx: Context, state: RLState, split: str = "test") -> tuple[dict, dict | None]:
    if ctx.heldout is not None and split == "validation":  # real data: its held-out prompts (rl.eval_prompts)
        return heldout.evaluate(ctx, state, ctx.heldout), None
    return _world_eval(ctx.cfg, ctx.graphdef, steps.model_params(state.policy), ctx.ref.get(), ctx.tok, split)


@dataclasses.dataclass
class _Generation:
    """A sampled rollout batch: prompts, device arrays [B, N] and their host copies and texts."""

    prompts: rewards.PromptBatch
    rollout: dict  # device: prompt, prompt_mask, response, response_mask, sampler_logps
    tokens: np.ndarray
    mask: np.ndarray
    texts: list[str]


def _generate(ctx: Context, params, iteration: int) -> _Generation:
    """Samples `samples_per_prompt` responses to each of the iteration's prompts (key folded from it)."""
    r = ctx.cfg.rl
    index = np.repeat(ctx.order.indices(iteration), r.samples_per_prompt)
    prompts = rewards.PromptBatch(
        [ctx.records[i] for i in index], ctx.prompt_ids[index], ctx.prompt_mask[index]
    )
    ids, mask = jax.device_put((prompts.ids_BP, prompts.mask_BP), ctx.batch_sharding)
    key = _rollout_key(
        jax.device_put(np.asarray([ctx.cfg.seed, ROLLOUT_STREAM, iteration], np.int32), ctx.replicated)
    )
    if ctx.mixture_coef is None:
        args = (ctx.graphdef, params, ids, mask, key, ctx.temperature)
    else:  # odd rows from the policy/reference mixture (rl.mixture)
        args = (ctx.graphdef, params, ctx.ref.get(), ids, mask, key, ctx.temperature, ctx.mixture_coef)
    response, sampler_logps, response_mask = ctx.programs["generate"](*args)
    tokens, host_mask = context.fetch((response, response_mask))
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
        context.decode(ctx.tok, tokens, host_mask),
    )


def _score(ctx: Context, state: RLState, gen: _Generation, kl_coef: float, multipliers: dict[str, float]):
    """Rewards (the Lagrangian one under constraints), then old / reference log-probs and values once, then
    advantages and the algorithm's training data: (training data, its hyperparameters, rollout metrics on
    device, reward components)."""
    components = ctx.reward_fn.components(gen.prompts, gen.tokens, gen.mask, gen.texts)
    components = constraints.lagrangian_components(components, multipliers)
    rl_hp, adv_hp = jax.device_put(algorithms.hparams(ctx.cfg, kl_coef), ctx.replicated)
    params = {"policy": steps.model_params(state.policy), "ref": ctx.ref.get()}
    if ctx.value_graphdef is not None:
        params["value"] = state.value.params
    stats = ctx.programs["rollout_stats"](params, {k: gen.rollout[k] for k in ROLLOUT_KEYS}, rl_hp)
    scores_B = jax.device_put(components["score"], ctx.batch_sharding)
    adv, metrics = ctx.programs["advantages"](gen.rollout, stats, scores_B, adv_hp)
    data = ctx.programs["prepare"](gen.rollout, stats, scores_B, adv)
    return data, rl_hp if ctx.update_hp is None else ctx.update_hp, metrics, components


def _train(ctx: Context, state: RLState, data, hp, iteration: int):
    """`rl.epochs` shuffled passes of minibatch updates; the order is a function of (seed, iteration, epoch).
    Metrics stay on device (no host sync per minibatch)."""
    collected = []
    for epoch in range(ctx.cfg.rl.epochs):
        permutation = np.random.default_rng([ctx.cfg.seed, MINIBATCH_STREAM, iteration, epoch]).permutation(
            ctx.units
        )
        mb = ctx.mb_units
        slices = [permutation[k * mb : (k + 1) * mb].astype(np.int32) for k in range(ctx.units // mb)]
        for indices in jax.device_put(slices, ctx.replicated):
            minibatch = ctx.programs["gather"](data, indices)
            state, metrics = ctx.programs["train_step"](state, minibatch, hp)
            collected.append(metrics)
    return state, collected


def _iteration_metrics(ctx: Context, gen: _Generation, components, step_metrics, rollout_metrics) -> dict:
    """One row of the iteration's metrics (TRL / Open-Instruct names), fetched once."""
    values = _mean_rows(jax.device_get(step_metrics))
    values |= {k: float(v) for k, v in jax.device_get(rollout_metrics).items()}
    if "val/ratio_sq" in values:
        values["val/ratio_var"] = values.pop("val/ratio_sq") - values["val/ratio"] ** 2
    rows = algorithms.policy_rows(ctx.cfg)  # the policy's samples, not a mixture's comparisons
    policy_components = {name: values_B[rows] for name, values_B in components.items()}
    values |= _host_rollout_metrics(gen.tokens[rows], gen.mask[rows], ctx.tok.eos_id, policy_components)
    return values | ctx.algorithm.host_metrics(ctx.cfg, components)


def iterate(
    ctx: Context, state: RLState, iteration: int, kl_coef: float, multipliers: dict[str, float] | None = None
) -> tuple[RLState, dict]:
    """One iteration (generate, score, train) and its row of metrics; its programs get device arrays only.
    `multipliers`: the Lagrange multipliers of rl.constraints this iteration's reward is weighed with."""
    multipliers = multipliers or {}
    t0 = time.perf_counter()
    gen = _generate(ctx, steps.model_params(state.policy), iteration)
    t1 = time.perf_counter()
    data, hp, rollout_metrics, components = _score(ctx, state, gen, kl_coef, multipliers)
    jax.block_until_ready(data)
    t2 = time.perf_counter()
    state, step_metrics = _train(ctx, state, data, hp, iteration)
    jax.block_until_ready(state)
    t3 = time.perf_counter()
    values = _iteration_metrics(ctx, gen, components, step_metrics, rollout_metrics)
    if multipliers:
        means = constraints.rollout_values(components, multipliers, algorithms.policy_rows(ctx.cfg))
        values |= constraints.metrics(multipliers, means, constraints.thresholds(ctx.cfg))
    values |= {
        "objective/kl_coef": kl_coef,
        "episode": float((iteration + 1) * len(gen.texts)),
        "time/generation": t1 - t0,
        "time/scoring": t2 - t1,
        "time/training": t3 - t2,
        "time/iteration": t3 - t0,
    }
    return state, values


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
    ctx, trainable, report = context.build(cfg, workdir, log)
    ctx.heldout, held_out_report = heldout.load(cfg, ctx.tok)
    report += held_out_report
    for line in report:
        log(line)
    run_lineage = context.lineage(cfg)
    if jax.process_index() == 0:
        (workdir / "lineage.json").write_text(json.dumps(run_lineage, indent=2) + "\n")
    # A LoRA policy's frozen base stays out of the jit (never copied) and out of checkpoints (rebuilt here).
    abstract_state, _ = steps.frozen_apart(ctx.programs.abstract_state)
    state_shardings = sharding.tree_shardings(abstract_state, ctx.preset, ctx.mesh)
    init = functools.partial(programs.init_state, optimizers=ctx.programs.optimizers, seed=cfg.seed)
    policy_frozen, policy_params = None, trainable["policy"]
    if cfg.model.lora_rank:
        policy_frozen, policy_params = lora.split(policy_params)
    state = jax.jit(init, out_shardings=state_shardings)(policy_params, trainable["value"])
    with_base = lambda s: s.replace(policy=s.policy.replace(frozen=policy_frozen))
    state = with_base(state)
    saveable = lambda s: steps.frozen_apart(s)[0]
    del trainable

    commit()  # the run has started: from here on the workdir belongs to this config
    kl_coef, eval_initial, initial_per_prompt, start = float(cfg.rl.kl_coef), None, None, 0
    multipliers, thresholds = constraints.initial_multipliers(cfg), constraints.thresholds(cfg)
    ckpt = checkpoint.Checkpointer(workdir, every=t.checkpoint_every, keep=t.keep_checkpoints)
    restored = ckpt.restore_latest(
        checkpoint.abstract_with_shardings(abstract_state, state_shardings), log=log
    )
    if restored is not None:
        latest, state, meta = restored
        state = with_base(state)
        start, kl_coef, eval_initial = int(meta["step"]), float(meta["kl_coef"]), meta.get("eval_initial")
        initial_per_prompt = meta.get("eval_initial_per_prompt")
        multipliers = {name: float(v) for name, v in meta.get("multipliers", multipliers).items()}
        log(f"resumed from {workdir}/checkpoints/{latest} at iteration {start}")
    metrics_lib.truncate_after(workdir, start if start else -1, final=start >= t.steps)
    resumed_last = metrics_lib.last_logged(workdir, prefix="") if start else {}
    meta = lambda step: {
        "step": step,
        "kl_coef": kl_coef,
        "eval_initial": eval_initial,
        "eval_initial_per_prompt": initial_per_prompt,
        "multipliers": multipliers,
    }

    writer = MetricWriter(workdir, tensorboard=t.tensorboard)
    if start == 0:
        eval_initial, initial_per_prompt = _world_eval_of(ctx, state)
        row = {f"eval/{k}": v for k, v in eval_initial.items()}
        if ctx.heldout is not None:  # the held-out curve starts at the initial policy
            row |= {f"val/{k}": v for k, v in _world_eval_of(ctx, state, "validation")[0].items()}
        writer.write(0, row)
    progress = workdir_lib.progress(start, t.steps, enabled=t.progress and jax.process_index() == 0)
    last: dict[str, float] = resumed_last
    end = t.steps if stop_after is None else min(stop_after, t.steps)
    failure, updates_per_iteration = None, None
    for it in range(start, end):
        state, values = iterate(ctx, state, it, kl_coef, multipliers)
        kl_coef = algorithms.adapted_kl_coef(cfg, kl_coef, values["objective/kl"])
        means = {name: values[f"constraint/{name}/value"] for name in multipliers}
        multipliers = constraints.update_multipliers(multipliers, means, thresholds, cfg.rl.lambda_lr)
        last = values
        applied, skipped = (int(x) for x in jax.device_get((state.policy.step, state.policy.skipped)))
        updates_per_iteration = updates_per_iteration or max(1, (applied + skipped) // (it + 1))
        failure = workdir_lib.skip_verdict(
            skipped, applied + skipped, updates_per_iteration * t.steps, t.max_skipped_fraction
        )
        if failure:
            break
        if (it + 1) % t.log_every == 0 or it + 1 == end:
            writer.write(it + 1, values)
        if t.eval_every and (it + 1) % t.eval_every == 0 and it + 1 < t.steps:
            writer.write(
                it + 1, {f"val/{k}": v for k, v in _world_eval_of(ctx, state, "validation")[0].items()}
            )
        ckpt.save(it + 1, saveable(state), meta(it + 1))
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
        ckpt.save(end, saveable(state), meta(end), force=True)
        ckpt.close()
        writer.close()
        return {"stopped_at": end}

    ckpt.save(t.steps, saveable(state), meta(t.steps), force=True)
    ckpt.close()
    val_metrics = _world_eval_of(ctx, state, "validation")[0]
    eval_metrics, per_prompt = _world_eval_of(ctx, state)
    writer.write(
        t.steps,
        {f"val/{k}": v for k, v in val_metrics.items()} | {f"eval/{k}": v for k, v in eval_metrics.items()},
    )
    writer.close()
    if bad := workdir_lib.nonfinite_eval(eval_metrics):
        raise workdir_lib.fail(
            workdir,
            cfg,
            f"the final evaluation is not finite: {', '.join(bad)}",
            log=log,
            steps=t.steps,
            skipped_steps=skipped,
            train=last,
            eval=eval_metrics,
        )
    final = steps.model_params(state.policy)  # a LoRA policy's adapters merged into its base: a full model
    final = lora.merge(final, cfg.model) if cfg.model.lora_rank else final
    checkpoint.save_params(checkpoint.final_params_dir(workdir), final)
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
