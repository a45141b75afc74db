"""One offline run's pieces (`Member`): its data, model, initial state and programs built from its config
(`setup`), and its resume from the latest checkpoint (`restore`). The loop that trains members, alone or as a
group (vmapped or mapped), is jaxrl.train's."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax

from jaxrl import checkpoint, listwise, reference, sharding, steps
from jaxrl import config as config_lib
from jaxrl import metrics as metrics_lib
from jaxrl.config import Config
from jaxrl.data import pipeline
from jaxrl.models import attention, lora
from jaxrl.models import init as model_init
from jaxrl.models.frozen import Frozen, shares_buffers


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
    train_step: Any  # the solo program (jitted, donating); a group has its own
    eval_step: Any
    world_eval: Any
    # (params, split) -> final-evaluation metrics only (a reward model's proxy best-of-N on its base's draws)
    final_eval: Any = None
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
    log(sharding.describe(mesh, cfg.mesh))
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
    world = cfg.data.source == "synthetic" and cfg.stage != "rm" and cfg.data.eval_prompts_per_domain
    start = _start_of(cfg, model_cfg, ref, mesh) if world else None
    # Past the cache pass the reference is its log-probs: released, or in the state (on the fly).
    ref = None

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
    # The state's arrays are new buffers, so what it consumes is donated, but for buffers another role still
    # holds: the random initialisation as its own reference, or a start kept on the device.
    kept = None if start is None or start.offload else start.get()
    donate = () if shares_buffers(params, ref_params) else (0, 1)
    donate = tuple(i for i in donate if not shares_buffers((params, ref_params)[i], kept))
    state = jax.jit(make_state, out_shardings=state_shardings, donate_argnums=donate)(params, ref_params)
    if frozen is not None:  # joined outside the jit: the base is never copied
        state = state.replace(frozen=frozen)
        state_shardings = state_shardings.replace(frozen=sharding.tree_shardings(frozen, preset, mesh))
    del params

    example = {
        k: jax.ShapeDtypeStruct((t.batch_size,) + v.shape[1:], v.dtype) for k, v in train_arrays.items()
    }
    objective, totals_fn, train_step = train_program(
        cfg,
        graphdef,
        (tx, schedule),
        jax.eval_shape(lambda: state),
        example,
        mesh,
        preset,
        base_reference=needs_ref and base_is_ref and t.reference == "on_the_fly",
    )
    eval_fn = lambda p, b, h, r, d: steps.eval_step(
        p, b, h, objective=objective, totals_fn=totals_fn, ref_params=r, delta=d
    )
    eval_step = jax.jit(with_mesh(eval_fn, mesh, preset))

    world_eval = None
    if world:
        from jaxrl.evaluate import synthetic_eval

        # The SFT base also measures the best-of-N ceilings every arm is read against, and stores their draws
        # for the reward models trained from it (their proxy best-of-N scores the same draws).
        world_eval = lambda params, split, final=False: synthetic_eval(
            cfg,
            graphdef,
            params,
            lora.adapters_off(params) if model_cfg.lora_rank else start.get() if start else None,
            data.tokenizer,
            split=split,
            best_of=cfg.stage == "sft" and final,
            draws_run=workdir,
        )
    final_eval = None
    d = cfg.data
    sampled_eval = d.source == "synthetic" and d.eval_prompts_per_domain and d.eval_best_of
    if cfg.stage == "rm" and t.init_from and sampled_eval:
        from jaxrl.evaluate import draws_path, proxy_best_of

        # The policy the reward model will judge: its init_from run (the SFT base), whose stored best-of-N
        # draws it scores (the base's own ceilings'), on each split; the base is read only if they must be
        # sampled again.
        @functools.cache
        def policy():
            policy_params, source_model = model_init.load_run_params(t.init_from, mesh, preset)
            return model_init.abstract_model(dataclasses.replace(source_model, head="lm"))[0], policy_params

        final_eval = lambda params, split: proxy_best_of(
            cfg, policy, graphdef, params, data.tokenizer, split=split, draws=draws_path(t.init_from, split)
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


def train_program(cfg: Config, graphdef, optimizer, state, batch, mesh, preset: str, *, base_reference: bool):
    """(objective, totals_fn, train step): the stage's objective (a LoRA run's on-the-fly reference is its own
    base, `base_reference`) and its jitted, donating update for `state` and `batch` (abstract or concrete).
    The one builder of the offline step: the runner trains with it and `jaxrl preflight` compiles it."""
    objective, totals_fn = steps.stage_objective(cfg, graphdef)
    if base_reference:
        objective = steps.base_as_reference(objective)
    step_fn = steps.bind_step(objective, totals_fn, optimizer, cfg.train.grad_accum)
    return objective, totals_fn, steps.make_step(step_fn, state, batch, mesh, preset)


def _start_of(cfg: Config, model_cfg, ref, mesh) -> Frozen | None:
    """Where the policy started, which the synthetic world evaluation measures KL to: the reference, else
    train.init_from's parameters (losses that train without one, SimPO), held in host memory between
    evaluations (a multi-host run keeps them on the device); None with neither, or for a LoRA run (its
    start is its own base, the adapters off)."""
    if model_cfg.lora_rank:
        return None
    if ref is None and cfg.train.init_from:
        ref = model_init.load_run_params(cfg.train.init_from, mesh, cfg.mesh.preset)[0]
    return None if ref is None else Frozen(ref, offload=jax.process_count() == 1)


def restore(m: Member, log) -> None:
    """Resumes `m` from its latest checkpoint (if any); truncates metrics logged after it."""
    preset, t = m.cfg.mesh.preset, m.cfg.train
    if jax.process_index() == 0 and hasattr(m.data.tokenizer, "save"):
        m.data.tokenizer.save(m.workdir / "tokenizer.json")
    m.ckpt = checkpoint.Checkpointer(m.workdir, every=t.checkpoint_every, keep=t.keep_checkpoints)
    saved = jax.eval_shape(lambda: saveable(m.state))
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


def saveable(state: steps.TrainState) -> steps.TrainState:
    # The frozen reference (and a LoRA run's frozen base) is rebuilt from its source run, never written into
    # every checkpoint.
    return state.replace(ref_params=None, frozen=None)


def with_mesh(fn, mesh, preset):
    def traced(*args):
        with sharding.use_mesh(mesh, preset):
            return fn(*args)

    return traced
