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


def prompt_batch(ctx: Context, iteration: int) -> rewards.PromptBatch:
    """The iteration's prompts, each repeated `samples_per_prompt` times (a function of the seed and it)."""
    index = np.repeat(ctx.order.indices(iteration), ctx.cfg.rl.samples_per_prompt)
    return rewards.PromptBatch([ctx.records[i] for i in index], ctx.prompt_ids[index], ctx.prompt_mask[index])


def rollout_seed(ctx: Context, iteration: int) -> np.ndarray:
    """What the iteration's sampling key is folded from: (seed, ROLLOUT_STREAM, iteration) [3] int32."""
    return np.asarray([ctx.cfg.seed, ROLLOUT_STREAM, iteration], np.int32)


def generation(ctx: Context, prompts: rewards.PromptBatch, rollout: dict, tokens, mask) -> _Generation:
    """A sampled rollout batch with its host copies decoded."""
    return _Generation(prompts, rollout, tokens, mask, context.decode(ctx.tok, tokens, mask))


def _generate(ctx: Context, params, iteration: int) -> _Generation:
    """Samples `samples_per_prompt` responses to each of the iteration's prompts (key folded from it)."""
    prompts = prompt_batch(ctx, iteration)
    ids, mask = jax.device_put((prompts.ids_BP, prompts.mask_BP), ctx.batch_sharding)
    key = _rollout_key(jax.device_put(rollout_seed(ctx, iteration), ctx.replicated))
    mixture = None if ctx.mixture_coef is None else (ctx.ref.get(), ctx.mixture_coef)
    program = ctx.programs["generate"]
    rollout, tokens, host_mask = sample_rollout(
        program, ctx.graphdef, params, ids, mask, key, ctx.temperature, mixture
    )
    return generation(ctx, prompts, jax.device_put(rollout, ctx.batch_sharding), tokens, host_mask)


def sample_rollout(generate, graphdef, params, ids, mask, key, temperature, mixture=None):
    """(the rollout batch on device, host tokens, host mask) of the `generate` program on prompts `ids` /
    `mask`; `mixture`: (reference params, per-row coefficients) for a sampler that mixes the policy with the
    reference (rl.mixture: the odd rows)."""
    if mixture is None:
        args = (graphdef, params, ids, mask, key, temperature)
    else:
        ref, coef = mixture
        args = (graphdef, params, ref, ids, mask, key, temperature, coef)
    response, sampler_logps, response_mask = generate(*args)
    tokens, host_mask = context.fetch((response, response_mask))
    rollout = {
        "prompt": ids,
        "prompt_mask": mask,
        "response": response,
        "response_mask": response_mask,
        "sampler_logps": sampler_logps,
    }
    return rollout, tokens, host_mask


def reward_components(ctx: Context, gen: _Generation, multipliers: dict[str, float]) -> dict:
    """The reward function's components of a rollout batch (score: the Lagrangian one under constraints)."""
    components = ctx.reward_fn.components(gen.prompts, gen.tokens, gen.mask, gen.texts)
    return constraints.lagrangian_components(components, multipliers)


def _score(ctx: Context, state: RLState, gen: _Generation, kl_coef: float, multipliers: dict[str, float]):
    """Rewards (the Lagrangian one under constraints), then old / reference log-probs and values once, then
    advantages and the algorithm's training data: (training data, its hyperparameters, rollout metrics on
    device, reward components)."""
    components = reward_components(ctx, gen, multipliers)
    rl_hp, adv_hp = jax.device_put(algorithms.hparams(ctx.cfg, kl_coef), ctx.replicated)
    params = {"policy": steps.model_params(state.policy), "ref": ctx.ref.get()}
    if ctx.value_graphdef is not None:
        params["value"] = state.value.params
    stats = ctx.programs["rollout_stats"](params, {k: gen.rollout[k] for k in ROLLOUT_KEYS}, rl_hp)
    scores_B = jax.device_put(components["score"], ctx.batch_sharding)
    adv, metrics = ctx.programs["advantages"](gen.rollout, stats, scores_B, adv_hp)
    data = ctx.programs["prepare"](gen.rollout, stats, scores_B, adv)
    return data, rl_hp if ctx.update_hp is None else ctx.update_hp, metrics, components


def minibatches(ctx: Context, iteration: int, epoch: int) -> list[np.ndarray]:
    """The minibatches' row indices of one epoch: a permutation that is a function of (seed, iteration,
    epoch)."""
    permutation = np.random.default_rng([ctx.cfg.seed, MINIBATCH_STREAM, iteration, epoch]).permutation(
        ctx.units
    )
    mb = ctx.mb_units
    return [permutation[k * mb : (k + 1) * mb].astype(np.int32) for k in range(ctx.units // mb)]


def _train(ctx: Context, state: RLState, data, hp, iteration: int):
    """`rl.epochs` shuffled passes of minibatch updates. Metrics stay on device (no host sync per
    minibatch)."""
    collected = []
    for epoch in range(ctx.cfg.rl.epochs):
        for indices in jax.device_put(minibatches(ctx, iteration, epoch), ctx.replicated):
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
    values = iteration_row(
        ctx, iteration, gen, components, step_metrics, rollout_metrics, kl_coef, multipliers
    )
    return state, values | timings(t0, t1, t2, t3)


def iteration_row(
    ctx: Context, iteration: int, gen, components, step_metrics, rollout_metrics, kl_coef, multipliers
) -> dict:
    """An iteration's row of metrics (host values), with the constraints' and the KL coefficient's."""
    values = _iteration_metrics(ctx, gen, components, step_metrics, rollout_metrics)
    if multipliers:
        means = constraints.rollout_values(components, multipliers, algorithms.policy_rows(ctx.cfg))
        values |= constraints.metrics(multipliers, means, constraints.thresholds(ctx.cfg))
    return values | {"objective/kl_coef": kl_coef, "episode": float((iteration + 1) * len(gen.texts))}


def timings(t0: float, t1: float, t2: float, t3: float) -> dict:
    return {
        "time/generation": t1 - t0,
        "time/scoring": t2 - t1,
        "time/training": t3 - t2,
        "time/iteration": t3 - t0,
    }


def run(cfg: Config, workdir: str | Path, *, log=print, stop_after: int | None = None, answered=None) -> dict:
    """Trains one online-RL stage in `workdir` (resuming if it holds a checkpoint); returns the final summary.

    `cfg` is resolved and validated (train.run, which calls this, does it). `stop_after` ends the loop early
    at that iteration without finishing the run (for tests of resume)."""
    workdir = Path(workdir).absolute()
    return workdir_lib.run_in(
        workdir, cfg, lambda commit: _run(cfg, workdir, commit, log, stop_after), log=log, answered=answered
    )


def _run(cfg: Config, workdir: Path, commit, log, stop_after: int | None) -> dict:
    summary = train_alone(*open_run(cfg, workdir, commit, log), stop_after)
    if summary.get("status") == "failed":
        raise workdir_lib.RunFailed(workdir, summary)
    return summary


def train_alone(run: OnlineRun, state: RLState, stop_after: int | None) -> dict:
    """The loop of one run from where it starts; its summary (status "failed" when it failed)."""
    end = run.end(stop_after)
    for it in range(run.start, end):
        state, values = iterate(run.ctx, state, it, run.kl_coef, run.multipliers)
        applied, skipped = (int(x) for x in jax.device_get((state.policy.step, state.policy.skipped)))
        if not run.after_iteration(it, end, values, applied, skipped, lambda s=state: s):
            break
    return run.finish(state, stop_after, end)


@dataclasses.dataclass
class OnlineRun:
    """One online run's host side of the loop (alone, or as a member of a group, `jaxrl.rl.group`): its
    context, checkpointer, metrics writer and the values it carries between iterations (adaptive KL
    coefficient, Lagrange multipliers, the initial evaluation)."""

    cfg: Config
    workdir: Path
    ctx: Context
    log: object
    lineage: dict
    report: list[str]
    abstract_state: RLState  # without a LoRA policy's frozen base
    state_shardings: object
    policy_frozen: object
    ckpt: checkpoint.Checkpointer
    start: int = 0
    kl_coef: float = 0.0
    multipliers: dict = dataclasses.field(default_factory=dict)
    thresholds: dict = dataclasses.field(default_factory=dict)
    eval_initial: dict | None = None
    initial_per_prompt: dict | None = None
    last: dict = dataclasses.field(default_factory=dict)
    writer: MetricWriter | None = None
    progress: object = None
    updates_per_iteration: int | None = None
    failure: str | None = None

    def with_base(self, state: RLState) -> RLState:
        """The state with a LoRA policy's frozen base put back (it stays out of jits and checkpoints)."""
        return state.replace(policy=state.policy.replace(frozen=self.policy_frozen))

    def meta(self, step: int) -> dict:
        return {
            "step": step,
            "kl_coef": self.kl_coef,
            "eval_initial": self.eval_initial,
            "eval_initial_per_prompt": self.initial_per_prompt,
            "multipliers": self.multipliers,
        }

    def end(self, stop_after: int | None) -> int:
        steps_ = self.cfg.train.steps
        return steps_ if stop_after is None else min(stop_after, steps_)

    def after_iteration(self, it: int, end: int, values: dict, applied: int, skipped: int, state_of) -> bool:
        """The iteration's host side: the KL controller and multipliers, the skip verdict, the metrics row,
        the validation curve and the checkpoint (`state_of()`: the run's state, asked for only when
        needed). False when the run has failed (`self.failure` says why)."""
        cfg, t = self.cfg, self.cfg.train
        self.kl_coef = algorithms.adapted_kl_coef(cfg, self.kl_coef, values["objective/kl"])
        means = {name: values[f"constraint/{name}/value"] for name in self.multipliers}
        self.multipliers = constraints.update_multipliers(
            self.multipliers, means, self.thresholds, cfg.rl.lambda_lr
        )
        self.last = values
        self.updates_per_iteration = self.updates_per_iteration or max(1, (applied + skipped) // (it + 1))
        self.failure = workdir_lib.skip_verdict(
            skipped, applied + skipped, self.updates_per_iteration * t.steps, t.max_skipped_fraction
        )
        if self.failure:
            return False
        if (it + 1) % t.log_every == 0 or it + 1 == end:
            self.writer.write(it + 1, values)
        if t.eval_every and (it + 1) % t.eval_every == 0 and it + 1 < t.steps:
            val = _world_eval_of(self.ctx, state_of(), "validation")[0]
            self.writer.write(it + 1, {f"val/{k}": v for k, v in val.items()})
        if (it + 1) % self.ckpt.every == 0:
            self.ckpt.save(it + 1, steps.frozen_apart(state_of())[0], self.meta(it + 1))
        self.progress.update(1)
        self.progress.set_postfix(
            score=f"{values['objective/scores']:.3f}", kl=f"{values['objective/kl']:.3f}"
        )
        return True

    def finish(self, state: RLState, stop_after: int | None, end: int) -> dict:
        """Ends the run: its failure, its early stop (tests of resume), or the final checkpoint, evaluation,
        parameters and summary. A failed run's summary has status "failed"."""
        cfg, t, workdir, log = self.cfg, self.cfg.train, self.workdir, self.log
        self.progress.close()
        saveable = steps.frozen_apart(state)[0]
        skipped = int(jax.device_get(state.policy.skipped))
        if self.failure:
            self.ckpt.close()
            self.writer.close()
            failed = workdir_lib.fail(
                workdir, cfg, self.failure, log=log, steps=t.steps, skipped_steps=skipped, train=self.last
            )
            return failed.summary
        if stop_after is not None and end < t.steps:
            self.ckpt.save(end, saveable, self.meta(end), force=True)
            self.ckpt.close()
            self.writer.close()
            return {"stopped_at": end}

        self.ckpt.save(t.steps, saveable, self.meta(t.steps), force=True)
        self.ckpt.close()
        val_metrics = _world_eval_of(self.ctx, state, "validation")[0]
        eval_metrics, per_prompt = _world_eval_of(self.ctx, state)
        self.writer.write(
            t.steps,
            {f"val/{k}": v for k, v in val_metrics.items()}
            | {f"eval/{k}": v for k, v in eval_metrics.items()},
        )
        self.writer.close()
        if bad := workdir_lib.nonfinite_eval(eval_metrics):
            return workdir_lib.fail(
                workdir,
                cfg,
                f"the final evaluation is not finite: {', '.join(bad)}",
                log=log,
                steps=t.steps,
                skipped_steps=skipped,
                train=self.last,
                eval=eval_metrics,
            ).summary
        final = steps.model_params(
            state.policy
        )  # a LoRA policy's adapters merged into its base: a full model
        final = lora.merge(final, cfg.model) if cfg.model.lora_rank else final
        checkpoint.save_params(checkpoint.final_params_dir(workdir), final)
        summary = {
            "stage": cfg.stage,
            "status": "finished",
            "steps": t.steps,
            "skipped_steps": skipped,
            "train": self.last,
            "eval": eval_metrics,
            "val": val_metrics,
            "eval_initial": self.eval_initial or {},
            "lineage": self.lineage,
            "data": self.report,
        }
        if per_prompt is not None:
            summary["eval_per_prompt"] = per_prompt
        if self.initial_per_prompt is not None:  # the starting policy on the same prompts: paired differences
            summary["eval_initial_per_prompt"] = self.initial_per_prompt
        workdir_lib.write_summary(workdir, summary)
        log(f"finished {cfg.stage}: eval {json.dumps({k: round(v, 4) for k, v in eval_metrics.items()})}")
        return summary


def open_run(cfg: Config, workdir: Path, commit, log) -> tuple[OnlineRun, RLState]:
    """Builds a run's context and first state, commits its config, resumes it from its newest checkpoint and,
    on a fresh start, logs the initial evaluation: (the run's host side, its state)."""
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
    run = OnlineRun(
        cfg=cfg,
        workdir=workdir,
        ctx=ctx,
        log=log,
        lineage=run_lineage,
        report=report,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        policy_frozen=policy_frozen,
        ckpt=checkpoint.Checkpointer(workdir, every=t.checkpoint_every, keep=t.keep_checkpoints),
        kl_coef=float(cfg.rl.kl_coef),
        multipliers=constraints.initial_multipliers(cfg),
        thresholds=constraints.thresholds(cfg),
    )
    state = run.with_base(jax.jit(init, out_shardings=state_shardings)(policy_params, trainable["value"]))
    del trainable

    commit()  # the run has started: from here on the workdir belongs to this config
    restored = run.ckpt.restore_latest(
        checkpoint.abstract_with_shardings(abstract_state, state_shardings), log=log
    )
    if restored is not None:
        latest, state, meta = restored
        state = run.with_base(state)
        run.start, run.kl_coef, run.eval_initial = (
            int(meta["step"]),
            float(meta["kl_coef"]),
            meta.get("eval_initial"),
        )
        run.initial_per_prompt = meta.get("eval_initial_per_prompt")
        run.multipliers = {name: float(v) for name, v in meta.get("multipliers", run.multipliers).items()}
        log(f"resumed from {workdir}/checkpoints/{latest} at iteration {run.start}")
    metrics_lib.truncate_after(workdir, run.start if run.start else -1, final=run.start >= t.steps)
    run.last = metrics_lib.last_logged(workdir, prefix="") if run.start else {}
    run.writer = MetricWriter(workdir, tensorboard=t.tensorboard)
    if run.start == 0:
        run.eval_initial, run.initial_per_prompt = _world_eval_of(ctx, state)
        row = {f"eval/{k}": v for k, v in run.eval_initial.items()}
        if ctx.heldout is not None:  # the held-out curve starts at the initial policy
            row |= {f"val/{k}": v for k, v in _world_eval_of(ctx, state, "validation")[0].items()}
        run.writer.write(0, row)
    run.progress = workdir_lib.progress(run.start, t.steps, enabled=t.progress and jax.process_index() == 0)
    return run, state
