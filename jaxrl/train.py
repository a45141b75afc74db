"""The offline runner: builds data, model and step for a stage, trains with checkpoints and exact resume,
evaluates; online-RL stages go to jaxrl.rl.runner."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrl import checkpoint, distributed, sharding, steps
from jaxrl import config as config_lib
from jaxrl import validate as validate_lib
from jaxrl import workdir as workdir_lib
from jaxrl.config import Config
from jaxrl.data import pipeline
from jaxrl.member import Member, restore, saveable, setup
from jaxrl.metrics import MetricWriter
from jaxrl.models import lora
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


def run(cfg: Config, workdir: str | Path, *, log=print, stop_after: int | None = None, answered=None) -> dict:
    """Trains one stage in `workdir` (resuming if it holds a checkpoint); returns the final summary
    (`answered()`, when given, is called if that summary was a finished run's, nothing trained).

    Raises WorkdirLocked when another process holds the workdir, ConfigError when it holds a run of another
    config, RunFailed when the run ends degenerate. `stop_after` ends the loop early at that step without
    finishing the run (for tests of resume)."""
    distributed.initialize()  # joins the other processes of a multi-host job; a no-op for one process
    cfg = resolve(cfg)
    if cfg.stage in config_lib.RL_STAGES:
        from jaxrl.rl import runner

        return runner.run(cfg, workdir, log=log, stop_after=stop_after, answered=answered)
    workdir = Path(workdir).absolute()
    return workdir_lib.run_in(
        workdir, cfg, lambda commit: _train(cfg, workdir, commit, log, stop_after), log=log, answered=answered
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
    `program` (SoloProgram: one run; a group: several). Every run logs, checkpoints and evaluates
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
                m.ckpt.save(step + 1, saveable(program.member_state(i)), {"step": step + 1})
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
        m.ckpt.save(end, saveable(state), {"step": end}, force=True)
        m.ckpt.close()
        lp.writer.close()
        return {"stopped_at": end}

    m.ckpt.save(t.steps, saveable(state), {"step": t.steps}, force=True)
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
        if m.cfg.data.val_prompts_per_domain:
            val_metrics |= m.final_eval(params, "validation")
        eval_metrics |= m.final_eval(params, "test")
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
