"""Rated completions -> preference pairs (or KTO examples), with every dropped pair or record counted.

Ratings are scalars or per-aspect mappings. `aspect_reduce` turns a mapping into one number:
"mean" averages the fine-grained aspects that are present (UltraFeedback "N/A" ratings are simply absent),
leaving out the summary keys "overall" and "fine_grained"; a name ("overall", "helpfulness") takes that key;
a tuple of names averages those; a mapping {aspect: weight} is the weighted sum of those aspects (a completion
missing one of them is unrated). `ASPECT_PRESETS` names the published weightings ("tulu25": Tulu 2.5's
HelpSteer recipe, the mean of all aspects but verbosity; "helpsteer2": the HelpSteer2 / Nemotron-4-340B-Reward
weights), and `parse_aspects` reads the config's `data.aspect_weights` string. HelpSteer's default is
helpfulness alone (`FORMAT_ASPECTS`): averaging in verbosity would reward length.
Scalar ratings are used as they are. Margin = chosen rating - rejected rating.

Dropped-reason counts: "unrated_completion" (per completion with no usable rating), "too_few_rated"
(per record with < 2 rated completions), and per candidate pair "tie", "below_margin", "identical".
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence

from jaxrl.data.records import PreferencePair, RatedCompletions, UnpairedExample

SUMMARY_KEYS = frozenset({"overall", "fine_grained"})
HELPSTEER_QUALITY = ("helpfulness", "correctness", "coherence", "complexity")
ASPECT_PRESETS: dict[str, Mapping[str, float]] = {
    "helpfulness": {"helpfulness": 1.0},
    # Ivison et al. 2024 (Tulu 2.5): HelpSteer scored by the mean of every aspect except verbosity.
    "tulu25": {aspect: 1 / len(HELPSTEER_QUALITY) for aspect in HELPSTEER_QUALITY},
    # Wang et al. 2024 (HelpSteer2) / the Nemotron-4-340B-Reward card: one scalar from the five attributes.
    "helpsteer2": {
        "helpfulness": 0.3,
        "correctness": 0.74,
        "coherence": 0.46,
        "complexity": 0.47,
        "verbosity": -0.33,
    },
}
FORMAT_ASPECTS = {"helpsteer": "helpfulness"}  # a format's default when data.aspect_weights is ""
Scored = list[tuple[int, float]]  # (completion index, reduced rating), in completion order


def _usable(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def reduce_rating(
    rating: float | Mapping[str, float], aspect_reduce: str | Sequence[str] | Mapping[str, float] = "mean"
) -> float | None:
    """One number from a scalar or per-aspect rating; None when nothing usable is there."""
    if not isinstance(rating, Mapping):
        return float(rating) if _usable(rating) else None
    if isinstance(aspect_reduce, Mapping):
        weighted = {a: w for a, w in aspect_reduce.items() if w}
        if not all(_usable(rating.get(a)) for a in weighted):
            return None
        return float(sum(w * rating[a] for a, w in weighted.items()))
    if aspect_reduce == "mean":
        values = [v for k, v in rating.items() if k not in SUMMARY_KEYS and _usable(v)]
    elif isinstance(aspect_reduce, str):
        values = [rating[aspect_reduce]] if _usable(rating.get(aspect_reduce)) else []
    else:
        values = [rating[a] for a in aspect_reduce if _usable(rating.get(a))]
    return sum(values) / len(values) if values else None


def parse_aspects(spec: str, format: str = "") -> str | Mapping[str, float]:
    """An aspect setting from text: "" (the format's default, else "mean"), "mean", a preset of
    ASPECT_PRESETS, an aspect name, or weights "helpfulness=0.3,correctness=0.74"."""
    spec = spec.strip()
    if not spec:
        return parse_aspects(FORMAT_ASPECTS[format], format) if format in FORMAT_ASPECTS else "mean"
    if spec in ASPECT_PRESETS:
        return dict(ASPECT_PRESETS[spec])
    if "=" not in spec:
        return spec
    weights = {}
    for item in spec.split(","):
        name, _, weight = item.partition("=")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"aspect weight {item!r} must look like name=number (in {spec!r})") from None
        if not name.strip() or not math.isfinite(value):
            raise ValueError(f"aspect weight {item!r} must look like name=number (in {spec!r})")
        weights[name.strip()] = value
    return weights


def _check_aspects(records: Sequence[RatedCompletions], aspect_reduce) -> None:
    # A misspelt aspect would silently mark every completion unrated; fail loudly instead.
    if aspect_reduce == "mean":
        return
    wanted = {aspect_reduce} if isinstance(aspect_reduce, str) else set(aspect_reduce)
    seen = {k for r in records for rating in r.ratings if isinstance(rating, Mapping) for k in rating}
    if seen and not wanted & seen:
        raise ValueError(f"aspect_reduce={aspect_reduce!r} names no aspect in the ratings {sorted(seen)}")


def _score(record: RatedCompletions, aspect_reduce, dropped: collections.Counter) -> Scored:
    scored = []
    for index, rating in enumerate(record.ratings):
        value = reduce_rating(rating, aspect_reduce)
        if value is None:
            dropped["unrated_completion"] += 1
        else:
            scored.append((index, value))
    return scored


def _best(scored: Scored) -> tuple[int, float]:
    return max(scored, key=lambda item: item[1])  # the first of several equal bests


def _best_vs_random(scored: Scored, rng: random.Random) -> list[tuple[int, int]]:
    best, top = _best(scored)
    # Rejected is drawn from strictly lower-rated completions; only when all tie is the pair a (dropped) tie.
    lower = [i for i, value in scored if value < top] or [i for i, _ in scored if i != best]
    return [(best, rng.choice(lower))]


def _best_vs_worst(scored: Scored, rng: random.Random) -> list[tuple[int, int]]:
    best, _ = _best(scored)
    worst, _ = min((item for item in scored if item[0] != best), key=lambda item: item[1])
    return [(best, worst)]


def _all_pairs(scored: Scored, rng: random.Random) -> list[tuple[int, int]]:
    value = dict(scored)
    pairs = [(i, j) for a, (i, _) in enumerate(scored) for j, _ in scored[a + 1 :]]
    return [(i, j) if value[i] >= value[j] else (j, i) for i, j in pairs]


POLICIES: dict[str, Callable[[Scored, random.Random], list[tuple[int, int]]]] = {
    "best_vs_random": _best_vs_random,
    "best_vs_worst": _best_vs_worst,
    "all_pairs": _all_pairs,
}


def _rng(seed: int, record: RatedCompletions, index: int) -> random.Random:
    # Keyed by the record's id (or position), so one record's draw does not depend on the others.
    return random.Random(f"{seed}/{record.id or index}")


def binarize(
    rated: Iterable[RatedCompletions],
    policy: str = "best_vs_random",
    *,
    aspect_reduce: str | Sequence[str] | Mapping[str, float] = "mean",
    min_margin: float = 0.0,
    seed: int = 0,
) -> tuple[list[PreferencePair], collections.Counter]:
    """Rated completions -> (preference pairs, Counter of dropped reasons) under a named policy."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {sorted(POLICIES)}")
    records = list(rated)
    _check_aspects(records, aspect_reduce)
    pairs, dropped = [], collections.Counter()
    for index, record in enumerate(records):
        scored = _score(record, aspect_reduce, dropped)
        if len(scored) < 2:
            dropped["too_few_rated"] += 1
            continue
        value = dict(scored)
        for chosen, rejected in POLICIES[policy](scored, _rng(seed, record, index)):
            margin = value[chosen] - value[rejected]
            reason = _pair_problem(record, chosen, rejected, margin, min_margin)
            if reason:
                dropped[reason] += 1
                continue
            completions = record.completions
            pair = PreferencePair(
                record.prompt, completions[chosen], completions[rejected], margin, record.source, record.id
            )
            pairs.append(pair)
    return pairs, dropped


def _pair_problem(
    record: RatedCompletions, chosen: int, rejected: int, margin: float, min_margin: float
) -> str:
    if margin == 0:
        return "tie"
    if margin < min_margin:
        return "below_margin"
    if record.completions[chosen] == record.completions[rejected]:
        return "identical"  # same text rated twice: no preference signal
    return ""


def to_unpaired(
    rated: Iterable[RatedCompletions],
    *,
    aspect_reduce: str | Sequence[str] | Mapping[str, float] = "mean",
) -> tuple[list[UnpairedExample], collections.Counter]:
    """Rated completions -> KTO examples: the best completion desirable, the worst undesirable."""
    records = list(rated)
    _check_aspects(records, aspect_reduce)
    examples, dropped = [], collections.Counter()
    for record in records:
        scored = _score(record, aspect_reduce, dropped)
        if len(scored) < 2:
            dropped["too_few_rated"] += 1
            continue
        (best, worst), value = _best_vs_worst(scored, None)[0], dict(scored)
        reason = _pair_problem(record, best, worst, value[best] - value[worst], 0.0)
        if reason:
            dropped[reason] += 1
            continue
        for index, desirable in ((best, True), (worst, False)):
            example = UnpairedExample(
                record.prompt, record.completions[index], desirable, record.source, record.id
            )
            examples.append(example)
    return examples, dropped


def to_lists(
    rated: Iterable[RatedCompletions],
    k: int,
    *,
    aspect_reduce: str | Sequence[str] | Mapping[str, float] = "mean",
    seed: int = 0,
) -> tuple[list[tuple[RatedCompletions, Scored]], collections.Counter]:
    """Rated completions kept whole for listwise losses: (record, [(completion index, score)]) per list of at
    least two rated completions, in completion order; a list longer than k keeps a seeded draw of k of them
    (its best always among them), counted as "cut_to_k" (a count of lists, not a drop). Dropped reasons as
    binarize's: "unrated_completion" per completion, "too_few_rated" per list."""
    records = list(rated)
    _check_aspects(records, aspect_reduce)
    lists, counts = [], collections.Counter()
    for index, record in enumerate(records):
        scored = _score(record, aspect_reduce, counts)
        if len(scored) < 2:
            counts["too_few_rated"] += 1
            continue
        if len(scored) > k:
            best = _best(scored)
            others = [item for item in scored if item is not best]
            kept = {best[0]} | {i for i, _ in _rng(seed, record, index).sample(others, k - 1)}
            scored = [item for item in scored if item[0] in kept]
            counts["cut_to_k"] += 1
        lists.append((record, scored))
    return lists, counts
