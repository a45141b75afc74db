"""The offline runner: builds data, model and step for a stage, trains with checkpoints and exact resume,
evaluates; online-RL stages go to jaxrl.rl.runner."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxrl import checkpoint, distributed, losses, reference, sharding, steps
from jaxrl import config as config_lib
from jaxrl import metrics as metrics_lib
from jaxrl import validate as validate_lib
from jaxrl import workdir as workdir_lib
from jaxrl.config import Config
from jaxrl.data import pipeline
from jaxrl.metrics import MetricWriter
from jaxrl.models import init as model_init
from jaxrl.models.transformer import flops_per_token

DONE_FILE = workdir_lib.SUMMARY_FILE


def _mean_metrics(parts: list[dict]) -> dict:
    return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}


def evaluate(eval_fn, params, arrays, hp, batch_size: int, mesh, preset: str, ref_params=None) -> dict:
    """Mean eval metrics over whole batches of the held-out set (the remainder is left out)."""
    n = arrays["tokens"].shape[0]
    divisor = sharding.batch_divisor(mesh, preset)
    batch_size = max(divisor, batch_size // divisor * divisor)
    if n < batch_size:
        return {}
    batch_sharding = sharding.batch_sharding(mesh, preset)
    parts = []
    for start in range(0, n - batch_size + 1, batch_size):
        batch = jax.device_put({k: v[start: start + batch_size] for k, v in arrays.items()}, batch_sharding)
        parts.append(eval_fn(params, batch, hp, ref_params))
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
    preset, t = cfg.mesh.preset, cfg.train
    sharding.check_batch(t.batch_size, t.grad_accum, mesh, preset)
    data = pipeline.build_stage_data(cfg, _on_policy_responder(cfg, mesh, preset))
    for line in data.report:
        log(line)
    if jax.process_index() == 0 and hasattr(data.tokenizer, "save"):
        data.tokenizer.save(workdir / "tokenizer.json")

    model_cfg = model_init.stage_model_config(cfg)
    graphdef, abstract_params = model_init.abstract_model(model_cfg)
    params = model_init.init_params(model_cfg, cfg.seed, mesh, preset)
    if t.init_from:
        loaded, _ = model_init.load_run_params(t.init_from, mesh, preset)
        params = model_init.merge_init(params, loaded, log)
    hp = steps.loss_hparams(cfg)

    ref_params = ref = None
    train_arrays, eval_arrays = dict(data.train), dict(data.eval)
    needs_ref = cfg.stage == "dpo" and losses.get_preference_loss(cfg.loss.name).needs_reference
    if needs_ref:
        source = t.reference_from or t.init_from
        ref = model_init.load_run_params(source, mesh, preset)[0] if source else params
        if not source:
            log("warning: no train.init_from or train.reference_from: "
                "the reference is the random initialisation")
        if t.reference == "cache":
            cache_dir = Path(t.cache_dir) if t.cache_dir else workdir / "cache"
            micro = t.batch_size // t.grad_accum
            for arrays in (train_arrays, eval_arrays):
                if arrays["tokens"].shape[0]:
                    arrays["ref_logps"], _, _ = reference.cached_reference_logps(
                        cache_dir, graphdef, ref, arrays, batch_size=micro, mesh=mesh, preset=preset, log=log,
                        bucket_multiple=cfg.data.bucket_multiple if cfg.data.padding == "bucket" else None)
        else:
            ref_params = ref

    tx, schedule = steps.make_optimizer(cfg.optim, t.steps)
    make_state = lambda p, r: steps.new_train_state(p, tx, cfg.seed, r)
    # The frozen reference (on-the-fly mode) is placed by the same rules as the policy.
    state_shardings = sharding.tree_shardings(jax.eval_shape(make_state, params, ref_params), preset, mesh)
    state = jax.jit(make_state, out_shardings=state_shardings)(params, ref_params)
    del params

    objective, totals_fn = steps.stage_objective(cfg, graphdef)
    step_fn = steps.bind_step(objective, totals_fn, (tx, schedule), t.grad_accum)
    example = {
        k: jax.ShapeDtypeStruct((t.batch_size,) + v.shape[1:], v.dtype) for k, v in train_arrays.items()
    }
    train_step = steps.make_step(step_fn, jax.eval_shape(lambda: state), example, mesh, preset)
    eval_fn = lambda p, b, h, r: steps.eval_step(
        p, b, h, objective=objective, totals_fn=totals_fn, ref_params=r
    )
    eval_step = jax.jit(_with_mesh(eval_fn, mesh, preset))

    commit()  # the run has started: from here on the workdir belongs to this config
    ckpt = checkpoint.Checkpointer(workdir, every=t.checkpoint_every, keep=t.keep_checkpoints)
    start = 0
    saved = jax.eval_shape(lambda: _saveable(state))
    restored = ckpt.restore_latest(
        checkpoint.abstract_with_shardings(saved, sharding.tree_shardings(saved, preset, mesh)), log=log)
    if restored is not None:
        latest, restored_state, meta = restored
        state = restored_state.replace(ref_params=state.ref_params)
        start = int(meta["step"])
        log(f"resumed from {workdir}/checkpoints/{latest} at step {start}")
    metrics_lib.truncate_after(workdir, start if start else -1, final=start >= t.steps)
    resumed_last = metrics_lib.last_logged(workdir) if start else {}

    bucket = cfg.data.padding == "bucket"
    lengths = pipeline.example_lengths(train_arrays) if bucket or cfg.data.group_by_length else None
    order = pipeline.BatchOrder(train_arrays["tokens"].shape[0], t.batch_size, cfg.seed,
                                lengths if cfg.data.group_by_length else None)
    batch_sharding = sharding.batch_sharding(mesh, preset)
    writer = MetricWriter(workdir, tensorboard=t.tensorboard)
    seq_len = train_arrays["tokens"].shape[-1]
    rows_per_example = 2 if train_arrays["tokens"].ndim == 3 else 1

    def step_cost(width: int) -> tuple[float, float]:
        """(token positions, model FLOPs) of one step on batches `width` wide."""
        tokens = t.batch_size * rows_per_example * width
        flops = flops_per_token(model_cfg, width) * tokens
        if ref_params is not None:
            flops += flops_per_token(model_cfg, width, backward=False) * tokens
        return tokens, flops

    world_eval = None
    if cfg.data.source == "synthetic" and cfg.stage != "rm" and cfg.data.eval_prompts_per_domain:
        from jaxrl.evaluate import synthetic_eval

        # KL is to where the policy started, also for losses that train without a reference (SimPO).
        eval_ref = (
            ref
            if ref is not None or not t.init_from
            else model_init.load_run_params(t.init_from, mesh, preset)[0]
        )
        # The SFT base also measures the best-of-N ceilings every arm is read against.
        world_eval = lambda params, split, final=False: synthetic_eval(
            cfg, graphdef, params, eval_ref, data.tokenizer, split=split, best_of=cfg.stage == "sft" and final
        )
    progress = workdir_lib.progress(start, t.steps, enabled=t.progress and jax.process_index() == 0)
    pending, window_start, window = None, time.perf_counter(), []
    last, previous_skipped = resumed_last, None
    end = t.steps if stop_after is None else min(stop_after, t.steps)
    every = max(1, t.checkpoint_every)
    failure = None
    for step in range(start, end):
        indices = order.indices(step)
        width = pipeline.bucket_width(lengths, indices, cfg.data.bucket_multiple, seq_len) if bucket else None
        batch = pipeline.to_device(pipeline.host_batch(train_arrays, indices, width), batch_sharding)
        state, metrics = train_step(state, batch, hp)
        window.append(step_cost(width or seq_len))
        # Fetch the previous step's metrics only after dispatching this one: the device never waits on us.
        if previous_skipped is not None:
            failure = workdir_lib.skip_verdict(int(previous_skipped[1]), previous_skipped[0], t.steps,
                                               t.max_skipped_fraction)
            if failure:
                break
        if pending is not None:
            last = _log_metrics(writer, pending, window_start, window[:-1], progress)
            window_start, window, pending = time.perf_counter(), window[-1:], None
        previous_skipped = (step + 1, metrics["skipped_steps"])
        if (step + 1) % t.log_every == 0 or step + 1 == end:
            pending = (step + 1, metrics)
            if (step + 1) % every == 0:  # a checkpoint never gets ahead of the metrics rows it resumes after
                last = _log_metrics(writer, pending, window_start, window, progress)
                window_start, window, pending = time.perf_counter(), [], None
        if world_eval and t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
            if pending is not None:  # rows stay in step order
                last = _log_metrics(writer, pending, window_start, window, progress)
                window_start, window, pending = time.perf_counter(), [], None
            writer.write(
                step + 1, {f"val/{k}": v for k, v in world_eval(state.params, "validation")[0].items()}
            )
        ckpt.save(step + 1, _saveable(state), {"step": step + 1})
        progress.update(1)
    if failure is None and previous_skipped is not None:
        failure = workdir_lib.skip_verdict(int(previous_skipped[1]), previous_skipped[0], t.steps,
                                           t.max_skipped_fraction)
    if pending is not None and failure is None:
        last = _log_metrics(writer, pending, window_start, window, progress)
    progress.close()
    skipped = int(jax.device_get(state.skipped))
    if failure:  # counted again with the step dispatched after the one that decided it, so both agree
        failure = workdir_lib.skip_verdict(skipped, int(jax.device_get(state.step)) + skipped, t.steps,
                                           t.max_skipped_fraction) or failure
        ckpt.close()
        writer.close()
        raise workdir_lib.fail(
            workdir, cfg, failure, log=log, steps=t.steps, skipped_steps=skipped, train=last
        )

    if stop_after is not None and end < t.steps:
        ckpt.save(end, _saveable(state), {"step": end}, force=True)
        ckpt.close()
        writer.close()
        return {"stopped_at": end}

    ckpt.save(t.steps, _saveable(state), {"step": t.steps}, force=True)
    ckpt.close()
    eval_metrics = evaluate(
        eval_step, state.params, eval_arrays, hp, t.batch_size // t.grad_accum, mesh, preset, state.ref_params
    )
    val_metrics, per_prompt = {}, None
    if world_eval:
        val_metrics = (
            world_eval(state.params, "validation", True)[0] if cfg.data.val_prompts_per_domain else {}
        )
        test_metrics, per_prompt = world_eval(state.params, "test", True)
        eval_metrics |= test_metrics
    writer.write(t.steps, {f"val/{k}": v for k, v in val_metrics.items()}
                 | {f"eval/{k}": v for k, v in eval_metrics.items()})
    writer.close()
    if bad := workdir_lib.nonfinite_eval(eval_metrics):
        raise workdir_lib.fail(workdir, cfg, f"the final evaluation is not finite: {', '.join(bad)}", log=log,
                               steps=t.steps, skipped_steps=skipped, train=last, eval=eval_metrics)
    checkpoint.save_params(checkpoint.final_params_dir(workdir), state.params)
    summary = {"stage": cfg.stage, "status": "finished", "steps": t.steps, "skipped_steps": skipped,
               "train": last, "eval": eval_metrics, "val": val_metrics, "data": data.report}
    if per_prompt is not None:
        summary["eval_per_prompt"] = per_prompt
    workdir_lib.write_summary(workdir, summary)
    log(f"finished {cfg.stage}: eval {json.dumps({k: round(v, 4) for k, v in eval_metrics.items()})}")
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
    return lambda prompts, seed: sample_texts(graphdef, params, tok, prompts, temperature=1.0,
                                              max_new=cfg.data.eval_max_new, seed=seed)


def _saveable(state: steps.TrainState) -> steps.TrainState:
    # The frozen reference is reloaded from its source run, never written into every checkpoint.
    return state.replace(ref_params=None)


def _with_mesh(fn, mesh, preset):
    def traced(*args):
        with sharding.use_mesh(mesh, preset):
            return fn(*args)

    return traced


def _log_metrics(writer, pending, window_start, window, progress):
    """Logs a step's metrics, with throughput over the window of steps since the last log ((tokens, flops) of
    each; tokens are the positions computed, padding included)."""
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    values["tokens_per_s"] = sum(tokens for tokens, _ in window) / elapsed
    values["tflops_per_s"] = sum(flops for _, flops in window) / elapsed / 1e12
    row = {f"train/{k}": v for k, v in values.items()}
    writer.write(step, row)
    progress.set_postfix(loss=f"{values['loss']:.4f}")
    return values
