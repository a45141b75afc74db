"""Sweeps as one program: offline runs whose programs have the same shapes train together, their states
stacked on a leading member axis and stepped by one jitted update over the members (online runs:
jaxrl.rl.group, which `group_key` and `run_group` hand them to).

Two ways over the members (`over_members`): "vmap" batches them (one set of kernels for all: what makes a
group faster on a launch-bound GPU or TPU; batched matmuls round differently from the solo program's, a few
ulps per step, which a long run grows into seed-sized differences) and "map" steps them one after another
inside the one program (`jax.lax.map`: each member computes its solo program's arithmetic, bitwise equal to
its run alone under XLA's default CPU optimisation; the group saves compiles and dispatches, not FLOPs).

What may differ between the members of a group is what can be an array: the seed (parameter init, data
order, the state's key), the loss hyperparameters, the learning rate, the DPO-family loss itself (an index
into the group's losses, every one computed on the same log-probs and the member's own selected), the
preference data (same shapes) and the run a member starts from. Everything else (stage, model, batch, steps,
the schedule's shape, the logging and checkpoint cadence) is part of the group key.

Every member is still a run: its own run dir, config, metrics.jsonl, checkpoints, evaluation and summary, as
if it had run alone (jaxrl.train.train_members is the one loop for both). Evaluation runs per member, with
the member's parameters placed as the solo run places them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl import config as config_lib
from jaxrl import distributed, listwise, pairwise, sharding, steps
from jaxrl import workdir as workdir_lib
from jaxrl.config import Config
from jaxrl.grouping import WAYS, over_members

GROUPED_STAGES = ("sft", "rm", "dpo")
# Settings that become arrays (or per-member host state) in a group; every other setting is in the key.
MEMBER_KEYS = ("seed", "optim.lr", "train.init_from", "train.reference_from", "train.cache_dir")
MEMBER_PREFIXES = ("data.",)
HPARAM_KEYS = tuple(f"loss.{f.name}" for f in dataclasses.fields(pairwise.LossHParams))
# Of the group's budget (device memory, or half the host's on CPU) one program may use.
MEMORY_FRACTION = 0.8


def group_key(cfg: Config, how: str = "vmap") -> str | None:
    """The key runs must share to train as one program; None for a run that always trains alone
    (length-bucketed batches whose widths differ per member, LoRA). Online stages: `jaxrl.rl.group`.
    Mapped groups (`how="map"`) keep one DPO-family loss per group: a switch between losses is a branch
    of its own, compiled apart from the rest of the step, and rounds its metrics differently from the loss
    inlined in its solo program."""
    if cfg.stage in config_lib.RL_STAGES:
        from jaxrl.rl import group as rl_group

        return rl_group.group_key(cfg)
    if cfg.stage not in GROUPED_STAGES or cfg.data.padding == "bucket" or cfg.model.lora_rank:
        return None  # (a LoRA run's frozen base and base-as-reference objective are its own)
    flat = config_lib.flat_dict(cfg)
    variable = set(MEMBER_KEYS) | set(HPARAM_KEYS) | {"loss.name"}
    kept = {k: v for k, v in flat.items() if k not in variable and not k.startswith(MEMBER_PREFIXES)}
    kept["data.padding"] = cfg.data.padding
    if cfg.stage == "dpo":
        kept["needs_reference"] = listwise.offline_loss(cfg.loss.name).needs_reference
        spec = listwise.offline_loss(cfg.loss.name)
        if how == "map" or listwise.is_listwise(cfg.loss.name) or getattr(spec, "running_shift", False):
            # Not a branch of a pairwise group's switch: a mapped group's loss, a listwise loss, or one with
            # a carried shift.
            kept["loss.name"] = cfg.loss.name
    return json.dumps(kept, sort_keys=True, default=str)


def array_signature(member) -> tuple:
    """The shapes a member's step sees: members of one program must agree on them."""
    arrays = tuple(sorted((k, v.shape[1:], str(v.dtype)) for k, v in member.train_arrays.items()))
    return member.start, arrays, member.state.ref_params is not None


class GroupProgram:
    """The members' states stacked on a leading axis and one train step over them (donating the stack).

    Inside a member the layout is the solo run's (each leaf's sharding with the member axis unsharded in
    front), so a member computes what it would alone."""

    def __init__(self, members: list, how: str = "vmap"):
        m0 = members[0]
        cfg, t = m0.cfg, m0.cfg.train
        self.members = members
        names = tuple(sorted({m.cfg.loss.name for m in members}))
        objective = m0.objective
        if cfg.stage == "dpo" and len(names) > 1:
            objective = functools.partial(steps.preference_objective, graphdef=m0.graphdef, loss_name=names)
        self.hp = sharding.stack([m.hp for m in members])
        self.lr = jnp.asarray([m.cfg.optim.lr for m in members], jnp.float32)
        self.index = jnp.asarray([names.index(m.cfg.loss.name) for m in members], jnp.int32)
        multi = objective is not m0.objective

        def member_step(state, batch, hp, lr, index):
            tx, schedule = steps.make_optimizer(cfg.optim, t.steps, lr=lr)
            obj = functools.partial(objective, loss_index=index) if multi else objective
            return steps.train_step(
                state,
                batch,
                hp,
                objective=obj,
                totals_fn=m0.totals_fn,
                tx=tx,
                schedule=schedule,
                grad_accum=t.grad_accum,
            )

        mesh, preset = m0.mesh, cfg.mesh.preset
        self.state_shardings = jax.tree.map(sharding.stacked_sharding, m0.state_shardings)
        batch_sharding = sharding.stacked_sharding(sharding.batch_sharding(mesh, preset))

        def traced(state, batch, hp, lr, index):
            with sharding.use_mesh(mesh, preset):
                return over_members(member_step, how=how)(state, batch, hp, lr, index)

        self._step = jax.jit(
            traced,
            in_shardings=(self.state_shardings, batch_sharding, None, None, None),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )
        self.batch_sharding = batch_sharding
        self.state = jax.device_put(sharding.stack([m.state for m in members]), self.state_shardings)
        for m in members:
            m.state = None  # the stack holds them now
        example = {
            k: jax.ShapeDtypeStruct((t.batch_size,) + v.shape[1:], v.dtype)
            for k, v in m0.train_arrays.items()
        }
        abstract = jax.eval_shape(lambda: jax.tree.map(lambda x: x[0], self.state))
        # Each member logs the metrics its own loss logs alone (a group of losses computes their union).
        self.keys = [set(jax.eval_shape(m.train_step, abstract, example, m.hp)[1]) for m in members]
        self._version, self._cache, self._executable = 0, {}, None

    def _compiled(self):
        """The group's step compiled ahead of time (once: the memory guard reads it, the loop calls it)."""
        if self._executable is None:
            t = self.members[0].cfg.train
            example = {
                k: jax.ShapeDtypeStruct(
                    (len(self.members), t.batch_size) + v.shape[1:], v.dtype, sharding=self.batch_sharding
                )
                for k, v in self.members[0].train_arrays.items()
            }
            self._executable = self._step.lower(self.state, example, self.hp, self.lr, self.index).compile()
        return self._executable

    def compiled_bytes(self) -> int:
        """Bytes the group's step needs (arguments, outputs and temporaries), from its compiled program."""
        compiled = self._compiled()
        analysis = compiled.memory_analysis()
        if analysis is None:
            return 0
        return int(
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        )

    def step(self, batches: list) -> dict:
        batch = jax.device_put(sharding.stack(batches), self.batch_sharding)
        self.state, metrics = self._compiled()(self.state, batch, self.hp, self.lr, self.index)
        self._version += 1
        return metrics

    def fetch(self, metrics) -> list[dict]:
        host = jax.device_get(metrics)
        return [{k: v[i] for k, v in host.items() if k in keys} for i, keys in enumerate(self.keys)]

    def member_state(self, i: int) -> steps.TrainState:
        """Member i's state, placed as its solo run places it (cached until the next step)."""
        if self._cache.get("version") != self._version:
            self._cache = {"version": self._version}
        if i not in self._cache:
            one = jax.tree.map(lambda x: x[i], self.state)
            self._cache[i] = jax.device_put(one, self.members[i].state_shardings)
        return self._cache[i]

    def skipped(self) -> list[int]:
        return [int(x) for x in np.asarray(jax.device_get(self.state.skipped))]


def memory_budget() -> int:
    """Bytes one program may use: a share of the first device's memory limit, or of half the host's memory
    on CPU (every fake CPU device shares it)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] * MEMORY_FRACTION)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(host * 0.5 * MEMORY_FRACTION)


def fitting_programs(members: list, budget: int, log, how: str = "vmap") -> list:
    """Programs for `members`: one group when its compiled step fits `budget`, else halves, down to solo
    runs (the memory guard)."""
    from jaxrl.train import SoloProgram

    if len(members) == 1:
        return [SoloProgram(members[0])]
    states = [m.state for m in members]
    program = GroupProgram(members, how)
    need = program.compiled_bytes()
    if need <= budget:
        return [program]
    log(f"a group of {len(members)} needs {need / 2**30:.2f} GiB > {budget / 2**30:.2f} GiB: split in two")
    for m, s in zip(members, states, strict=True):
        m.state = s
    del program
    half = len(members) // 2
    halves = members[:half], members[half:]
    return [p for part in halves for p in fitting_programs(part, budget, log, how)]


def run_group(
    cfgs: list[Config],
    workdirs: list[str | Path],
    *,
    log=print,
    stop_after: int | None = None,
    budget: int | None = None,
    how: str = "vmap",
) -> list:
    """Trains the runs `cfgs` (one group key) in `workdirs` together, `how` = "vmap" or "map" (see the
    module's doc); per run, its summary, or the exception it ended with (RunFailed, WorkdirLocked: another
    process holds it). A finished run is answered from its summary, resumed runs continue from their own
    checkpoints (runs at different steps train in separate groups)."""
    from jaxrl import member as member_lib
    from jaxrl import train

    distributed.initialize()
    cfgs = [train.resolve(c) for c in cfgs]
    if how not in WAYS:
        raise ValueError(f"run_group: how={how!r}, expected one of {WAYS}")
    keys = {group_key(c, how) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ValueError("run_group: the runs do not share one group key (see jaxrl.group.group_key)")
    workdirs = [Path(w).absolute() for w in workdirs]
    results: list = [None] * len(cfgs)
    with contextlib.ExitStack() as held:
        todo = []
        for i, (cfg, wd) in enumerate(zip(cfgs, workdirs, strict=True)):
            try:
                held.enter_context(workdir_lib.hold(wd, log=log))
                workdir_lib.check_config(wd, cfg)
            except (workdir_lib.WorkdirLocked, config_lib.ConfigError) as e:
                results[i] = e
                continue
            summary = workdir_lib.finished_summary(wd)
            if summary is not None:
                failed = summary.get("status") == "failed"
                results[i] = workdir_lib.RunFailed(wd, summary) if failed else summary
                continue
            todo.append(i)
        if not todo:
            return results
        if cfgs[todo[0]].stage in config_lib.RL_STAGES:  # online runs iterate together (jaxrl.rl.group)
            from jaxrl.rl import group as rl_group

            budget = memory_budget() if budget is None else budget
            ran = rl_group.train_runs(
                [cfgs[i] for i in todo], [workdirs[i] for i in todo], log, stop_after, budget, how
            )
            for i, result in zip(todo, ran, strict=True):
                results[i] = result
            return results
        mesh = sharding.make_mesh(cfgs[todo[0]].mesh)
        members = {}
        for i in todo:
            members[i] = member_lib.setup(cfgs[i], workdirs[i], mesh, log)
            workdir_lib.commit_config(workdirs[i], cfgs[i])
            member_lib.restore(members[i], log)
        parts: dict[tuple, list[int]] = {}
        for i in todo:
            parts.setdefault(array_signature(members[i]), []).append(i)
        budget = memory_budget() if budget is None else budget
        for indices in parts.values():
            for program in fitting_programs([members[i] for i in indices], budget, log, how):
                group = program.members
                summaries = train.train_members(group, program, log, stop_after)
                for m, summary in zip(group, summaries, strict=True):
                    i = next(j for j in indices if members[j] is m)
                    failed = summary.get("status") == "failed"
                    results[i] = workdir_lib.RunFailed(m.workdir, summary) if failed else summary
    return results
