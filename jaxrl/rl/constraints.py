"""Constrained RLHF with Lagrange multipliers (Moskovitz et al. 2023, "Confronting Reward Model
Overoptimization with Constrained RLHF", section 4): host-side and pure, one update per rollout batch.

The problem, with r_0 the objective reward (rl.reward_model / rl.verifiable with its ensemble, transform and
shaping: the reward's "score") and r_i the constraint rewards of rl.constraints (`rewards.parse_constraints`):

    max_π E[r_0]   subject to   E[r_i] >= θ_i,  i = 1..m

Its Lagrangian relaxation L(π, λ) = E[r_0] + Σ_i λ_i (E[r_i] − θ_i), λ_i >= 0, is solved by alternating
  primal  the policy update of iteration t (PPO, GRPO, ...) on the reward r = r_0 + Σ_i λ_i^t r_i per
          sequence (the θ_i term does not depend on π)
  dual    projected gradient descent on L in λ with the same rollout's means:
          λ_i^{t+1} = max(0, λ_i^t + η (θ_i − mean_b r_i(b))),  η = rl.lambda_lr
so a multiplier grows while its constraint is violated and decays to 0 once it holds with slack.

Departures from the paper's code (tedmoskovitz/ConstrainedRL4LMs): it mixes per-reward advantages from one
value head per reward, A_0 + λ·A_i; here the rewards are mixed before the run's estimator (one value model for
PPO, group statistics for GRPO), which is the same update for estimators linear in the reward, and works for
every algorithm of the table. Its multipliers follow SGD with momentum per minibatch, here plain projected
ascent per rollout batch; its sigmoid-bounded (ξ-PPO) and Nelder-Mead threshold search (NM-PPO) variants are
not implemented. The multipliers live in the run's checkpoint metadata, so a resumed run is exact.

Logged per constraint: constraint/<name>/value (the rollout's mean r_i), /lambda (the λ_i that shaped this
iteration's reward), /violation (max(0, θ_i − value)); a sweep's table shows them under train/.
"""

from __future__ import annotations

import numpy as np

from jaxrl import rewards
from jaxrl.config import Config


def specs(cfg: Config) -> list[rewards.ConstraintSpec]:
    """The run's constraints (rl.constraints), in order."""
    return rewards.parse_constraints(cfg.rl.constraints)


def initial_multipliers(cfg: Config) -> dict[str, float]:
    """λ_i at the start of a run: each constraint's lambda_init (0 unless given)."""
    return {spec.name: spec.lambda_init for spec in specs(cfg)}


def lagrangian_components(components: dict, multipliers: dict[str, float]) -> dict:
    """Reward components with "score" [B] replaced by the Lagrangian reward r_0 + Σ_i λ_i r_i (float32) and
    the objective's own score kept as "objective"; unchanged without constraints."""
    if not multipliers:
        return components
    score_B = np.asarray(components["score"], np.float64)
    for name, lam in multipliers.items():
        score_B = score_B + lam * np.asarray(components[f"constraint/{name}"], np.float64)
    return components | {"objective": components["score"], "score": score_B.astype(np.float32)}


def rollout_values(components: dict, multipliers: dict[str, float], rows: slice = slice(None)) -> dict:
    """Each constraint's mean reward over the rollout rows the policy sampled."""
    return {name: float(np.mean(components[f"constraint/{name}"][rows])) for name in multipliers}


def update_multipliers(
    multipliers: dict[str, float], values: dict[str, float], thresholds: dict[str, float], lr: float
) -> dict[str, float]:
    """One projected gradient step of the dual: λ_i ← max(0, λ_i + lr·(θ_i − value_i))."""
    return {name: max(0.0, lam + lr * (thresholds[name] - values[name])) for name, lam in multipliers.items()}


def metrics(multipliers: dict[str, float], values: dict[str, float], thresholds: dict[str, float]) -> dict:
    """constraint/<name>/{value, lambda, violation} of an iteration (the multipliers it was trained with)."""
    out = {}
    for name, lam in multipliers.items():
        out[f"constraint/{name}/value"] = values[name]
        out[f"constraint/{name}/lambda"] = lam
        out[f"constraint/{name}/violation"] = max(0.0, thresholds[name] - values[name])
    return out


def thresholds(cfg: Config) -> dict[str, float]:
    """θ_i by constraint name."""
    return {spec.name: spec.threshold for spec in specs(cfg)}
