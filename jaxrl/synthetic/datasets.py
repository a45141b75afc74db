"""Synthetic datasets as canonical records: preference pairs, prompt sets, SFT demonstrations, gold pairs.

Every generator is deterministic given its seed. Each draws from its own random stream, seeded by
(crc32(stream name), seed), so generators never share random numbers. The preference kinds that mix all
domains (clean, noisy, length_biased) share one content stream: with the same seed they hold the same
prompts and candidates and differ only in their labels, which isolates label quality in a study.

Stated noise. A preference pair's two candidates never have equal gold rewards (|difference| <=
GOLD_TIE_TOLERANCE): a tied candidate is redrawn, and the redraws are counted in the dataset's `stats`.
A tie has no right label, so a "clean" pair labelled by a coin flip on a tie would be noise that no
labeller states. What noise a kind has is then exactly its labeller's (labels.py): a Bradley-Terry label
at a temperature on the gold difference, plus a length bias per word, then flipped with a probability.
`dataset_stats` measures it against gold (flip rate, tie rate, length bias) and `expected_flip_rate`
computes the flip rate the labeller's parameters imply for the same pairs. On-policy pairs (two samples
of a policy for one prompt, `make_on_policy_dataset`) skip identical and gold-tied samples by default,
counted in `stats`.

Training generators (preference pairs, prompt sets, SFT) draw train-split prompt texts; evaluation
generators (validation or test prompts, gold pairs) draw held-out texts, so the two never share a prompt
text for any seeds (see `world` for how the splits are made).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from jaxrl.data.records import Conversation, PreferencePair, PromptRecord, RatedCompletions, messages
from jaxrl.synthetic.gold import gold_reward
from jaxrl.synthetic.labels import label_pair, preference_probability, rank_list
from jaxrl.synthetic.responses import sample_response
from jaxrl.synthetic.world import (
    DOMAINS,
    HELD_OUT_SPLITS,
    canonical_split,
    make_prompt_record,
    prompt_pool,
    sample_prompt,
)

UNIFORM = {domain: 1.0 for domain in DOMAINS}
# kind -> (domain mix, labeller): temperature on the gold-reward difference, flip noise, length bias per word.
PREFERENCE_KINDS: dict[str, tuple[Mapping[str, float], Mapping[str, float]]] = {
    "clean": (UNIFORM, {"temperature": 0.02, "flip": 0.0, "length_bias": 0.0}),
    "noisy": (UNIFORM, {"temperature": 0.1, "flip": 0.3, "length_bias": 0.0}),
    "math_only": ({"math": 1.0}, {"temperature": 0.02, "flip": 0.0, "length_bias": 0.0}),
    "length_biased": (UNIFORM, {"temperature": 0.2, "flip": 0.0, "length_bias": 0.5}),
}
PROMPT_SET_MIXES: dict[str, Mapping[str, float]] = {
    "in_domain": UNIFORM,
    "math_heavy": {"math": 0.7, "instruct": 0.1, "safety": 0.1, "chat": 0.1},
    "mixed": {"math": 0.15, "instruct": 0.4, "safety": 0.15, "chat": 0.3},
}
DATASETS = tuple(PREFERENCE_KINDS)
PROMPT_SETS = tuple(PROMPT_SET_MIXES)
MAX_RESAMPLES = 50
GOLD_TIE_TOLERANCE = 1e-9  # gold rewards this close are a tie (chat sums words in any order)


class LabelledPairs(list):
    """A list of PreferencePair with `stats`: how it was made (redraws, skips) and `dataset_stats` of it."""

    def __init__(self, pairs=(), stats: Mapping[str, float] | None = None):
        super().__init__(pairs)
        self.stats = dict(stats or {})


def _rng(stream: str, seed: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng([zlib.crc32(stream.encode()), seed])


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


def domain_counts(mix: Mapping[str, float], n: int) -> dict[str, int]:
    """Exact per-domain counts summing to n, proportional to mix (largest remainder)."""
    total = sum(mix.values())
    quotas = {d: n * w / total for d, w in mix.items()}
    counts = {d: int(q) for d, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda d: (counts[d] - quotas[d], DOMAINS.index(d)))
    for d in by_remainder[: n - sum(counts.values())]:
        counts[d] += 1
    return counts


def _domain_sequence(mix: Mapping[str, float], n: int, rng: np.random.Generator) -> list[str]:
    """A shuffled list of domains with exactly the mix's proportions (up to rounding)."""
    domains = [d for d, count in domain_counts(mix, n).items() for _ in range(count)]
    return [domains[i] for i in rng.permutation(n)]


def _words(text: str) -> int:
    return len(text.split())


def _assistant(text: str):
    return messages(("assistant", text))


def is_tie(r_a: float, r_b: float) -> bool:
    """Whether two gold rewards are equal (within GOLD_TIE_TOLERANCE)."""
    return abs(r_a - r_b) <= GOLD_TIE_TOLERANCE


def _distinct_candidates(
    record: PromptRecord, rng: np.random.Generator, distinct_rewards: bool = False, counts: dict | None = None
):
    """Two responses of independent uniform quality with distinct texts (and rewards), or None.

    Candidate b is redrawn (same quality) while it repeats a's text or, with distinct_rewards, ties a's gold;
    counts["identical_redrawn"] and counts["ties_redrawn"] count the redraws."""
    counts = {} if counts is None else counts
    quality_a, quality_b = rng.random(2)
    a = sample_response(record, rng, quality_a)
    for _ in range(MAX_RESAMPLES):
        b = sample_response(record, rng, quality_b)
        if b == a:
            counts["identical_redrawn"] = counts.get("identical_redrawn", 0) + 1
        elif distinct_rewards and is_tie(gold_reward(record, a), gold_reward(record, b)):
            counts["ties_redrawn"] = counts.get("ties_redrawn", 0) + 1
        else:
            return a, b
    return None


def _candidate_pair(
    domain: str,
    rng: np.random.Generator,
    split: str,
    distinct_rewards: bool = False,
    counts: dict | None = None,
):
    """A prompt and two distinct candidates; a prompt whose candidates keep colliding is redrawn (counted)."""
    counts = {} if counts is None else counts
    while True:
        record = sample_prompt(domain, rng, split)
        candidates = _distinct_candidates(record, rng, distinct_rewards, counts)
        if candidates is not None:
            return record, *candidates
        counts["prompts_redrawn"] = counts.get("prompts_redrawn", 0) + 1


def _labelled_pair(
    record: PromptRecord,
    a: str,
    b: str,
    rng: np.random.Generator,
    labeller: Mapping[str, float],
    source: str,
    id: str,
) -> PreferencePair:
    r_a, r_b = gold_reward(record, a), gold_reward(record, b)
    a_wins = label_pair(rng, r_a, r_b, _words(a), _words(b), **labeller)
    (chosen, r_chosen), (rejected, r_rejected) = ((a, r_a), (b, r_b)) if a_wins else ((b, r_b), (a, r_a))
    return PreferencePair(
        prompt=record.prompt,
        chosen=_assistant(chosen),
        rejected=_assistant(rejected),
        margin=r_chosen - r_rejected,
        source=source,
        id=id,
    )


def make_preference_dataset(kind: str, n: int, seed: int, **labeller_overrides: float) -> LabelledPairs:
    """n labelled pairs of a kind in DATASETS; margin = gold(chosen) - gold(rejected), < 0 if mislabelled.

    The two candidates of a pair never tie on gold (a tied candidate is redrawn); `.stats` holds the redraw
    counts, the measured `dataset_stats` and the labeller's `expected_flip_rate`."""
    _check(kind, DATASETS, "preference dataset kind")
    mix, labeller = PREFERENCE_KINDS[kind]
    labeller = _labeller(labeller, labeller_overrides)
    content = _rng("preference/content" if mix == UNIFORM else f"preference/content/{kind}", seed)
    labels = _rng(f"preference/labels/{kind}", seed)
    pairs, counts = [], {"ties_redrawn": 0, "identical_redrawn": 0, "prompts_redrawn": 0}
    for i, domain in enumerate(_domain_sequence(mix, n, content)):
        record, a, b = _candidate_pair(domain, content, "train", distinct_rewards=True, counts=counts)
        pairs.append(
            _labelled_pair(record, a, b, labels, labeller, f"synthetic/{kind}/{domain}", f"{kind}/{seed}/{i}")
        )
    stats = counts | dataset_stats(pairs) | {"expected_flip_rate": expected_flip_rate(pairs, labeller)}
    return LabelledPairs(pairs, stats)


def _text_words(turns) -> int:
    return _words(turns[-1].content)


def dataset_stats(pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """A preference dataset's noise measured against gold, from each pair's margin (gold(chosen) -
    gold(rejected)) and word counts:

    - flip_rate: the fraction of pairs whose chosen response is gold-worse (margin < 0);
    - tie_rate: the fraction of pairs whose responses tie on gold (|margin| <= GOLD_TIE_TOLERANCE);
    - chosen_longer / better_longer: among the non-tied pairs, the fraction whose chosen / gold-better
      response has more words than the other one; length_bias = chosen_longer - better_longer (> 0: the
      labels favour length beyond what gold does).
    """
    n = len(pairs)
    margins = np.array([p.margin for p in pairs], dtype=np.float64)
    chosen_len = np.array([_text_words(p.chosen) for p in pairs])
    rejected_len = np.array([_text_words(p.rejected) for p in pairs])
    tied = np.abs(margins) <= GOLD_TIE_TOLERANCE
    flipped = (margins < 0) & ~tied
    decided = ~tied
    chosen_longer = chosen_len[decided] > rejected_len[decided]
    better_len = np.where(flipped, rejected_len, chosen_len)[decided]
    worse_len = np.where(flipped, chosen_len, rejected_len)[decided]
    better_longer = better_len > worse_len
    mean = lambda x: float(np.mean(x)) if len(x) else 0.0
    return {
        "pairs": n,
        "flip_rate": mean(flipped),
        "tie_rate": mean(tied),
        "chosen_longer": mean(chosen_longer),
        "better_longer": mean(better_longer),
        "length_bias": mean(chosen_longer) - mean(better_longer),
    }


def expected_flip_rate(pairs: Sequence[PreferencePair], labeller: Mapping[str, float]) -> float:
    """The flip rate a labeller (temperature, flip, length_bias) implies for these pairs' gold margins and
    lengths: per non-tied pair, flip + (1 - 2 flip) * P(the gold-worse response wins the Bradley-Terry
    draw); ties count as not flipped, as in dataset_stats."""
    if not pairs:
        return 0.0
    margins = np.array([p.margin for p in pairs], dtype=np.float64)
    chosen_len = np.array([_text_words(p.chosen) for p in pairs])
    rejected_len = np.array([_text_words(p.rejected) for p in pairs])
    flipped = margins < 0
    better_len = np.where(flipped, rejected_len, chosen_len)
    worse_len = np.where(flipped, chosen_len, rejected_len)
    p_better = preference_probability(
        np.abs(margins),
        0.0,
        better_len,
        worse_len,
        labeller.get("temperature", 0.0),
        labeller.get("length_bias", 0.0),
    )
    flip = labeller.get("flip", 0.0)
    rate = flip + (1 - 2 * flip) * (1 - p_better)
    return float(np.mean(np.where(np.abs(margins) <= GOLD_TIE_TOLERANCE, 0.0, rate)))


def _labeller(defaults: Mapping[str, float], overrides: Mapping[str, float]) -> dict[str, float]:
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown labeller options {sorted(unknown)}; expected some of {sorted(defaults)}")
    return {**defaults, **overrides}


def make_on_policy_dataset(
    prompts: Sequence[PromptRecord],
    candidates_a: Sequence[str],
    candidates_b: Sequence[str],
    seed: int,
    *,
    keep_ties: bool = False,
    **labeller_kwargs: float,
) -> LabelledPairs:
    """Labels externally generated response pairs (clean labeller by default).

    Identical pairs are skipped, and so are pairs whose responses tie on gold unless keep_ties (a tie has no
    right label). `.stats` counts both ("identical_skipped", "ties_skipped") beside the kept pairs'
    dataset_stats and the labeller's expected_flip_rate."""
    if not len(prompts) == len(candidates_a) == len(candidates_b):
        raise ValueError(
            f"need one pair per prompt, got {len(prompts)}, {len(candidates_a)}, {len(candidates_b)}"
        )
    labeller = _labeller(PREFERENCE_KINDS["clean"][1], labeller_kwargs)
    rng = _rng("preference/on_policy", seed)
    pairs, counts = [], {"identical_skipped": 0, "ties_skipped": 0}
    # The id keeps the input index, so a skipped pair leaves a visible gap.
    for i, (record, a, b) in enumerate(zip(prompts, candidates_a, candidates_b, strict=True)):
        if a == b:
            counts["identical_skipped"] += 1
        elif not keep_ties and is_tie(gold_reward(record, a), gold_reward(record, b)):
            counts["ties_skipped"] += 1
        else:
            pairs.append(
                _labelled_pair(
                    record,
                    a,
                    b,
                    rng,
                    labeller,
                    f"synthetic/on_policy/{record.source}",
                    f"on_policy/{seed}/{i}",
                )
            )
    stats = counts | dataset_stats(pairs) | {"expected_flip_rate": expected_flip_rate(pairs, labeller)}
    return LabelledPairs(pairs, stats)


def make_prompt_set(kind: str, n: int, seed: int) -> list[PromptRecord]:
    """n train-split policy-training prompts with the domain mix of a kind in PROMPT_SETS."""
    _check(kind, PROMPT_SETS, "prompt set kind")
    rng = _rng(f"prompts/{kind}", seed)
    return [
        _with_id(sample_prompt(domain, rng), f"{kind}/{seed}/{i}")
        for i, domain in enumerate(_domain_sequence(PROMPT_SET_MIXES[kind], n, rng))
    ]


def _with_id(record: PromptRecord, id: str) -> PromptRecord:
    return PromptRecord(prompt=record.prompt, ground_truth=record.ground_truth, source=record.source, id=id)


def _held_out(split: str) -> str:
    split = canonical_split(split)
    _check(split, HELD_OUT_SPLITS, "held-out split")
    return split


def make_eval_prompts(n_per_domain: int, seed: int, split: str = "test") -> list[PromptRecord]:
    """Held-out prompts of a split ("validation" or "test"; "eval" = test), n per domain, distinct while the
    domain's pool of that split lasts."""
    split = _held_out(split)
    rng = _rng("eval/prompts" if split == "test" else f"{split}/prompts", seed)
    records = []
    for domain in DOMAINS:
        pool, cumulative = prompt_pool(domain, split)
        p = np.diff(cumulative, prepend=0.0)
        distinct = min(n_per_domain, len(pool))
        indices = [
            *rng.choice(len(pool), size=distinct, replace=False, p=p / p.sum()),
            *rng.choice(len(pool), size=n_per_domain - distinct, replace=True, p=p / p.sum()),
        ]
        records += [
            make_prompt_record(domain, *pool[j], id=f"{split}/{seed}/{domain}/{i}")
            for i, j in enumerate(indices)
        ]
    return records


def make_sft_dataset(n: int, seed: int, quality: float = 0.6, split: str = "train") -> list[Conversation]:
    """n imperfect demonstrations (prompts of a split, train by default; responses of the given quality),
    domains balanced. A held-out split gives demonstrations for a held-out NLL on unseen prompt texts."""
    split = canonical_split(split)
    rng = _rng("sft" if split == "train" else f"sft/{split}", seed)
    conversations = []
    for i, domain in enumerate(_domain_sequence(UNIFORM, n, rng)):
        record = sample_prompt(domain, rng, split)
        response = sample_response(record, rng, quality)
        conversations.append(
            Conversation(
                messages=record.prompt + _assistant(response),
                source=f"synthetic/sft/{domain}",
                id=f"sft/{seed}/{i}",
            )
        )
    return conversations


def make_gold_pairs(n: int, seed: int, split: str = "test") -> list[PreferencePair]:
    """n held-out pairs (of a split: "validation" or "test") labelled exactly by the gold reward; ties are
    never drawn."""
    split = _held_out(split)
    rng = _rng("eval/gold_pairs" if split == "test" else f"{split}/gold_pairs", seed)
    pairs = []
    for i, domain in enumerate(_domain_sequence(UNIFORM, n, rng)):
        record, a, b = _candidate_pair(domain, rng, split, distinct_rewards=True)
        r_a, r_b = gold_reward(record, a), gold_reward(record, b)
        (chosen, r_chosen), (rejected, r_rejected) = sorted([(a, r_a), (b, r_b)], key=lambda c: -c[1])
        pairs.append(
            PreferencePair(
                prompt=record.prompt,
                chosen=_assistant(chosen),
                rejected=_assistant(rejected),
                margin=r_chosen - r_rejected,
                source=f"synthetic/gold/{domain}",
                id=f"gold/{seed}/{i}",
            )
        )
    return pairs


def _candidate_list(domain: str, rng: np.random.Generator, split: str, k: int, counts: dict):
    """A prompt and k responses of independent uniform quality with distinct texts (a repeated text is
    redrawn; a prompt with fewer than k distinct responses is redrawn; both counted). Gold rewards may tie
    (some domains have few reward levels): a list's ties are measured, not hidden."""
    for _ in range(MAX_RESAMPLES):
        record = sample_prompt(domain, rng, split)
        responses = []
        for quality in rng.random(k):
            for _ in range(MAX_RESAMPLES):
                text = sample_response(record, rng, quality)
                if text not in responses:
                    responses.append(text)
                    break
                counts["identical_redrawn"] += 1
        if len(responses) == k:
            return record, responses, [gold_reward(record, r) for r in responses]
        counts["prompts_redrawn"] += 1
    raise ValueError(f"no {domain} prompt of the {split} split has {k} distinct responses: use a smaller k")


def _scores_from_positions(positions: np.ndarray) -> tuple[float, ...]:
    # (k - 1 - position) / (k - 1): the best 1, the worst 0 (listwise.scores_from_ranks' scale).
    k = len(positions)
    return tuple(float(k - 1 - p) / (k - 1) for p in positions)


def make_ranked_dataset(kind: str, n: int, seed: int, k: int, **labeller_overrides: float) -> list:
    """n prompts with k responses each, ranked by a kind's labeller (labels.rank_list: its Bradley-Terry
    labeller generalised to a Plackett-Luce ranking, so k = 2 labels like make_preference_dataset's), as
    RatedCompletions whose ratings are the rank scores (k - 1 - position) / (k - 1). Returned as a list with
    `.stats`: redraw counts, the gold tie rate over every pair of every list, and the flip rate against gold
    over the pairs that do not tie."""
    _check(kind, DATASETS, "preference dataset kind")
    if k < 2:
        raise ValueError(f"a ranked list needs k >= 2 responses, got {k}")
    mix, labeller = PREFERENCE_KINDS[kind]
    labeller = _labeller(labeller, labeller_overrides)
    content = _rng(f"ranked/content/{kind if mix != UNIFORM else 'uniform'}", seed)
    labels = _rng(f"ranked/labels/{kind}", seed)
    lists, counts = LabelledPairs(), {"identical_redrawn": 0, "prompts_redrawn": 0}
    flips = pairs = ties = 0
    for i, domain in enumerate(_domain_sequence(mix, n, content)):
        record, responses, rewards = _candidate_list(domain, content, "train", k, counts)
        positions = rank_list(labels, rewards, [_words(r) for r in responses], **labeller)
        for a in range(k):
            for b in range(a + 1, k):
                if is_tie(rewards[a], rewards[b]):
                    ties += 1
                    continue
                pairs += 1
                flips += (positions[a] < positions[b]) != (rewards[a] > rewards[b])
        lists.append(
            RatedCompletions(
                record.prompt,
                tuple(_assistant(r) for r in responses),
                _scores_from_positions(positions),
                source=f"synthetic/{kind}/{domain}",
                id=f"{kind}/{seed}/{i}",
            )
        )
    lists.stats = counts | {
        "pair_flip_rate": float(flips / max(pairs, 1)),
        "pair_tie_rate": ties / max(ties + pairs, 1),
    }
    return lists


def make_gold_lists(n: int, seed: int, k: int, split: str = "test") -> list:
    """n held-out prompts (of a split) with k responses each, ranked exactly by the gold reward."""
    split = _held_out(split)
    rng = _rng(f"{split}/gold_lists", seed)
    counts = {"identical_redrawn": 0, "prompts_redrawn": 0}
    lists = []
    for i, domain in enumerate(_domain_sequence(UNIFORM, n, rng)):
        record, responses, rewards = _candidate_list(domain, rng, split, k, counts)
        positions = np.argsort(np.argsort(-np.asarray(rewards), kind="stable"), kind="stable")
        lists.append(
            RatedCompletions(
                record.prompt,
                tuple(_assistant(r) for r in responses),
                _scores_from_positions(positions),
                source=f"synthetic/gold/{domain}",
                id=f"gold_list/{seed}/{i}",
            )
        )
    return lists
