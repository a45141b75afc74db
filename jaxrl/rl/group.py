"""Online runs as one program: runs of an online stage whose programs have the same shapes iterate together,
their train states (and frozen references) stacked on a leading member axis, every device program of an
iteration (sampling, rollout statistics, advantages, the training data, minibatch gathers and updates) one
call over the members, vmapped or mapped (`jaxrl.grouping.over_members`). Mapped, a member trains bitwise
as alone on a CPU; a few logged batch means of its rollout statistics (`val/returns_mean`,
`debug/logprob_gap_mean`, ...) can come out a last bit apart, as the loop body may reduce them in another
order (bench/results/sweep_groups.md).

What may differ between members: the seed (prompt order, sampling keys, minibatch order, value-head init),
the policy's and the value model's learning rates, the KL coefficient (adaptive per member), the run they
start from, the reward model and the prompt set. The reward of each member is its own reward function's, on
the host or by its own reward model's program; everything else (stage, model, rollout shapes, steps,
cadences, the other loss settings) is in the group key.

Every member is still a run: its own context, run dir, metrics, validation curve, checkpoints, final
evaluation and summary (`runner.OnlineRun`, the same host side as a run alone), resumes from its own
checkpoints, and fails alone."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxrl import config as config_lib
from jaxrl import grouping, sharding, steps
from jaxrl import workdir as workdir_lib
from jaxrl.config import Config
from jaxrl.rl import algorithms, context, programs, runner
from jaxrl.rl.objectives import ROLLOUT_KEYS

# Settings that are per member (arrays, or host state) in a group; every other setting is in the key.
MEMBER_KEYS = (
    "seed",
    "optim.lr",
    "rl.value_lr",
    "rl.kl_coef",
    "rl.reward_model",
    "rl.prompt_set",
    "train.init_from",
    "train.cache_dir",
)


def group_key(cfg: Config) -> str | None:
    """The key online runs must share to iterate as one program; None for a run that always runs alone (a
    LoRA policy, whose frozen base is its reference; frozen roles offloaded to the host between uses)."""
    if cfg.model.lora_rank or cfg.rl.offload_frozen:
        return None
    kept = {k: v for k, v in config_lib.flat_dict(cfg).items() if k not in MEMBER_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def _is_arrays(arg) -> bool:
    leaves = jax.tree.leaves(arg)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def stacked_abstract(tree, members: int, axes=0):
    """Abstract arguments of a program stacked on a leading member axis (placed as the group places them);
    `axes`, a prefix of `tree` as vmap's in_axes: None where one argument serves all members (not stacked)."""

    def one(a):
        placed = isinstance(getattr(a, "sharding", None), NamedSharding)
        return jax.ShapeDtypeStruct(
            (members, *a.shape), a.dtype, sharding=sharding.stacked_sharding(a.sharding) if placed else None
        )

    def part(axis, sub):
        return sub if axis is None else jax.tree.map(one, sub)

    return jax.tree.map(part, axes, tree, is_leaf=lambda x: x is None)


class Vmapped:
    """A run's program over a leading member axis of its array arguments: one jitted call, vmapped or mapped
    (`how`, jaxrl.grouping.over_members). Called with the solo program's arguments; its non-array ones
    (graphdefs) and static settings are the run's. `axes`: in_axes of some array arguments by their position
    in the program's arguments (None: one value for every member, e.g. a reference all members share); the
    others are stacked (0)."""

    def __init__(self, program: programs.Program, axes: dict | None = None, how: str = "vmap"):
        self.program = program
        self.fixed = {i: a for i, a in enumerate(program.args) if not _is_arrays(a)}
        axes = axes or {}
        self.in_axes = tuple(axes.get(i, 0) for i in range(len(program.args)) if i not in self.fixed)

        def member(*arrays):
            it = iter(arrays)
            args = [self.fixed[i] if i in self.fixed else next(it) for i in range(len(program.args))]
            return program.fn(*args, **program.static)

        self.batched = jax.jit(grouping.over_members(member, self.in_axes, how))

    def __call__(self, *args):
        return self.batched(*(a for i, a in enumerate(args) if i not in self.fixed))

    def lower(self, members: int):
        args = [a for i, a in enumerate(self.program.args) if i not in self.fixed]
        return self.batched.lower(*stacked_abstract(args, members, list(self.in_axes)))


def shares_reference(runs: list[runner.OnlineRun]) -> bool:
    """Whether every member's frozen reference holds the same values (members started from one run): the group
    then holds one reference for all, not a stack of copies."""
    ref0 = runs[0].ctx.ref.get()
    equal = []  # device booleans, read back once
    for r in runs[1:]:
        ref = r.ctx.ref.get()
        if jax.tree.structure(ref) != jax.tree.structure(ref0):
            return False
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ref0), strict=True):
            if a.shape != b.shape or a.dtype != b.dtype:
                return False
            equal.append(jnp.array_equal(a, b))
    return bool(jnp.all(jnp.stack(equal))) if equal else True


def program_axes(run0: runner.OnlineRun, shared_ref: bool) -> dict[str, dict]:
    """vmap in_axes of the programs that read the reference, when the members share it: the mixture sampler's
    reference argument and rollout statistics' "ref" entry."""
    if not shared_ref:
        return {}
    stats_params = run0.ctx.programs["rollout_stats"].args[0]
    axes = {"rollout_stats": {0: {k: None if k == "ref" else 0 for k in stats_params}}}
    if run0.ctx.mixture_coef is not None:
        axes["generate"] = {2: None}  # (graphdef, params, ref, ...): runner.sample_rollout's mixture call
    return axes


def train_step(run0: runner.OnlineRun, how: str = "vmap"):
    """The minibatch update of every member of a group of `run0`'s key, each with its own learning rates
    (the stacked state donated)."""
    ctx, cfg = run0.ctx, run0.cfg
    units, mb_units = algorithms.units(cfg)
    updates = cfg.train.steps * cfg.rl.epochs * (units // mb_units)
    with_value = ctx.value_graphdef is not None
    state_shardings = jax.tree.map(sharding.stacked_sharding, run0.state_shardings)

    def member_step(state, minibatch, hp, lr, value_lr):
        optimizers = {"policy": steps.make_optimizer(cfg.optim, updates, lr=lr)}
        if with_value:
            optimizers["value"] = steps.make_optimizer(cfg.optim, updates, lr=value_lr)
        update = programs.update_fn(cfg, ctx.graphdef, ctx.value_graphdef, optimizers)
        return update(state, minibatch, hp)

    def traced(state, minibatch, hp, lr, value_lr):
        with sharding.use_mesh(ctx.mesh, ctx.preset):
            return grouping.over_members(member_step, how=how)(state, minibatch, hp, lr, value_lr)

    return jax.jit(
        traced,
        in_shardings=(state_shardings, sharding.stacked_sharding(ctx.batch_sharding), None, None, None),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def program_bytes(runs: list[runner.OnlineRun], how: str = "vmap") -> int:
    """Bytes the largest of a group's programs needs (arguments, outputs and temporaries, less what is
    donated), from compiles of the group's sampler, rollout statistics and update on abstract arguments."""
    k, p = len(runs), runs[0].ctx.programs
    axes = program_axes(runs[0], shares_reference(runs))
    lowered = [Vmapped(p[name], axes.get(name), how).lower(k) for name in ("generate", "rollout_stats")]
    rates = jax.ShapeDtypeStruct((k,), jnp.float32)
    update_args = stacked_abstract(p["train_step"].args, k)
    lowered.append(train_step(runs[0], how).lower(*update_args, rates, rates))
    needs = []
    for program in lowered:
        m = program.compile().memory_analysis()
        if m is not None:
            sizes = (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes)
            needs.append(int(sum(sizes) - m.alias_size_in_bytes))
    return max(needs, default=0)


def fitting(runs: list, states: list, budget: int, log, how: str = "vmap") -> list[tuple[list, list]]:
    """(runs, states) of the groups to iterate: all of them when the group's programs fit `budget`, else
    halves, down to runs alone (the memory guard)."""
    if len(runs) == 1:
        return [(runs, states)]
    need = program_bytes(runs, how)
    if need <= budget:
        return [(runs, states)]
    log(f"a group of {len(runs)} online runs needs {need / 2**30:.2f} GiB > {budget / 2**30:.2f} GiB: split")
    half = len(runs) // 2
    return fitting(runs[:half], states[:half], budget, log, how) + fitting(
        runs[half:], states[half:], budget, log, how
    )


class GroupPrograms:
    """The members' stacked state, references and per-member device scalars, and the programs over them."""

    def __init__(self, runs: list[runner.OnlineRun], states: list, how: str = "vmap"):
        run0 = runs[0]
        ctx = run0.ctx
        self.runs = runs
        self.mesh, self.preset = ctx.mesh, ctx.preset
        self.batch = sharding.stacked_sharding(ctx.batch_sharding)
        self.state_shardings = jax.tree.map(sharding.stacked_sharding, run0.state_shardings)
        self.state = jax.device_put(sharding.stack(states), self.state_shardings)
        states.clear()  # the stack holds them now: the members' own copies are freed
        self.shared_ref = shares_reference(runs)
        if self.shared_ref:
            # One reference serves every member (its values are each member's): the others' copies are freed.
            for r in runs[1:]:
                r.ctx.ref = ctx.ref
            self.ref = ctx.ref.get()
        else:
            self.ref = sharding.stack([r.ctx.ref.get() for r in runs])
        self.temperature = jnp.stack([r.ctx.temperature for r in runs])
        self.mixture_coef = (
            None if ctx.mixture_coef is None else jnp.stack([r.ctx.mixture_coef for r in runs])
        )
        self.update_hp = None if ctx.update_hp is None else sharding.stack([r.ctx.update_hp for r in runs])
        self.lr = jnp.asarray([r.cfg.optim.lr for r in runs], jnp.float32)
        self.value_lr = jnp.asarray([r.cfg.rl.value_lr or r.cfg.optim.lr for r in runs], jnp.float32)
        p, axes = ctx.programs, program_axes(run0, self.shared_ref)
        self.generate = Vmapped(p["generate"], axes.get("generate"), how)
        self.rollout_stats = Vmapped(p["rollout_stats"], axes.get("rollout_stats"), how)
        self.advantages = Vmapped(p["advantages"], None, how)
        self.prepare = Vmapped(p["prepare"], None, how)
        self.gather = Vmapped(p["gather"], None, how)
        self.keys = jax.jit(jax.vmap(context.stream_key))  # integer arithmetic: exact either way
        self.train_step = train_step(run0, how)

    def member_state(self, i: int):
        """Member i's state, placed as its run alone places it."""
        one = jax.tree.map(lambda x: x[i], self.state)
        return self.runs[i].with_base(jax.device_put(one, self.runs[i].state_shardings))

    def counts(self) -> list[tuple[int, int]]:
        """(updates applied, updates skipped) per member."""
        applied, skipped = jax.device_get((self.state.policy.step, self.state.policy.skipped))
        return [(int(a), int(s)) for a, s in zip(applied, skipped, strict=True)]


def iterate(g: GroupPrograms, iteration: int) -> list[dict]:
    """One iteration of every member (generate, score, train as programs over the members; rewards per
    member); each member's row of metrics, as `runner.iterate` gives it (its time/ entries are the
    group's)."""
    runs = g.runs
    t0 = time.perf_counter()
    prompts = [runner.prompt_batch(r.ctx, iteration) for r in runs]
    ids, mask = jax.device_put(
        (np.stack([p.ids_BP for p in prompts]), np.stack([p.mask_BP for p in prompts])), g.batch
    )
    keys = g.keys(np.stack([runner.rollout_seed(r.ctx, iteration) for r in runs]))
    graphdef, params = runs[0].ctx.graphdef, g.state.policy.params
    mixture = None if g.mixture_coef is None else (g.ref, g.mixture_coef)
    rollout, tokens, host_mask = runner.sample_rollout(
        g.generate, graphdef, params, ids, mask, keys, g.temperature, mixture
    )
    gens = [runner.generation(r.ctx, prompts[i], None, tokens[i], host_mask[i]) for i, r in enumerate(runs)]
    t1 = time.perf_counter()

    components = [
        runner.reward_components(r.ctx, gen, r.multipliers) for r, gen in zip(runs, gens, strict=True)
    ]
    hparams = [algorithms.hparams(r.cfg, r.kl_coef) for r in runs]
    rl_hp, adv_hp = jax.tree.map(lambda *xs: np.stack(xs), *hparams)
    stats_params = {"policy": params, "ref": g.ref}
    if g.state.value is not None:
        stats_params["value"] = g.state.value.params
    stats = g.rollout_stats(stats_params, {k: rollout[k] for k in ROLLOUT_KEYS}, rl_hp)
    scores = jax.device_put(np.stack([c["score"] for c in components]), g.batch)
    adv, rollout_metrics = g.advantages(rollout, stats, scores, adv_hp)
    data = g.prepare(rollout, stats, scores, adv)
    hp = rl_hp if g.update_hp is None else g.update_hp
    jax.block_until_ready(data)
    t2 = time.perf_counter()

    collected = []
    for epoch in range(runs[0].cfg.rl.epochs):
        orders = [runner.minibatches(r.ctx, iteration, epoch) for r in runs]
        for parts in zip(*orders, strict=True):
            minibatch = g.gather(data, np.stack(parts))
            g.state, metrics = g.train_step(g.state, minibatch, hp, g.lr, g.value_lr)
            collected.append(metrics)
    jax.block_until_ready(g.state)
    t3 = time.perf_counter()

    host_steps, host_rollout = jax.device_get((collected, rollout_metrics))
    rows = []
    for i, r in enumerate(runs):
        step_metrics = [{k: v[i] for k, v in row.items()} for row in host_steps]
        member_rollout = {k: v[i] for k, v in host_rollout.items()}
        row = runner.iteration_row(
            r.ctx, iteration, gens[i], components[i], step_metrics, member_rollout, r.kl_coef, r.multipliers
        )
        rows.append(row | runner.timings(t0, t1, t2, t3))
    return rows


def train_together(
    runs: list[runner.OnlineRun], states: list, stop_after: int | None, how: str = "vmap"
) -> list[dict]:
    """The loop of runs that start at the same iteration and share shapes, iterated as one program; each
    run's summary (status "failed" for a run that failed: the others go on)."""
    g = GroupPrograms(runs, states, how)
    end = runs[0].end(stop_after)
    active = list(range(len(runs)))
    for it in range(runs[0].start, end):
        rows = iterate(g, it)
        counts = g.counts()
        for i in list(active):
            ok = runs[i].after_iteration(it, end, rows[i], *counts[i], lambda i=i: g.member_state(i))
            if not ok:
                active.remove(i)  # its state goes on in the stack, unread: the others are not affected
        if not active:
            break
    return [r.finish(g.member_state(i), stop_after, end) for i, r in enumerate(runs)]


def signature(run: runner.OnlineRun) -> tuple:
    """What members of one program must agree on: the iteration they start at and their states' shapes."""
    shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), run.abstract_state)
    return run.start, str(jax.tree.structure(run.abstract_state)), tuple(jax.tree.leaves(shapes))


def train_runs(
    cfgs: list[Config], workdirs: list, log, stop_after: int | None, budget: int, how: str = "vmap"
) -> list:
    """Trains online runs of one group key whose workdirs the caller holds: per run, its summary or the
    RunFailed it ended with. Runs at different iterations (resumed from different checkpoints) or with
    differently shaped states (a value model from reward models of other sizes) iterate in separate
    groups, and a group whose programs would need more than `budget` bytes is split."""
    opened = []
    for cfg, wd in zip(cfgs, workdirs, strict=True):
        opened.append(
            runner.open_run(cfg, wd, lambda wd=wd, cfg=cfg: workdir_lib.commit_config(wd, cfg), log)
        )
    parts: dict[tuple, list[int]] = {}
    for i, (run, _) in enumerate(opened):
        parts.setdefault(signature(run), []).append(i)
    results: list = [None] * len(cfgs)
    for indices in parts.values():
        runs, states = [opened[i][0] for i in indices], [opened[i][1] for i in indices]
        for i in indices:
            opened[i] = (opened[i][0], None)  # the group's stack holds the states now
        parts_to_run = fitting(runs, states, budget, log, how)
        del states  # each part's list holds its states until its group stacks them
        for part_runs, part_states in parts_to_run:
            if len(part_runs) == 1:
                summaries = [runner.train_alone(part_runs[0], part_states[0], stop_after)]
            else:
                summaries = train_together(part_runs, part_states, stop_after, how)
            for run, summary in zip(part_runs, summaries, strict=True):
                failed = summary.get("status") == "failed"
                results[indices[runs.index(run)]] = (
                    workdir_lib.RunFailed(run.workdir, summary) if failed else summary
                )
    return results
