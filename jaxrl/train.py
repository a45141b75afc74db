"""The offline runner: builds data, model and step for a stage, trains with checkpoints and exact resume,
evaluates; online-RL stages go to jaxrl.rl.runner."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrl import checkpoint, distributed, listwise, reference, sharding, steps
from jaxrl import config as config_lib
from jaxrl import metrics as metrics_lib
from jaxrl import validate as validate_lib
from jaxrl import workdir as workdir_lib
from jaxrl.config import Config
from jaxrl.data import pipeline
from jaxrl.metrics import MetricWriter
from jaxrl.models import attention, lora
from jaxrl.models import init as model_init
from jaxrl.models.transformer import flops_per_token

DONE_FILE = workdir_lib.SUMMARY_FILE


def _mean_metrics(parts: list[dict]) -> dict:
    return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}


def evaluate(
    eval_fn, params, arrays, hp, batch_size: int, mesh, preset: str, ref_params=None, delta=None
) -> dict:
    """Mean eval metrics over whole batches of the held-out set (the remainder is left out); `delta`: a
    running-shift loss's carried shift."""
    n = arrays["tokens"].shape[0]
    divisor = sharding.batch_divisor(mesh, preset)
    batch_size = max(divisor, batch_size // divisor * divisor)
    if n < batch_size:
        return {}
    batch_sharding = sharding.batch_sharding(mesh, preset)
    parts = []
    for start in range(0, n - batch_size + 1, batch_size):
        batch = jax.device_put({k: v[start : start + batch_size] for k, v in arrays.items()}, batch_sharding)
        parts.append(eval_fn(params, batch, hp, ref_params, delta))
    return _mean_metrics(jax.device_get(parts)) | {"examples": (n // batch_size) * batch_size}


def resolve(cfg: Config) -> Config:
    """The config a run trains: an HF init_from decides the architecture; validated."""
    if cfg.train.init_from:
        from jaxrl.convert import with_hf_architecture
        from jaxrl.models.hf import is_hf_dir

        if is_hf_dir(cfg.train.init_from):
            cfg = with_hf_architecture(cfg, cfg.train.init_from)  # the checkpoint decides the architecture
    return validate_lib.validate(cfg)


def run(cfg: Config, workdir: str | Path, *, log=print, stop_after: int | None = None) -> dict:
    """Trains one stage in `workdir` (resuming if it holds a checkpoint); returns the final summary.

    Raises WorkdirLocked when another process holds the workdir, ConfigError when it holds a run of another
    config, RunFailed when the run ends degenerate. `stop_after` ends the loop early at that step without
    finishing the run (for tests of resume)."""
    distributed.initialize()  # joins the other processes of a multi-host job; a no-op for one process
    cfg = resolve(cfg)
    if cfg.stage in config_lib.RL_STAGES:
        from jaxrl.rl import runner

        return runner.run(cfg, workdir, log=log, stop_after=stop_after)
    workdir = Path(workdir).absolute()
    return workdir_lib.run_in(
        workdir, cfg, lambda commit: _train(cfg, workdir, commit, log, stop_after), log=log
    )


def _train(cfg: Config, workdir: Path, commit, log, stop_after: int | None) -> dict:
    mesh = sharding.make_mesh(cfg.mesh)
    member = setup(cfg, workdir, mesh, log)
    commit()  # the run has started: from here on the workdir belongs to this config
    restore(member, log)
    summary = train_members([member], SoloProgram(member), log, stop_after)[0]
    if summary.get("status") == "failed":
        raise workdir_lib.RunFailed(workdir, summary)
    return summary


@dataclasses.dataclass
class Member:
    """One offline run's host-side pieces: its data, model, initial state, programs, and (after restore)
    where it starts and what it has logged."""

    cfg: Config
    workdir: Path
    mesh: Any
    data: Any
    train_arrays: dict
    eval_arrays: dict
    model_cfg: Any
    graphdef: Any
    hp: Any
    state: steps.TrainState
    state_shardings: Any
    objective: Any
    totals_fn: Any
    train_step: Any  # the solo program (jitted, donating); a vmapped group has its own
    eval_step: Any
    world_eval: Any
    final_eval: Any = None  # params -> final-evaluation metrics only (a reward model's proxy best-of-N)
    has_ref: bool = False  # a frozen reference in the state (its forward pass is in every step's cost)
    start: int = 0
    last: dict = dataclasses.field(default_factory=dict)
    ckpt: Any = None


def setup(cfg: Config, workdir: Path, mesh, log) -> Member:
    """Builds a run's data, initial state and programs (nothing is written to the workdir yet)."""
    preset, t = cfg.mesh.preset, cfg.train
    sharding.check_batch(t.batch_size, t.grad_accum, mesh, preset)
    data = pipeline.build_stage_data(cfg, _on_policy_responder(cfg, mesh, preset))
    for line in data.report:
        log(line)

    model_cfg = model_init.stage_model_config(cfg)
    log(attention.describe(model_cfg, platform=mesh.devices.flat[0].platform))
    graphdef, abstract_params = model_init.abstract_model(model_cfg)
    # A LoRA run's base is the model without adapters (the same initialisation, or init_from's weights).
    base_cfg = lora.base_config(model_cfg)
    params = model_init.init_params(base_cfg, cfg.seed, mesh, preset)
    if t.init_from:
        loaded, _ = model_init.load_run_params(t.init_from, mesh, preset)
        params = model_init.merge_init(params, loaded, log)
    hp = steps.loss_hparams(cfg)

    ref_params = ref = None
    train_arrays, eval_arrays = dict(data.train), dict(data.eval)
    needs_ref = cfg.stage == "dpo" and listwise.offline_loss(cfg.loss.name).needs_reference
    # LoRA: the reference is the base itself, the adapters off (no second model), unless another is named.
    base_is_ref = model_cfg.lora_rank > 0 and t.reference_from in ("", t.init_from)
    if needs_ref and model_cfg.lora_rank and not base_is_ref and t.reference == "on_the_fly":
        raise config_lib.ConfigError(
            "with model.lora_rank > 0 the on-the-fly reference is the base (adapters off); for another "
            "train.reference_from use train.reference=cache"
        )
    if needs_ref:
        source = t.reference_from or t.init_from
        loads = source and not base_is_ref
        ref = model_init.load_run_params(source, mesh, preset)[0] if loads else params
        if not source:
            log(
                "warning: no train.init_from or train.reference_from: "
                "the reference is the random initialisation"
            )
        if t.reference == "cache":
            cache_dir = Path(t.cache_dir) if t.cache_dir else workdir / "cache"
            micro = t.batch_size // t.grad_accum
            for arrays in (train_arrays, eval_arrays):
                if arrays["tokens"].shape[0]:
                    arrays["ref_logps"], _, _ = reference.cached_reference_logps(
                        cache_dir,
                        model_init.abstract_model(base_cfg)[0],
                        ref,
                        arrays,
                        batch_size=micro,
                        mesh=mesh,
                        preset=preset,
                        log=log,
                        bucket_multiple=cfg.data.bucket_multiple if cfg.data.padding == "bucket" else None,
                    )
        elif not model_cfg.lora_rank:
            ref_params = ref

    tx, schedule = steps.make_optimizer(cfg.optim, t.steps)
    loss_state = steps.initial_loss_state(cfg)
    make_state = lambda p, r: steps.new_train_state(p, tx, cfg.seed, r, loss_state)
    frozen = None
    if model_cfg.lora_rank:
        # Only the adapters (and a scalar head) train: the optimiser holds their moments alone.
        frozen, params = lora.split(lora.init_params(model_cfg, params, cfg.seed, mesh, preset))
        log(f"LoRA rank {model_cfg.lora_rank}: {lora.count(params):,} adapter parameters train, base frozen")
    # The frozen reference (on-the-fly mode) is placed by the same rules as the policy.
    state_shardings = sharding.tree_shardings(jax.eval_shape(make_state, params, ref_params), preset, mesh)
    state = jax.jit(make_state, out_shardings=state_shardings)(params, ref_params)
    if frozen is not None:  # joined outside the jit: the base is never copied
        state = state.replace(frozen=frozen)
        state_shardings = state_shardings.replace(frozen=sharding.tree_shardings(frozen, preset, mesh))
    del params

    objective, totals_fn = steps.stage_objective(cfg, graphdef)
    if needs_ref and base_is_ref and t.reference == "on_the_fly":
        objective = steps.base_as_reference(objective)
    step_fn = steps.bind_step(objective, totals_fn, (tx, schedule), t.grad_accum)
    example = {
        k: jax.ShapeDtypeStruct((t.batch_size,) + v.shape[1:], v.dtype) for k, v in train_arrays.items()
    }
    train_step = steps.make_step(step_fn, jax.eval_shape(lambda: state), example, mesh, preset)
    eval_fn = lambda p, b, h, r, d: steps.eval_step(
        p, b, h, objective=objective, totals_fn=totals_fn, ref_params=r, delta=d
    )
    eval_step = jax.jit(_with_mesh(eval_fn, mesh, preset))

    world_eval = None
    if cfg.data.source == "synthetic" and cfg.stage != "rm" and cfg.data.eval_prompts_per_domain:
        from jaxrl.evaluate import synthetic_eval

        # KL is to where the policy started, also for losses that train without a reference (SimPO); a LoRA
        # run started at its base, the adapters off.
        eval_ref = (
            ref
            if ref is not None or not t.init_from or model_cfg.lora_rank
            else model_init.load_run_params(t.init_from, mesh, preset)[0]
        )
        # The SFT base also measures the best-of-N ceilings every arm is read against.
        world_eval = lambda params, split, final=False: synthetic_eval(
            cfg,
            graphdef,
            params,
            lora.adapters_off(params) if model_cfg.lora_rank else eval_ref,
            data.tokenizer,
            split=split,
            best_of=cfg.stage == "sft" and final,
        )
    final_eval = None
    d = cfg.data
    sampled_eval = d.source == "synthetic" and d.eval_prompts_per_domain and d.eval_best_of
    if cfg.stage == "rm" and t.init_from and sampled_eval:
        from jaxrl.evaluate import proxy_best_of

        # The policy the reward model will judge: its init_from run (the SFT base), sampled as the base's
        # own best-of-N ceilings are (same prompts, same draws).
        policy_params, source_model = model_init.load_run_params(t.init_from, mesh, preset)
        policy_graphdef, _ = model_init.abstract_model(dataclasses.replace(source_model, head="lm"))
        final_eval = lambda params: proxy_best_of(
            cfg, policy_graphdef, policy_params, graphdef, params, data.tokenizer
        )
    return Member(
        cfg=cfg,
        workdir=workdir,
        mesh=mesh,
        data=data,
        train_arrays=train_arrays,
        eval_arrays=eval_arrays,
        model_cfg=model_cfg,
        graphdef=graphdef,
        hp=hp,
        state=state,
        state_shardings=state_shardings,
        objective=objective,
        totals_fn=totals_fn,
        train_step=train_step,
        eval_step=eval_step,
        world_eval=world_eval,
        final_eval=final_eval,
        has_ref=ref_params is not None or (needs_ref and base_is_ref and t.reference == "on_the_fly"),
    )


def restore(m: Member, log) -> None:
    """Resumes `m` from its latest checkpoint (if any); truncates metrics logged after it."""
    preset, t = m.cfg.mesh.preset, m.cfg.train
    if jax.process_index() == 0 and hasattr(m.data.tokenizer, "save"):
        m.data.tokenizer.save(m.workdir / "tokenizer.json")
    m.ckpt = checkpoint.Checkpointer(m.workdir, every=t.checkpoint_every, keep=t.keep_checkpoints)
    saved = jax.eval_shape(lambda: _saveable(m.state))
    restored = m.ckpt.restore_latest(
        checkpoint.abstract_with_shardings(saved, sharding.tree_shardings(saved, preset, m.mesh)), log=log
    )
    if restored is not None:
        latest, restored_state, meta = restored
        m.state = restored_state.replace(ref_params=m.state.ref_params, frozen=m.state.frozen)
        m.start = int(meta["step"])
        log(f"resumed from {m.workdir}/checkpoints/{latest} at step {m.start}")
    metrics_lib.truncate_after(m.workdir, m.start if m.start else -1, final=m.start >= t.steps)
    m.last = metrics_lib.last_logged(m.workdir) if m.start else {}


class SoloProgram:
    """One run's state and its own jitted step: the one-run-at-a-time path."""

    def __init__(self, member: Member):
        self.member, self.members, self.state = member, [member], member.state

    def step(self, batches: list) -> Any:
        self.state, metrics = self.member.train_step(self.state, batches[0], self.member.hp)
        return metrics

    def fetch(self, metrics) -> list[dict]:
        return [jax.device_get(metrics)]

    def member_state(self, i: int) -> steps.TrainState:
        return self.state

    def skipped(self) -> list[int]:
        return [int(jax.device_get(self.state.skipped))]


class _MemberLoop:
    """Per-run bookkeeping of the shared loop: pending metrics, the throughput window, the skip verdict."""

    def __init__(self, m: Member, log):
        t = m.cfg.train
        self.m, self.pending, self.window_start, self.window = m, None, time.perf_counter(), []
        self.last, self.previous_skipped, self.failure, self.failed = m.last, None, None, None
        self.writer = MetricWriter(m.workdir, tensorboard=t.tensorboard)
        enabled = t.progress and jax.process_index() == 0
        self.progress = workdir_lib.progress(m.start, t.steps, enabled=enabled)
        bucket = m.cfg.data.padding == "bucket"
        self.lengths = (
            pipeline.example_lengths(m.train_arrays) if bucket or m.cfg.data.group_by_length else None
        )
        self.order = pipeline.BatchOrder(
            m.train_arrays["tokens"].shape[0],
            t.batch_size,
            m.cfg.seed,
            self.lengths if m.cfg.data.group_by_length else None,
        )
        self.seq_len = m.train_arrays["tokens"].shape[-1]
        self.rows_per_example = 2 if m.train_arrays["tokens"].ndim == 3 else 1

    def width(self, step: int) -> int | None:
        if self.m.cfg.data.padding != "bucket":
            return None
        return pipeline.bucket_width(
            self.lengths, self.order.indices(step), self.m.cfg.data.bucket_multiple, self.seq_len
        )

    def host_batch(self, step: int, width: int | None) -> dict:
        return pipeline.host_batch(self.m.train_arrays, self.order.indices(step), width)

    def step_cost(self, width: int) -> tuple[float, float]:
        """(token positions, model FLOPs) of one step on batches `width` wide."""
        t, model_cfg = self.m.cfg.train, self.m.model_cfg
        tokens = t.batch_size * self.rows_per_example * width
        flops = flops_per_token(model_cfg, width) * tokens
        if self.m.has_ref:
            flops += flops_per_token(model_cfg, width, backward=False) * tokens
        return tokens, flops

    def log_pending(self, values_of) -> None:
        step, metrics = self.pending
        self.last = _log_metrics(
            self.writer, (step, values_of(metrics)), self.window_start, self.window, self.progress
        )
        self.window_start, self.window, self.pending = time.perf_counter(), [], None


def train_members(members: list[Member], program, log, stop_after: int | None) -> list[dict]:
    """The offline loop for runs that start at the same step and take the same steps, stepped together by
    `program` (SoloProgram: one run; a vmapped group: several). Every run logs, checkpoints and evaluates
    exactly as it would alone; returns each run's summary (a failed run's summary has status "failed")."""
    t = members[0].cfg.train
    start = members[0].start
    loops = [_MemberLoop(m, log) for m in members]
    batch_sharding = sharding.batch_sharding(members[0].mesh, members[0].cfg.mesh.preset)
    end = t.steps if stop_after is None else min(stop_after, t.steps)
    every = max(1, t.checkpoint_every)
    fetched: dict[int, list[dict]] = {}  # step -> host metrics per member (each step is fetched once)

    def values(step, metrics, i):
        if step not in fetched:
            fetched.clear()
            fetched[step] = program.fetch(metrics)
        return fetched[step][i]

    active = list(range(len(members)))
    for step in range(start, end):
        widths = [lp.width(step) for lp in loops]
        width = max(widths) if widths[0] is not None else None
        batches = [pipeline.to_device(lp.host_batch(step, width), batch_sharding) for lp in loops]
        metrics = program.step(batches)
        for i in active:
            loops[i].window.append(loops[i].step_cost(width or loops[i].seq_len))
        # Fetch the previous step's metrics only after dispatching this one: the device never waits on us.
        for i in list(active):
            lp = loops[i]
            if lp.previous_skipped is not None:
                prev_step, prev_metrics = lp.previous_skipped
                n_skipped = int(values(prev_step, prev_metrics, i)["skipped_steps"])
                lp.failure = workdir_lib.skip_verdict(n_skipped, prev_step, t.steps, t.max_skipped_fraction)
                if lp.failure:
                    active.remove(i)
                    lp.failed = _fail(members[i], lp, program, i, log)
                    continue
            if lp.pending is not None:
                pending_step = lp.pending[0]
                lp.window = lp.window[:-1]
                lp.log_pending(lambda mt, s=pending_step, i=i: values(s, mt, i))
                lp.window = [lp.step_cost(width or lp.seq_len)]
            lp.previous_skipped = (step + 1, metrics)
            if (step + 1) % t.log_every == 0 or step + 1 == end:
                lp.pending = (step + 1, metrics)
                # A checkpoint never gets ahead of the metrics rows it resumes after.
                if (step + 1) % every == 0:
                    lp.log_pending(lambda mt, s=step + 1, i=i: values(s, mt, i))
        if not active:
            break
        for i in active:
            lp, m = loops[i], members[i]
            if m.world_eval and t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
                if lp.pending is not None:  # rows stay in step order
                    lp.log_pending(lambda mt, s=step + 1, i=i: values(s, mt, i))
                val = m.world_eval(steps.model_params(program.member_state(i)), "validation")[0]
                lp.writer.write(step + 1, {f"val/{k}": v for k, v in val.items()})
            if (step + 1) % m.ckpt.every == 0:
                m.ckpt.save(step + 1, _saveable(program.member_state(i)), {"step": step + 1})
            lp.progress.update(1)
    return [
        _finish(m, lp, program, i, log, stop_after, end, values)
        for i, (m, lp) in enumerate(zip(members, loops, strict=True))
    ]


def _fail(m: Member, lp: _MemberLoop, program, i: int, log) -> dict:
    """Ends a degenerate run at the step that decided it; its failed summary."""
    t = m.cfg.train
    lp.progress.close()
    state = program.member_state(i)
    skipped = program.skipped()[i]
    # Counted again with the step dispatched after the one that decided it, so both agree.
    failure = (
        workdir_lib.skip_verdict(
            skipped, int(jax.device_get(state.step)) + skipped, t.steps, t.max_skipped_fraction
        )
        or lp.failure
    )
    m.ckpt.close()
    lp.writer.close()
    return workdir_lib.fail(
        m.workdir, m.cfg, failure, log=log, steps=t.steps, skipped_steps=skipped, train=lp.last
    ).summary


def _finish(m: Member, lp: _MemberLoop, program, i: int, log, stop_after, end: int, values) -> dict:
    """Ends one run of the loop: its failure, its early stop (tests of resume), or its final evaluation and
    summary."""
    t, preset = m.cfg.train, m.cfg.mesh.preset
    if lp.failed is not None:
        return lp.failed
    if lp.previous_skipped is not None:
        prev_step, prev_metrics = lp.previous_skipped
        lp.failure = workdir_lib.skip_verdict(
            int(values(prev_step, prev_metrics, i)["skipped_steps"]),
            prev_step,
            t.steps,
            t.max_skipped_fraction,
        )
        if lp.failure:
            return _fail(m, lp, program, i, log)
    if lp.pending is not None:
        lp.log_pending(lambda mt, s=lp.pending[0]: values(s, mt, i))
    lp.progress.close()
    state = program.member_state(i)
    skipped = program.skipped()[i]

    if stop_after is not None and end < t.steps:
        m.ckpt.save(end, _saveable(state), {"step": end}, force=True)
        m.ckpt.close()
        lp.writer.close()
        return {"stopped_at": end}

    m.ckpt.save(t.steps, _saveable(state), {"step": t.steps}, force=True)
    m.ckpt.close()
    params = steps.model_params(state)
    eval_metrics = evaluate(
        m.eval_step,
        params,
        m.eval_arrays,
        m.hp,
        t.batch_size // t.grad_accum,
        m.mesh,
        preset,
        state.ref_params,
        None if state.loss_state is None else state.loss_state.mean,
    )
    val_metrics, per_prompt = {}, None
    if m.world_eval:
        val_metrics = m.world_eval(params, "validation", True)[0] if m.cfg.data.val_prompts_per_domain else {}
        test_metrics, per_prompt = m.world_eval(params, "test", True)
        eval_metrics |= test_metrics
    if m.final_eval:
        eval_metrics |= m.final_eval(params)
    lp.writer.write(
        t.steps,
        {f"val/{k}": v for k, v in val_metrics.items()} | {f"eval/{k}": v for k, v in eval_metrics.items()},
    )
    lp.writer.close()
    if bad := workdir_lib.nonfinite_eval(eval_metrics):
        return workdir_lib.fail(
            m.workdir,
            m.cfg,
            f"the final evaluation is not finite: {', '.join(bad)}",
            log=log,
            steps=t.steps,
            skipped_steps=skipped,
            train=lp.last,
            eval=eval_metrics,
        ).summary
    # A LoRA run's final parameters are its adapters merged into the base: a full model, as any run's (what
    # init_from, reference_from and `jaxrl convert` read); its adapters stay in the last checkpoint.
    final = lora.merge(params, m.model_cfg) if m.model_cfg.lora_rank else params
    checkpoint.save_params(checkpoint.final_params_dir(m.workdir), final)
    summary = {
        "stage": m.cfg.stage,
        "status": "finished",
        "steps": t.steps,
        "skipped_steps": skipped,
        "train": lp.last,
        "eval": eval_metrics,
        "val": val_metrics,
        "data": m.data.report,
    }
    if per_prompt is not None:
        summary["eval_per_prompt"] = per_prompt
    workdir_lib.write_summary(m.workdir, summary)
    log(f"finished {m.cfg.stage}: eval {json.dumps({k: round(v, 4) for k, v in eval_metrics.items()})}")
    return summary


def _on_policy_responder(cfg: Config, mesh, preset: str):
    """For synthetic on-policy pairs: responder(prompts, seed) -> one sampled text per prompt from the policy
    in train.init_from (at temperature 1); None for every other data source."""
    if (
        cfg.data.source != "synthetic"
        or cfg.data.synthetic_kind != pipeline.ON_POLICY
        or not cfg.train.init_from
    ):
        return None
    from jaxrl.evaluate import sample_texts
    from jaxrl.synthetic import SyntheticTokenizer

    params, source_model = model_init.load_run_params(cfg.train.init_from, mesh, preset)
    graphdef, _ = model_init.abstract_model(dataclasses.replace(source_model, head="lm"))
    tok = SyntheticTokenizer()
    return lambda prompts, seed: sample_texts(
        graphdef, params, tok, prompts, temperature=1.0, max_new=cfg.data.eval_max_new, seed=seed
    )


def _saveable(state: steps.TrainState) -> steps.TrainState:
    # The frozen reference (and a LoRA run's frozen base) is rebuilt from its source run, never written into
    # every checkpoint.
    return state.replace(ref_params=None, frozen=None)


def _with_mesh(fn, mesh, preset):
    def traced(*args):
        with sharding.use_mesh(mesh, preset):
            return fn(*args)

    return traced


def _log_metrics(writer, pending, window_start, window, progress):
    """Logs a step's metrics (host values), with throughput over the window of steps since the last log
    ((tokens, flops) of each; tokens are the positions computed, padding included)."""
    step, metrics = pending
    values = {k: float(v) for k, v in metrics.items()}
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    values["tokens_per_s"] = sum(tokens for tokens, _ in window) / elapsed
    values["tflops_per_s"] = sum(flops for _, flops in window) / elapsed / 1e12
    row = {f"train/{k}": v for k, v in values.items()}
    writer.write(step, row)
    progress.set_postfix(loss=f"{values['loss']:.4f}")
    return values
