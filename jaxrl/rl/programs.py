"""The programs of an online-RL run, as one list: the runner's loop calls these very objects and `jaxrl
preflight` lowers them on abstract arguments, so the two cannot drift apart.

`programs(cfg, mesh, roles)` builds each jitted program once per run with the rule-table shardings, the
abstract arguments it is called with (`jax.ShapeDtypeStruct`s placed as the loop places its arrays: batches
over the batch axes, hyperparameters and keys replicated) and the names of the resident arrays among them. In
the order of the pipeline:

  generate            the KV-cache sampler over a rollout batch, with the policy's parameters (and, for an
                      algorithm whose comparisons come from the mixture, the reference's: `rl.mixture`)
  reference_generate  greedy reference responses, for reward transforms centred on them
  reward_scores[_k]   each reward model's scores (what `rewards.RewardModel` calls)
  rollout_stats       old / reference log-probs and values of the rollout batch, one forward each
  advantages          advantages, returns and rollout metrics (`rl.advantages`)
  prepare             the algorithm's training data from the scored rollout (`Algorithm.prepare`)
  gather              one shuffled minibatch of the training data
  train_step          the minibatch update of the policy and (PPO) the value model, state donated
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl import rewards, sampling, sharding, steps
from jaxrl.config import Config, ConfigError
from jaxrl.models import lora
from jaxrl.rl import advantages, algorithms, mixture, objectives
from jaxrl.rl.losses import RLHParams
from jaxrl.rl.objectives import RLState

# The jitted sampler under `sampling.sample`'s wrapper, which only reads the active mesh into a static
# argument (passed here explicitly), so the loop and preflight hold the very object that compiles.
SAMPLE = getattr(sampling.sample, "__wrapped__", sampling.sample)
MIXTURE_SAMPLE = mixture.sample_mixture.__wrapped__


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted program of the run: `fn(*args, **static)` is what the loop calls, on arrays shaped and placed
    as `args`; `holdings` names the resident arrays among its arguments."""

    name: str
    fn: Callable
    args: tuple
    holdings: tuple[str, ...] = ()
    static: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, *args):
        return self.fn(*args, **self.static)

    def lower(self):
        """The program lowered on its abstract arguments (`.compile()` gives its memory analysis)."""
        return self.fn.lower(*self.args, **self.static)


@dataclasses.dataclass(frozen=True)
class Resident:
    """Arrays that stay on the device between programs; offloaded ones live on the host between uses."""

    name: str
    abstract: Any
    offloaded: bool = False


@dataclasses.dataclass(frozen=True)
class Roles:
    """The models of a run as its programs see them: graphdefs and abstract parameters."""

    graphdef: Any  # the policy's, which the frozen reference shares
    params: Any
    value_graphdef: Any = None
    value_params: Any = None
    rewards: tuple = ()  # (graphdef, abstract params) of each reward model


@dataclasses.dataclass(frozen=True)
class RunPrograms:
    """The run's programs by name (in the loop's order), its resident arrays and its abstract train state."""

    programs: dict[str, Program]
    residents: tuple[Resident, ...]
    abstract_state: RLState
    optimizers: dict

    def __getitem__(self, name: str) -> Program:
        return self.programs[name]


def abstract(tree):
    """ShapeDtypeStructs of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def check_divisible(cfg: Config, mesh, preset: str) -> tuple[int, int]:
    """(units, minibatch units) per rollout batch; the rollout batch and each microbatch must split over the
    mesh's batch shards."""
    r = cfg.rl
    rows = r.rollout_batch * r.samples_per_prompt
    units, mb_units = algorithms.units(cfg)
    divisor = sharding.batch_divisor(mesh, preset)
    micro = mb_units // cfg.train.grad_accum
    if rows % divisor or micro % divisor:
        raise ConfigError(
            f"the rollout batch ({rows} sequences) and each microbatch ({micro} "
            f"{algorithms.of(cfg).unit}s) must divide over the {divisor} batch shards of "
            f"mesh {dict(mesh.shape)}"
        )
    return units, mb_units


def optimizers(cfg: Config) -> dict:
    """(tx, schedule) per trainable role; the schedules count minibatch updates."""
    units, mb_units = algorithms.units(cfg)
    updates = cfg.train.steps * cfg.rl.epochs * (units // mb_units)
    out = {"policy": steps.make_optimizer(cfg.optim, updates)}
    if algorithms.of(cfg).needs_value:
        out["value"] = steps.make_optimizer(
            dataclasses.replace(cfg.optim, lr=cfg.rl.value_lr or cfg.optim.lr), updates
        )
    return out


def init_state(policy_params, value_params, *, optimizers: dict, seed: int, policy_frozen=None) -> RLState:
    """The run's first train state: fresh optimizer states for the policy and (with one) the value model; a
    LoRA policy's `policy_params` are its trainables and `policy_frozen` its base."""
    policy = steps.new_train_state(policy_params, optimizers["policy"][0], seed, frozen=policy_frozen)
    if value_params is None:
        return RLState(policy=policy)
    return RLState(policy=policy, value=steps.new_train_state(value_params, optimizers["value"][0], seed))


def update_fn(cfg: Config, graphdef, value_graphdef, optimizers: dict):
    """The pure minibatch update: the algorithm's policy objective and, with a value model, the value loss."""
    grad_accum = cfg.train.grad_accum
    objective, totals_fn = algorithms.of(cfg).objective(cfg, graphdef)
    policy_step = steps.bind_step(objective, totals_fn, optimizers["policy"], grad_accum)
    value_step = None
    if value_graphdef is not None:
        objective, totals_fn = algorithms.value_objective(cfg, value_graphdef)
        value_step = steps.bind_step(objective, totals_fn, optimizers["value"], grad_accum)
    return functools.partial(objectives.rl_step, policy_step=policy_step, value_step=value_step)


def rollout_spec(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """A rollout batch [B, P] / [B, N] as the loop holds it, prompts left-padded to data.max_prompt_len."""
    r = cfg.rl
    B, P, N = r.rollout_batch * r.samples_per_prompt, cfg.data.max_prompt_len, r.max_new_tokens
    return {
        "prompt": jax.ShapeDtypeStruct((B, P), jnp.int32),
        "prompt_mask": jax.ShapeDtypeStruct((B, P), jnp.int32),
        "response": jax.ShapeDtypeStruct((B, N), jnp.int32),
        "response_mask": jax.ShapeDtypeStruct((B, N), jnp.bool_),
        "sampler_logps": jax.ShapeDtypeStruct((B, N), jnp.float32),
    }


def _placed(tree, placement):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placement), tree)


def _residents(cfg: Config, roles: Roles, state: RLState) -> tuple[Resident, ...]:
    out = []
    for role, train_state in (("policy", state.policy), ("value", state.value)):
        if train_state is not None:
            out.append(Resident(f"{role} params", train_state.params))
            rest = train_state.replace(params=None, ref_params=None, frozen=None)
            out.append(Resident(f"{role} optimizer state", rest))
    if state.policy.frozen is not None:  # LoRA: the policy's frozen base is also the reference (adapters off)
        out.append(Resident("reference params", state.policy.frozen))
    else:
        out.append(Resident("reference params", roles.params, cfg.rl.offload_frozen))
    for k, (_, params) in enumerate(roles.rewards):
        out.append(Resident(_reward_name("reward params", k, roles), params, cfg.rl.offload_frozen))
    return tuple(out)


def _reward_name(base: str, k: int, roles: Roles, sep: str = " ") -> str:
    return base + (f"{sep}{k}" if len(roles.rewards) > 1 else "")


def _sampling_programs(cfg: Config, mesh, preset: str, roles: Roles, **ids) -> list[Program]:
    """The policy's sampler and, for transforms centred on reference responses, the reference's greedy one."""
    r, batch, replicated = cfg.rl, sharding.batch_sharding(mesh, preset), NamedSharding(mesh, PartitionSpec())
    spec = rollout_spec(cfg)
    prompt = _placed((spec["prompt"], spec["prompt_mask"]), batch)
    key = _placed(jax.eval_shape(lambda: jax.random.PRNGKey(0)), replicated)
    temperature = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    params = _placed_by_rules(roles.params, mesh, preset)
    static = dict(max_new=r.max_new_tokens, active_mesh=(mesh, preset), **ids)
    # top-k / top-p shape the draws; the log-probs reported are the trainer's (tempered, untruncated).
    truncation = dict(top_p=float(r.top_p), top_k=int(r.top_k), logps_under="tempered")
    if algorithms.of(cfg).comparison == "mixture":
        # The reference's parameters are placed as the policy's (one rule table); row b mixes by coef_B[b].
        coef = jax.ShapeDtypeStruct((spec["prompt"].shape[0],), jnp.float32, sharding=batch)
        args = (roles.graphdef, params, params, *prompt, key, temperature, coef)
        holdings = ("policy params", "reference params")
        generate = Program("generate", MIXTURE_SAMPLE, args, holdings, static | truncation)
    else:
        args = (roles.graphdef, params, *prompt, key, temperature)
        # A LoRA policy samples with its adapters applied over the frozen base (held as the reference's).
        holdings = ("policy params", "reference params") if cfg.model.lora_rank else ("policy params",)
        generate = Program("generate", SAMPLE, args, holdings, static | truncation)
    out = [generate]
    if roles.rewards and r.reward_transform in rewards.NEEDS_REFERENCE_SCORES:
        out.append(
            Program(
                "reference_generate",
                SAMPLE,
                (roles.graphdef, params, *prompt, key, temperature),
                ("reference params",),
                static | dict(top_p=1.0, top_k=0),
            )
        )
    return out


def _placed_by_rules(tree, mesh, preset: str):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        tree,
        sharding.tree_shardings(tree, preset, mesh),
    )


def _reward_programs(cfg: Config, mesh, roles: Roles) -> list[Program]:
    """Each reward model's scores of a rollout batch (what `rewards.RewardModel` calls)."""
    batch = sharding.batch_sharding(mesh, cfg.mesh.preset)
    inputs = _placed({k: rollout_spec(cfg)[k] for k in objectives.ROLLOUT_KEYS}, batch)
    out = []
    for k, (graphdef, params) in enumerate(roles.rewards):
        args = (graphdef, _placed_by_rules(params, mesh, cfg.mesh.preset), *inputs.values())
        name, holding = _reward_name("reward_scores", k, roles, "_"), _reward_name("reward params", k, roles)
        static = {"active_mesh": (mesh, cfg.mesh.preset)}  # as rewards.RewardModel calls it
        out.append(Program(name, rewards.score_responses, args, (holding,), static))
    return out


def _scoring_programs(cfg: Config, mesh, roles: Roles, state: RLState) -> list[Program]:
    """Rollout statistics, advantages and the algorithm's training data of a scored rollout batch."""
    r, preset, algorithm = cfg.rl, cfg.mesh.preset, algorithms.of(cfg)
    batch, replicated = sharding.batch_sharding(mesh, preset), NamedSharding(mesh, PartitionSpec())
    rollout = _placed(rollout_spec(cfg), batch)
    inputs = {k: rollout[k] for k in objectives.ROLLOUT_KEYS}
    stats_params = {"policy": steps.model_params(state.policy), "ref": roles.params}
    holdings = ("policy params", "reference params")
    if state.value is not None:
        stats_params["value"] = state.value.params
        holdings += ("value params",)
    stats_fn = functools.partial(
        objectives.rollout_stats,
        graphdef=roles.graphdef,
        value_graphdef=roles.value_graphdef,
        sequence_logps=algorithm.sequence_logps,
    )
    rl_hp = _placed(jax.eval_shape(RLHParams.create), replicated)
    stats = Program(
        "rollout_stats",
        steps.make_eval_step(stats_fn, stats_params, inputs, mesh, preset),
        (stats_params, inputs, rl_hp),
        holdings,
    )
    mixed = algorithm.comparison == "mixture"  # metrics of the policy's rows alone, no groups
    advantage_fn = functools.partial(
        objectives.mixture_advantage_step if mixed else objectives.advantage_step,
        estimator=algorithms.estimator_name(cfg),
        group_size=1 if mixed else r.samples_per_prompt,
        kl_estimator=r.kl_estimator,
    )
    stats_out = jax.eval_shape(stats.fn, *stats.args)
    scores = jax.ShapeDtypeStruct((rollout["response"].shape[0],), jnp.float32, sharding=batch)
    adv_hp = _placed(jax.eval_shape(advantages.AdvantageHParams.create), replicated)
    adv = Program("advantages", jax.jit(advantage_fn), (rollout, stats_out, scores, adv_hp))
    adv_out = jax.eval_shape(adv.fn, *adv.args)[0]
    prepare = jax.jit(algorithm.prepare, out_shardings=batch)
    return [stats, adv, Program("prepare", prepare, (rollout, stats_out, scores, adv_out))]


def _training_programs(
    cfg: Config, mesh, roles: Roles, state: RLState, run_optimizers: dict, prepare: Program, trained: tuple
) -> list[Program]:
    """The gather of a shuffled minibatch of the training data and the minibatch update (state donated)."""
    preset, algorithm = cfg.mesh.preset, algorithms.of(cfg)
    batch, replicated = sharding.batch_sharding(mesh, preset), NamedSharding(mesh, PartitionSpec())
    data = _placed(jax.eval_shape(prepare.fn, *prepare.args), batch)
    indices = jax.ShapeDtypeStruct((algorithms.units(cfg)[1],), jnp.int32, sharding=replicated)
    gather = jax.jit(objectives.gather_rows, out_shardings=batch)
    minibatch = _placed(jax.eval_shape(gather, data, indices), batch)
    hparams = algorithm.hparams or (lambda _: RLHParams.create())
    hp = _placed(jax.eval_shape(lambda: hparams(cfg)), replicated)
    update = update_fn(cfg, roles.graphdef, roles.value_graphdef, run_optimizers)
    return [
        Program("gather", gather, (data, indices)),
        Program(
            "train_step",
            steps.make_step(update, state, minibatch, mesh, preset),
            (state, minibatch, hp),
            trained,
        ),
    ]


def programs(cfg: Config, mesh, roles: Roles, *, eos_id: int, pad_id: int) -> RunPrograms:
    """Every program of an online-RL run, jitted once (shapes never change between iterations)."""
    check_divisible(cfg, mesh, cfg.mesh.preset)
    run_optimizers = optimizers(cfg)
    init = functools.partial(init_state, optimizers=run_optimizers, seed=cfg.seed)
    frozen, policy_params = lora.split(roles.params) if cfg.model.lora_rank else (None, roles.params)
    state = jax.eval_shape(
        lambda p, v, f: init(p, v, policy_frozen=f), policy_params, roles.value_params, frozen
    )
    residents = _residents(cfg, roles, state)
    trained = tuple(res.name for res in residents if res.name.startswith(("policy ", "value ")))
    listed = _sampling_programs(cfg, mesh, cfg.mesh.preset, roles, eos_id=eos_id, pad_id=pad_id)
    listed += _reward_programs(cfg, mesh, roles) + _scoring_programs(cfg, mesh, roles, state)
    listed += _training_programs(cfg, mesh, roles, state, run_optimizers, listed[-1], trained)
    return RunPrograms({p.name: p for p in listed}, residents, state, run_optimizers)
