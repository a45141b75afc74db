"""Bradley-Terry preference labels from gold rewards, with temperature, flip noise and a length bias."""

from __future__ import annotations

import numpy as np


def preference_logit(r_a, r_b, len_a, len_b, temperature: float, length_bias: float) -> np.ndarray:
    """(r_a - r_b) / temperature + length_bias * (len_a - len_b); temperature 0 gives +-inf (0 on ties)."""
    diff = np.asarray(r_a, dtype=np.float64) - np.asarray(r_b, dtype=np.float64)
    if temperature > 0:
        logit = diff / temperature
    else:
        logit = np.where(diff == 0, 0.0, np.copysign(np.inf, diff))
    return logit + length_bias * (np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64))


def preference_probability(
    r_a, r_b, len_a, len_b, temperature: float, length_bias: float = 0.0
) -> np.ndarray:
    """P(a preferred over b) before flip noise: sigmoid of preference_logit."""
    # 0.5 * (1 + tanh(z / 2)) is the sigmoid without overflow for large |z| (and exact at +-inf).
    return 0.5 * (1.0 + np.tanh(0.5 * preference_logit(r_a, r_b, len_a, len_b, temperature, length_bias)))


def label_pairs(
    rng: np.random.Generator,
    r_a,
    r_b,
    len_a,
    len_b,
    temperature: float = 0.05,
    flip: float = 0.0,
    length_bias: float = 0.0,
) -> np.ndarray:
    """Bradley-Terry labels of N pairs, each then flipped with probability flip: bool[N], True = a wins."""
    if temperature < 0 or not 0.0 <= flip <= 1.0:
        raise ValueError(f"need temperature >= 0 and flip in [0, 1], got {temperature=}, {flip=}")
    p_a = preference_probability(r_a, r_b, len_a, len_b, temperature, length_bias)
    # Both uniforms are always drawn, so the stream (and every later label) does not depend on the rewards.
    a_wins = rng.random(np.shape(p_a)) < p_a
    return a_wins ^ (rng.random(np.shape(p_a)) < flip)


def label_pair(
    rng: np.random.Generator,
    r_a: float,
    r_b: float,
    len_a: int,
    len_b: int,
    temperature: float = 0.05,
    flip: float = 0.0,
    length_bias: float = 0.0,
) -> bool:
    """One Bradley-Terry label: True when response a is preferred over b."""
    return bool(label_pairs(rng, r_a, r_b, len_a, len_b, temperature, flip, length_bias))


def rank_list(
    rng: np.random.Generator,
    rewards,
    lengths,
    temperature: float = 0.05,
    flip: float = 0.0,
    length_bias: float = 0.0,
) -> np.ndarray:
    """A Plackett-Luce ranking of K responses, reversed with probability flip: positions [K] (0 is best).

    Utilities are reward / temperature + length_bias * length; the ranking sorts utility + Gumbel noise,
    so for K = 2 it is label_pairs' Bradley-Terry label, flip included. Temperature 0 sorts by utility
    (equal rewards keep their order)."""
    if temperature < 0 or not 0.0 <= flip <= 1.0:
        raise ValueError(f"need temperature >= 0 and flip in [0, 1], got {temperature=}, {flip=}")
    rewards = np.asarray(rewards, np.float64)
    lengths = np.asarray(lengths, np.float64)
    # Both draws always happen, so the stream does not depend on the rewards (as in label_pairs).
    gumbel = rng.gumbel(size=rewards.shape)
    reverse = rng.random() < flip
    utility = (rewards / temperature + gumbel) if temperature > 0 else rewards
    order = np.argsort(-(utility + length_bias * lengths), kind="stable")
    if reverse:
        order = order[::-1]
    positions = np.empty(len(order), np.int64)
    positions[order] = np.arange(len(order))
    return positions
