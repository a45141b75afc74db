"""The online-RL algorithms as a table: one `Algorithm` entry per stage, read by the runner, its program list
and preflight, so none of them branches on an algorithm's name.

An entry declares what differs between algorithms; everything else (sampling, scoring, rollout statistics,
minibatch shuffling, checkpoints, evaluation) is shared:

  estimator     the advantage estimator (`rl.advantages`); rl.advantage overrides it where advantages train
  kl            where the KL penalty to the reference goes under rl.kl_mode=auto: a per-token "reward" term,
                a "loss" term, or "none" when the objective holds its own (DPO's beta)
  unit          what a minibatch counts: a "sequence", or a "pair" (the two samples of one prompt)
  needs_value   whether it trains a value model (PPO's GAE)
  prepare       how a scored rollout becomes training data: (rollout, stats, scores, advantages) -> data,
                pure and jittable (`objectives.sequence_data`, `objectives.pair_data`)
  objective     (cfg, graphdef) -> (objective, totals_fn) of its policy update (`steps.bind_step` binds it)
  hparams       None: the update takes the iteration's `RLHParams`; else cfg -> the run's fixed ones
  check         its config rules (ConfigError), beyond the shared ones in `check_config`
  comparison    where the second sample of a prompt comes from: "policy" (every row is a policy sample) or
                "mixture" (odd rows from the policy/reference geometric mixture, `rl.mixture`: Nash-MD)

Adding an algorithm is one entry in ALGORITHMS plus its objective: write the objective (and, when its training
data are neither sequences nor pairs, a prepare function) in `rl/objectives.py`, then add
`Algorithm(name=..., estimator=..., kl=..., objective=...)` below. GRPO is PPO's entry with another estimator
and the KL in the loss; online DPO shows a different data flow (pairs, its own loss and hyperparameters).
`jaxrl.config.STAGES` must also name it while config, a leaf, cannot read this table
(tests/test_rl_programs.py checks that the two agree).

Online IPO is not an entry: it is online DPO with the IPO loss (`loss.name=ipo`, (h − 1/(2β))² on summed
log ratios), as TRL's OnlineDPOTrainer has it (`loss_type="ipo"`, summed log-probs) and as Calandriello et al.
2024 ("Human Alignment of Large Language Models through Online Preference Optimisation") and Guo et al. 2024
(online AI feedback) treat the online DPO / IPO / SLiC family: one algorithm, a loss from the registry.
VARIANTS names such algorithm/loss pairs for studies. Nash-MD (Munos et al. 2023) is an entry: its comparison
sample comes from another distribution (the geometric mixture) and its objective is no preference loss.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxrl import losses, steps
from jaxrl.config import Config, ConfigError
from jaxrl.rl import advantages, objectives
from jaxrl.rl.losses import RLHParams

ROWS_PER_UNIT = {"sequence": 1, "pair": 2}


def surrogate_objective(cfg: Config, graphdef):
    """PPO's clipped surrogate over sequences (+ the KL term when the KL goes in the loss)."""
    r = cfg.rl
    objective = functools.partial(
        objectives.policy_objective,
        graphdef=graphdef,
        aggregation=r.aggregation,
        kl_loss_estimator=r.kl_loss_estimator if kl_placement(cfg) == "loss" else "",
        recompute_old_logps=r.recompute_old_logps,
    )
    return objective, functools.partial(objectives.sequence_totals, max_len=r.max_new_tokens)


def value_objective(cfg: Config, value_graphdef):
    """The value model's clipped loss over sequences, for algorithms with `needs_value`."""
    r = cfg.rl
    objective = functools.partial(
        objectives.value_objective,
        graphdef=value_graphdef,
        aggregation=r.aggregation,
        recompute_old_logps=r.recompute_old_logps,
    )
    return objective, functools.partial(objectives.sequence_totals, max_len=r.max_new_tokens)


def preference_objective(cfg: Config, graphdef):
    """The configured DPO-family loss (loss.name) over pairs."""
    objective = functools.partial(objectives.online_dpo_objective, graphdef=graphdef, loss_name=cfg.loss.name)
    return objective, objectives.pair_totals


def mixture_objective(cfg: Config, graphdef):
    """Nash-MD's REINFORCE preference term and KL penalty over the policy's samples."""
    objective = functools.partial(objectives.nash_md_objective, graphdef=graphdef)
    return objective, objectives.nash_md_totals


def _no_check(cfg: Config) -> None:
    pass


def _check_two_samples(cfg: Config) -> None:
    r = cfg.rl
    if r.samples_per_prompt != 2:
        raise ConfigError(f"{cfg.stage} compares two samples per prompt: set rl.samples_per_prompt=2")
    if r.minibatch % 2:
        raise ConfigError(
            f"{cfg.stage}: rl.minibatch ({r.minibatch}) counts sequences, two per pair: make it even"
        )


def _check_pairs(cfg: Config) -> None:
    """Online DPO pairs the two samples of each prompt and trains them with a paired preference loss."""
    _check_two_samples(cfg)
    if not losses.get_preference_loss(cfg.loss.name).paired:
        raise ConfigError(f"{cfg.stage} needs a paired preference loss, not {cfg.loss.name!r}")


def _check_mixture(cfg: Config) -> None:
    """Nash-MD compares a policy sample with a mixture sample per prompt; its KL penalty is a loss term."""
    _check_two_samples(cfg)
    if kl_placement(cfg) != "loss":
        raise ConfigError(
            f"{cfg.stage} puts its KL penalty in the loss (rl.kl_coef): set rl.kl_mode=auto "
            f"or loss, not {cfg.rl.kl_mode!r}"
        )


def _no_host_metrics(cfg: Config, components: dict) -> dict[str, float]:
    return {}


def _pair_metrics(cfg: Config, components: dict) -> dict[str, float]:
    """How far apart the two samples of a prompt score, and how often they tie (a tie trains nothing)."""
    pair_scores = components["score"].reshape(-1, 2)
    return {
        "objective/scores_margin": float(np.mean(np.abs(pair_scores[:, 0] - pair_scores[:, 1]))),
        "val/tie_rate": float(np.mean(pair_scores[:, 0] == pair_scores[:, 1])),
        "beta": cfg.loss.beta,
    }


def _mixture_metrics(cfg: Config, components: dict) -> dict[str, float]:
    """The scores of the policy's samples and of the mixture's (TRL's Nash-MD names), and the mixture."""
    pair_scores = components["score"].reshape(-1, 2)
    return {
        "rewards/chosen": float(np.mean(pair_scores[:, 0])),
        "rewards/rejected": float(np.mean(pair_scores[:, 1])),
        "objective/scores_margin": float(np.mean(pair_scores[:, 0] - pair_scores[:, 1])),
        "mixture_coef": cfg.rl.mixture_coef,
    }


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One online-RL algorithm: what the runner needs to know of it (see the module docstring)."""

    name: str
    estimator: str
    kl: str  # "reward" | "loss" | "none"
    objective: Callable[[Config, Any], tuple[Callable, Callable]] = surrogate_objective
    unit: str = "sequence"
    needs_value: bool = False
    prepare: Callable = objectives.sequence_data
    # False: rl.advantage does not apply, and the estimator's output only feeds the rollout metrics.
    trains_on_advantages: bool = True
    # The rollout statistics include the reference's temperature-1 summed log-probs (DPO's implicit reward).
    sequence_logps: bool = False
    hparams: Callable[[Config], Any] | None = None
    check: Callable[[Config], None] = _no_check
    host_metrics: Callable[[Config, dict], dict[str, float]] = _no_host_metrics
    comparison: str = "policy"  # "policy" | "mixture"
    # It trains with the preference loss loss.name (jaxrl.losses), which jaxrl.validate checks by name.
    preference_loss: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("ppo", estimator="gae", kl="reward", needs_value=True),
        Algorithm("grpo", estimator="grpo", kl="loss"),
        Algorithm("rloo", estimator="rloo", kl="reward"),
        Algorithm("reinforce_pp", estimator="reinforce_pp", kl="reward"),
        Algorithm(
            "online_dpo",
            estimator="gae",
            kl="none",
            objective=preference_objective,
            unit="pair",
            prepare=objectives.pair_data,
            trains_on_advantages=False,
            sequence_logps=True,
            hparams=steps.loss_hparams,
            check=_check_pairs,
            host_metrics=_pair_metrics,
            preference_loss=True,
        ),
        Algorithm(
            "nash_md",
            estimator="gae",
            kl="loss",
            objective=mixture_objective,
            unit="pair",
            prepare=objectives.nash_md_data,
            trains_on_advantages=False,
            check=_check_mixture,
            host_metrics=_mixture_metrics,
            comparison="mixture",
        ),
    )
}

# Named algorithm/loss pairs that are not entries of their own (see the module docstring): overrides a study
# can give as an arm.
VARIANTS: dict[str, dict[str, str]] = {"online_ipo": {"stage": "online_dpo", "loss.name": "ipo"}}


def of(cfg: Config) -> Algorithm:
    """The algorithm of an online-RL config (its stage)."""
    if cfg.stage not in ALGORITHMS:
        raise ConfigError(f"stage {cfg.stage!r} is not an online-RL algorithm; known: {sorted(ALGORITHMS)}")
    return ALGORITHMS[cfg.stage]


def policy_rows(cfg: Config) -> slice:
    """The rows of a rollout batch sampled from the policy (all, or the even ones when odd rows are the
    mixture's comparisons)."""
    return slice(None) if of(cfg).comparison == "policy" else slice(0, None, 2)


def estimator_name(cfg: Config) -> str:
    """The advantage estimator of the run (rl.advantage, or the algorithm's own)."""
    algorithm = of(cfg)
    if not algorithm.trains_on_advantages:
        return algorithm.estimator
    return cfg.rl.advantage or algorithm.estimator


def kl_placement(cfg: Config) -> str:
    """Where the KL penalty goes: "reward" (per token, PPO, RLOO, REINFORCE++), "loss" (GRPO) or "none"."""
    algorithm = of(cfg)
    if algorithm.kl == "none" or cfg.rl.kl_mode == "auto":
        return algorithm.kl
    return cfg.rl.kl_mode


def kl_in_loss(cfg: Config) -> bool:
    """Whether the KL penalty is a loss term (GRPO) rather than a token reward (PPO, RLOO, REINFORCE++)."""
    return kl_placement(cfg) == "loss"


def units(cfg: Config) -> tuple[int, int]:
    """(units per rollout batch, units per minibatch): sequences, or pairs of them."""
    r, per_unit = cfg.rl, ROWS_PER_UNIT[of(cfg).unit]
    return r.rollout_batch * r.samples_per_prompt // per_unit, r.minibatch // per_unit


def hparams(cfg: Config, kl_coef: float) -> tuple[RLHParams, advantages.AdvantageHParams]:
    """The iteration's loss and estimator hyperparameters as host float32 scalars (the KL coefficient may
    adapt), for `jax.device_put`; the KL coefficient goes where `kl_placement` says, 0 elsewhere."""
    r, placement = cfg.rl, kl_placement(cfg)
    rl_hp = RLHParams.host(
        temperature=r.temperature,
        clip_low=r.clip,
        clip_high=r.clip_high or r.clip,
        dual_clip=r.dual_clip,
        value_clip=r.value_clip,
        value_coef=r.value_coef,
        entropy_coef=r.entropy_coef,
        kl_coef=kl_coef if placement == "loss" else 0.0,
    )
    adv_hp = advantages.AdvantageHParams.host(
        gamma=r.gamma,
        lam=r.lam,
        kl_coef=kl_coef if placement == "reward" else 0.0,
        whiten=float(r.whiten_advantages),
        scale_rewards=float(r.scale_rewards),
    )
    return rl_hp, adv_hp


def adapted_kl_coef(cfg: Config, kl_coef: float, kl: float) -> float:
    """Ziegler et al.'s proportional controller towards rl.kl_target (TRL's AdaptiveKLController)."""
    r = cfg.rl
    if r.kl_target <= 0 or kl_placement(cfg) == "none":
        return kl_coef
    error = float(np.clip(kl / r.kl_target - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * r.rollout_batch * r.samples_per_prompt / r.kl_horizon)


def check_config(cfg: Config) -> None:
    """The algorithm's rules for the rl section (ConfigError): its own `check`, then the shared ones."""
    algorithm, r = of(cfg), cfg.rl
    algorithm.check(cfg)
    estimator = estimator_name(cfg)
    groups = algorithm.trains_on_advantages and estimator in advantages.GROUP_ESTIMATORS
    if groups and r.samples_per_prompt < 2:
        raise ConfigError(
            f"advantage estimator {estimator!r} compares samples of one prompt: "
            f"set rl.samples_per_prompt >= 2"
        )
    if algorithm.needs_value and r.value_init == "reward_model" and not r.reward_model:
        raise ConfigError(
            "rl.value_init=reward_model needs rl.reward_model; with only a verifiable reward "
            "set rl.value_init=policy"
        )
    mb_units = units(cfg)[1]
    if mb_units % cfg.train.grad_accum:
        raise ConfigError(
            f"rl.minibatch ({r.minibatch}) must split into train.grad_accum "
            f"({cfg.train.grad_accum}) equal microbatches ({algorithm.unit}s)"
        )
