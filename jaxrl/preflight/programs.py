"""The programs a preflight compiles, with the arrays that stay resident between them. Online RL takes the
runner's own program list (`jaxrl.rl.programs`); the offline stages rebuild the runner's train step (and DPO's
reference forward) here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl import config as config_lib
from jaxrl import listwise, losses, member, reference, sharding, steps
from jaxrl.config import Config, ConfigError
from jaxrl.models import init as model_init
from jaxrl.models import lora
from jaxrl.preflight.report import Holding, ProgramReport, compile_program, tree_device_bytes
from jaxrl.rl import algorithms
from jaxrl.rl import programs as rl_programs


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def batch_spec(cfg: Config, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract batch of an offline stage as the runner builds it (token ids int32, loss masks int8)."""
    T = cfg.data.max_len
    if cfg.stage == "sft":
        return {"tokens": _spec((rows, T), np.int32), "loss_mask": _spec((rows, T), np.int8)}
    if cfg.stage == "dpo" and listwise.is_listwise(cfg.loss.name):
        K = cfg.data.list_size or 4  # data.sources.DEFAULT_LIST_SIZE for file sources
        return {
            "tokens": _spec((rows, K, T), np.int32),
            "loss_mask": _spec((rows, K, T), np.int8),
            "scores": _spec((rows, K), np.float32),
            "list_mask": _spec((rows, K), np.float32),
        }
    batch = {"tokens": _spec((rows, 2, T), np.int32), "loss_mask": _spec((rows, 2, T), np.int8)}
    if cfg.stage == "dpo" and not losses.get_preference_loss(cfg.loss.name).paired:
        batch["desirable"] = _spec((rows,), np.float32)
    else:
        batch["margin"] = _spec((rows,), np.float32)
    return batch


def source_model(path: str):
    """The model config of a local run directory or HF checkpoint, or None when it is not here."""
    if not path or not (Path(path) / "config.json").is_file():
        return None
    from jaxrl.models import hf

    if hf.is_hf_dir(path):
        return hf.config_from_hf(hf.read_hf_config(path))
    source = config_lib.from_dict(json.loads((Path(path) / "config.json").read_text()))
    return model_init.stage_model_config(source)


def with_architecture(model_cfg, source):
    """`model_cfg` with the architecture of the checkpoint a role loads (`source_model`), when it is here."""
    from jaxrl.convert import ARCHITECTURE_KEYS

    if source is None:
        return model_cfg
    return dataclasses.replace(model_cfg, **{k: getattr(source, k) for k in ARCHITECTURE_KEYS})


class Builder:
    """Compiles a stage's programs on one mesh and collects their memory and the resident arrays."""

    def __init__(self, cfg: Config, mesh, log):
        self.cfg, self.mesh, self.preset, self.log = cfg, mesh, cfg.mesh.preset, log
        self.programs: list[ProgramReport] = []
        self.holdings: list[Holding] = []
        self.notes: list[str] = []

    def hold(self, name: str, abstract_tree, *, offloaded: bool = False) -> None:
        shardings = sharding.tree_shardings(abstract_tree, self.preset, self.mesh)
        self.holdings.append(Holding(name, tree_device_bytes(abstract_tree, shardings), offloaded))

    def hold_state(self, role: str, state: steps.TrainState) -> tuple[str, ...]:
        """Holds a train state as its parameters, the rest (optimizer moments, counters) and a LoRA run's
        frozen base."""
        self.hold(f"{role} params", state.params)
        self.hold(f"{role} optimizer state", state.replace(params=None, ref_params=None, frozen=None))
        if state.frozen is None:
            return f"{role} params", f"{role} optimizer state"
        self.hold(f"{role} frozen base params", state.frozen)
        return f"{role} params", f"{role} optimizer state", f"{role} frozen base params"

    def check_rows(self, rows: int, what: str) -> None:
        divisor = sharding.batch_divisor(self.mesh, self.preset)
        if rows % divisor:
            raise ConfigError(
                f"{what}: {rows} rows do not divide over the {divisor} batch shards of mesh "
                f"{dict(self.mesh.shape)}"
            )

    def compile(self, name: str, jitted, args, holdings: tuple[str, ...], **static) -> None:
        report = compile_program(name, jitted, args, holdings, self.log, **static)
        if report.error:  # no memory analysis: count at least the resident arrays it takes
            report.arguments = sum(h.bytes for h in self.holdings if h.name in holdings)
            self.notes.append(f"{name} was refused by the compiler: {report.error}")
        self.programs.append(report)


def offline_programs(b: Builder, cfg: Config, model_cfg) -> None:
    """SFT, RM, DPO: the runner's train step; DPO also its reference (a cached forward, or in the state)."""
    t = cfg.train
    b.check_rows(t.batch_size // t.grad_accum, "train.batch_size / train.grad_accum")
    batch = batch_spec(cfg, t.batch_size)
    needs_ref = cfg.stage == "dpo" and listwise.offline_loss(cfg.loss.name).needs_reference
    on_the_fly = needs_ref and t.reference == "on_the_fly"
    ref_cfg = with_architecture(model_cfg, source_model(t.reference_from or t.init_from))
    if needs_ref and not on_the_fly:
        batch["ref_logps"] = _spec(batch["tokens"].shape[:2], np.float32)  # [B, 2] pairs, [B, K] lists
    graphdef, params = model_init.abstract_model(model_cfg)
    # LoRA (as jaxrl.member.setup): adapters (and a scalar head) train over a frozen base, which is also the
    # reference (adapters off) unless train.reference_from names another run (then cached).
    lora_run = model_cfg.lora_rank > 0
    base_is_ref = lora_run and t.reference_from in ("", t.init_from)
    frozen = None
    if lora_run:
        frozen, params = lora.split(params)
        ref_cfg = lora.base_config(ref_cfg)
    ref = model_init.abstract_model(ref_cfg)[1] if on_the_fly and not lora_run else None
    tx, schedule = steps.make_optimizer(cfg.optim, t.steps)
    loss_state = steps.initial_loss_state(cfg)
    state = jax.eval_shape(
        lambda p, r, f: steps.new_train_state(p, tx, cfg.seed, r, loss_state, f), params, ref, frozen
    )
    holdings = b.hold_state("train", state)
    if on_the_fly and not lora_run:
        b.hold("reference params", state.ref_params)
        holdings += ("reference params",)
    if on_the_fly and base_is_ref:
        b.notes.append("LoRA: the reference is the frozen base with the adapters off (no second model)")
    _, _, train_step = member.train_program(
        cfg,
        graphdef,
        (tx, schedule),
        state,
        batch,
        b.mesh,
        b.preset,
        base_reference=on_the_fly and base_is_ref,
    )
    hp = jax.eval_shape(lambda: steps.loss_hparams(cfg))
    b.compile("train_step", train_step, (state, batch, hp), holdings)
    if needs_ref and not on_the_fly:
        # The runner's own reference pass (jaxrl.reference.reference_forward): microbatches of pairs or lists,
        # summed completion log-probs, its parameters placed as training places them and the rows sharded.
        micro = t.batch_size // t.grad_accum
        rows = sharding.batch_sharding(b.mesh, b.preset)
        tokens, mask = (
            jax.ShapeDtypeStruct((micro,) + batch[k].shape[1:], batch[k].dtype, sharding=rows)
            for k in ("tokens", "loss_mask")
        )
        ref_graphdef, ref_params = model_init.abstract_model(ref_cfg)
        ref_holding = "reference params"
        if base_is_ref:  # the frozen base itself: held once
            ref_holding = "train frozen base params"
        else:  # on the device for the cache pass alone, not while training (jaxrl.member.setup)
            b.hold("reference params", ref_params, offloaded=True)
        placed = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            ref_params,
            sharding.tree_shardings(ref_params, b.preset, b.mesh),
        )
        b.compile(
            "reference_logps",
            reference.reference_forward,
            (placed, tokens, mask),
            (ref_holding,),
            graphdef=ref_graphdef,
            mesh=b.mesh,
            preset=b.preset,
        )
        b.notes.append(
            "reference log-probs are computed once and cached; the runner then releases the reference "
            "parameters, or keeps them in host memory between synthetic-world evaluations (their KL), so "
            "they are not resident on the device while training"
        )


def _rl_roles(b: Builder, cfg: Config, model_cfg) -> rl_programs.Roles:
    """The run's models as abstract parameters: the policy (= reference), the reward models (their own
    architecture when their run is here, else the policy's) and, when the algorithm has one, the value."""
    r = cfg.rl
    reward_cfgs = []
    from jaxrl.rewards import constraint_reward_model_sources

    # The objective's reward models, then each constraint's: the order of the run's reward programs.
    for path in config_lib.reward_model_sources(r.reward_model) + constraint_reward_model_sources(r):
        found = source_model(path)
        if found is None:
            b.notes.append(f"reward model {path} is not here: assumed to have the policy's architecture")
        reward_cfgs.append(dataclasses.replace(with_architecture(model_cfg, found), head="scalar"))
    value_graphdef = value_params = None
    if algorithms.of(cfg).needs_value:
        value_cfg = (
            reward_cfgs[0]
            if r.value_init == "reward_model"
            else dataclasses.replace(model_cfg, head="scalar")
        )
        value_graphdef, value_params = model_init.abstract_model(value_cfg)
    graphdef, params = model_init.abstract_model(model_cfg)
    return rl_programs.Roles(
        graphdef=graphdef,
        params=params,
        value_graphdef=value_graphdef,
        value_params=value_params,
        rewards=tuple(model_init.abstract_model(c) for c in reward_cfgs),
    )


def online_programs(b: Builder, cfg: Config, model_cfg) -> None:
    """Online RL: the very programs jaxrl.rl.runner runs (`rl.programs.programs`) and its resident arrays."""
    # Special token ids are static arguments of the sampler that change no shape, so any will do here.
    run = rl_programs.programs(cfg, b.mesh, _rl_roles(b, cfg, model_cfg), eos_id=1, pad_id=0)
    for resident in run.residents:
        b.hold(resident.name, resident.abstract, offloaded=resident.offloaded)
    for program in run.programs.values():
        b.compile(program.name, program.fn, program.args, program.holdings, **program.static)
