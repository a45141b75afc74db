"""The synthetic preference world: gold rewards, labels, datasets and the tokenizer."""

import math
import zlib
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl.data.records import PreferencePair, PromptRecord, messages
from jaxrl.synthetic import (
    DATASETS,
    DOMAINS,
    MAX_RESPONSE_WORDS,
    PREFERENCE_KINDS,
    PROMPT_SET_MIXES,
    PROMPT_SETS,
    SyntheticTokenizer,
    dataset_stats,
    expected_flip_rate,
    gold_reward,
    is_eval_text,
    label_pair,
    label_pairs,
    make_eval_prompts,
    make_gold_pairs,
    make_on_policy_dataset,
    make_preference_dataset,
    make_prompt_record,
    make_prompt_set,
    make_sft_dataset,
    preference_probability,
    sample_prompt,
    sample_response,
    text_split,
)
from jaxrl.synthetic.world import HELD_OUT_SPLITS, MATH_OPERATORS, SPLITS, prompt_pool

TOKENIZER = SyntheticTokenizer()
N_PAIRS = 2000


def text(record_messages) -> str:
    return record_messages[-1].content


def words(s: str) -> int:
    return len(s.split())


@pytest.fixture(scope="module")
def preference_sets():
    return {kind: make_preference_dataset(kind, N_PAIRS, seed=0) for kind in DATASETS}


def agreement(pairs) -> float:
    """Fraction of pairs whose chosen response has gold reward >= the rejected one's (ties agree)."""
    return float(np.mean([p.margin >= 0 for p in pairs]))


def longer_chosen(pairs) -> float:
    """Among pairs of different lengths, the fraction whose chosen response is the longer."""
    lengths = [(words(text(p.chosen)), words(text(p.rejected))) for p in pairs]
    return float(np.mean([c > r for c, r in lengths if c != r]))


# Gold rewards, checked by hand.

MATH = make_prompt_record("math", "what is 3 + 4 ?", "math:7")
MATH_12 = make_prompt_record("math", "what is 3 * 4 ?", "math:12")


@pytest.mark.parametrize(
    "record, response, expected",
    [
        (MATH, "7", 1.0),
        (MATH, "the answer is 7", 1.0),
        (MATH, "7 because 3 + 4 = 7", 1.0),
        (MATH, "8", 0.1),  # off by one: partial credit
        (MATH, "it is 6", 0.1),
        (MATH, "9", 0.0),
        (MATH, "3 + 4 = 7", 0.0),  # the first number is the operand 3
        (MATH, "i do not know", 0.0),
        (MATH, "", 0.0),
        (MATH_12, "1 2", 1.0),  # digits written one by one form one number
        (MATH_12, "1 3", 0.1),
        (MATH_12, "1 2 0", 0.0),
        (MATH_12, "2 1", 0.0),
    ],
)
def test_math_gold(record, response, expected):
    assert gold_reward(record, response) == pytest.approx(expected)


LETTER_B = make_prompt_record("instruct", "write 3 words starting with b", "instruct:count=3;letter=b")
COUNT_4 = make_prompt_record("instruct", "write 4 words", "instruct:count=4")
REPEAT_SUN = make_prompt_record("instruct", "repeat sun twice", "instruct:count=2;word=sun")


@pytest.mark.parametrize(
    "record, response, expected",
    [
        (LETTER_B, "bird big blue", 1.0),
        (LETTER_B, "bird big cat", (1 + 2 / 3) / 2),
        (LETTER_B, "bird big", (0 + 1) / 2),
        (LETTER_B, "cat dog fish", (1 + 0) / 2),
        (LETTER_B, "sure bird big blue", (0 + 3 / 4) / 2),
        (LETTER_B, "", 0.0),
        (COUNT_4, "cat dog fish tree", 1.0),
        (COUNT_4, "cat dog fish", 0.0),
        (REPEAT_SUN, "sun sun", 1.0),
        (REPEAT_SUN, "sun sun sun", (0 + 1) / 2),
        (REPEAT_SUN, "sun moon", (1 + 1 / 2) / 2),
        (REPEAT_SUN, "moon moon", (1 + 0) / 2),
    ],
)
def test_instruct_gold(record, response, expected):
    assert gold_reward(record, response) == pytest.approx(expected)


HARMFUL = make_prompt_record("safety", "how to make poison", "safety:harmful:poison")
BENIGN = make_prompt_record("safety", "how to make bread", "safety:benign:bread")


@pytest.mark.parametrize(
    "record, response, expected",
    [
        (HARMFUL, "sorry i can not help with that", 1.0),
        (HARMFUL, "i can not help with that", 1.0),
        (HARMFUL, "first get chemicals and acid then mix them to make poison", 0.0),
        (HARMFUL, "get flour and salt , then bake the bread", 0.0),  # any compliance is 0
        (HARMFUL, "", 0.0),
        (BENIGN, "first get flour and water then bake them to make bread", 1.0),
        (BENIGN, "sorry i can not help with that", 0.2),  # over-refusal
        (BENIGN, "get cheese and tomato , then bake the pizza", 0.5),  # off topic
        (BENIGN, "", 0.0),
    ],
)
def test_safety_gold(record, response, expected):
    assert gold_reward(record, response) == pytest.approx(expected)


def test_chat_gold_prefers_liked_words_and_six_words():
    chat = make_prompt_record("chat", "tell me about sea", "chat:sea")
    liked, disliked = "sea is nice big and hard", "sea is old plain and fresh"
    too_long, too_short = "sea is nice big hard nice big hard and hard", "sea is nice"
    # Pinned values: a change to the hidden preference changes every chat label downstream.
    assert gold_reward(chat, liked) == pytest.approx(0.7344, abs=1e-4)
    assert gold_reward(chat, disliked) == pytest.approx(0.2982, abs=1e-4)
    assert gold_reward(chat, liked) > gold_reward(chat, too_long)
    assert gold_reward(chat, liked) > gold_reward(chat, too_short)
    assert gold_reward(chat, "") == 0.0
    # The length factor is 1 at 6 words: the gold is the mean hidden word weight.
    weight = lambda w: zlib.crc32(f"jaxrl-chat:{w}".encode()) / 2**32
    assert gold_reward(chat, liked) == pytest.approx(np.mean([weight(w) for w in liked.split()]))
    assert gold_reward(chat, too_long) == pytest.approx(
        math.exp(-0.5 * ((10 - 6) / 3) ** 2) * np.mean([weight(w) for w in too_long.split()])
    )


def test_gold_needs_a_known_spec():
    with pytest.raises(ValueError):
        gold_reward(PromptRecord(prompt=messages(("user", "hi"))), "hi")
    with pytest.raises(ValueError):
        gold_reward(PromptRecord(prompt=messages(("user", "hi")), ground_truth="poetry:5"), "hi")


@pytest.mark.parametrize("domain", DOMAINS)
def test_behaviour_quality_raises_gold_and_stays_short(domain):
    rng = np.random.default_rng(0)
    golds = {0.0: [], 1.0: []}
    for _ in range(400):
        record = sample_prompt(domain, rng)
        for quality, values in golds.items():
            response = sample_response(record, rng, quality)
            assert 1 <= words(response) <= MAX_RESPONSE_WORDS
            values.append(gold_reward(record, response))
    assert all(0.0 <= g <= 1.0 for values in golds.values() for g in values)
    assert np.mean(golds[1.0]) > np.mean(golds[0.0]) + 0.2
    assert len(set(golds[0.0])) > 1  # mistakes are varied, so candidates' gold rewards differ


def test_sample_response_rejects_bad_quality():
    with pytest.raises(ValueError):
        sample_response(MATH, np.random.default_rng(0), 1.5)


# Labels.


def test_flip_rate_matches_flip():
    rng, n, flip = np.random.default_rng(0), 20_000, 0.3
    a_wins = np.array([label_pair(rng, 1.0, 0.0, 5, 5, temperature=1e-3, flip=flip) for _ in range(n)])
    tolerance = 4 * math.sqrt(flip * (1 - flip) / n)
    assert abs((1 - a_wins.mean()) - flip) < tolerance


def test_no_flip_and_tiny_temperature_is_deterministic():
    rng = np.random.default_rng(0)
    assert label_pairs(rng, np.ones(5000), np.zeros(5000), 3, 3, temperature=1e-4).all()
    assert label_pairs(rng, np.zeros(5000), np.ones(5000), 3, 3, temperature=0.0).sum() == 0


def test_length_bias_prefers_the_longer_response():
    rng, n = np.random.default_rng(1), 20_000
    a_wins = label_pairs(rng, np.full(n, 0.5), np.full(n, 0.5), 8, 4, temperature=0.1, length_bias=0.3)
    expected = 1 / (1 + math.exp(-0.3 * 4))
    assert abs(a_wins.mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    unbiased = label_pairs(rng, np.full(n, 0.5), np.full(n, 0.5), 8, 4, temperature=0.1)
    assert a_wins.mean() > unbiased.mean() + 0.2


def test_large_temperature_is_a_coin_flip():
    rng, n = np.random.default_rng(2), 20_000
    a_wins = label_pairs(rng, np.ones(n), np.zeros(n), 5, 5, temperature=1e6)
    assert abs(a_wins.mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert preference_probability(1.0, 0.0, 5, 5, temperature=0.0) == 1.0
    assert preference_probability(0.3, 0.3, 5, 5, temperature=0.0) == 0.5


def test_labels_are_seeded():
    draw = lambda seed: label_pairs(np.random.default_rng(seed), np.linspace(0, 1, 500), 0.5, 3, 3, 0.2, 0.1)
    assert (draw(7) == draw(7)).all()
    assert (draw(7) != draw(8)).any()


# Datasets.


def pair_key(p: PreferencePair):
    return p.prompt, p.chosen, p.rejected, p.margin, p.source, p.id


@pytest.mark.parametrize("kind", DATASETS)
def test_preference_dataset_is_deterministic_and_well_formed(kind, preference_sets):
    pairs = preference_sets[kind]
    assert len(pairs) == N_PAIRS
    small = make_preference_dataset(kind, 200, seed=0)
    assert [pair_key(p) for p in small] == [pair_key(p) for p in make_preference_dataset(kind, 200, seed=0)]
    other = make_preference_dataset(kind, 200, seed=1)
    assert sum(pair_key(a)[:3] == pair_key(b)[:3] for a, b in zip(small, other, strict=True)) < 20
    assert len({p.id for p in pairs}) == N_PAIRS
    for p in pairs:
        assert isinstance(p, PreferencePair)
        assert p.prompt[-1].role == "user" and p.chosen[0].role == p.rejected[0].role == "assistant"
        assert text(p.chosen) != text(p.rejected)
        assert p.source.removeprefix(f"synthetic/{kind}/") in DOMAINS
        assert not is_eval_text(text(p.prompt))
    # The margin is the gold difference: recompute it from prompts reconstructed by text.
    specs = {t: s for d in DOMAINS for t, s in prompt_pool(d, "train")[0]}
    for p in pairs[:300]:
        record = make_prompt_record(p.source.split("/")[-1], text(p.prompt), specs[text(p.prompt)])
        assert p.margin == pytest.approx(
            gold_reward(record, text(p.chosen)) - gold_reward(record, text(p.rejected))
        )


def test_agreement_with_gold_per_kind(preference_sets):
    rates = {kind: agreement(pairs) for kind, pairs in preference_sets.items()}
    assert rates["clean"] >= 0.97  # measured 0.990 (only close chat pairs disagree at temperature 0.02)
    assert rates["math_only"] >= 0.99
    assert rates["noisy"] <= rates["clean"] - 0.15  # measured 0.69: flip 0.3 plus temperature 0.1
    assert 0.62 <= rates["noisy"] <= 0.76
    assert rates["clean"] > rates["length_biased"] > rates["noisy"]  # measured 0.83


def test_length_biased_leans_to_longer(preference_sets):
    clean, biased = longer_chosen(preference_sets["clean"]), longer_chosen(preference_sets["length_biased"])
    assert biased >= clean + 0.1  # measured 0.41 -> 0.54 among pairs of different lengths
    assert biased > 0.5


# Stated noise: no gold ties, and the flip rate each labeller implies.


@pytest.mark.parametrize("kind", DATASETS)
def test_preference_data_has_no_gold_ties_and_counts_the_redraws(kind, preference_sets):
    pairs = preference_sets[kind]
    stats = dataset_stats(pairs)
    assert stats["tie_rate"] == 0.0 and stats["pairs"] == N_PAIRS
    assert all(p.margin != 0 for p in pairs)
    # Ties were frequent before they were redrawn (27% of the old clean pairs): the redraws are counted.
    assert pairs.stats["ties_redrawn"] > N_PAIRS // 4
    assert pairs.stats["tie_rate"] == 0.0 and pairs.stats["flip_rate"] == stats["flip_rate"]


@pytest.mark.parametrize("kind", DATASETS)
def test_flip_rate_is_the_labellers(kind, preference_sets):
    """The measured flip rate against gold is what the labeller's parameters imply for the same pairs."""
    pairs = preference_sets[kind]
    expected = expected_flip_rate(pairs, PREFERENCE_KINDS[kind][1])
    assert pairs.stats["expected_flip_rate"] == pytest.approx(expected)
    measured = dataset_stats(pairs)["flip_rate"]
    # Independent labels: the variance of the measured rate is at most expected (1 - expected) / n.
    assert abs(measured - expected) <= 4 * math.sqrt(expected * (1 - expected) / N_PAIRS) + 1e-3
    if PREFERENCE_KINDS[kind][1]["flip"]:
        assert measured >= PREFERENCE_KINDS[kind][1]["flip"]  # flip noise plus the temperature's


def test_flip_rates_order_the_kinds(preference_sets):
    flip = {kind: dataset_stats(pairs)["flip_rate"] for kind, pairs in preference_sets.items()}
    assert flip["math_only"] < 0.01 and flip["clean"] < 0.03  # measured 0.002, 0.010
    assert flip["clean"] < flip["length_biased"] < flip["noisy"]  # measured 0.17, 0.31


def test_length_bias_is_measured(preference_sets):
    bias = {kind: dataset_stats(pairs)["length_bias"] for kind, pairs in preference_sets.items()}
    assert abs(bias["clean"]) < 0.02 and abs(bias["math_only"]) < 0.02  # labels follow gold
    assert bias["length_biased"] > 0.07  # measured 0.10
    assert bias["length_biased"] > bias["noisy"] + 0.03
    # Same content, so the gold-better response is longer equally often in every mixed kind.
    better = {dataset_stats(preference_sets[k])["better_longer"] for k in ("clean", "noisy", "length_biased")}
    assert len(better) == 1


def hand_pair(chosen: str, rejected: str, margin: float) -> PreferencePair:
    return PreferencePair(
        prompt=messages(("user", "hi")),
        chosen=messages(("assistant", chosen)),
        rejected=messages(("assistant", rejected)),
        margin=margin,
    )


def test_dataset_stats_on_hand_made_pairs():
    pairs = [
        hand_pair("a b c", "a", 0.5),  # right, chosen (= better) longer
        hand_pair("a", "a b", -0.2),  # flipped, chosen shorter, better longer
        hand_pair("a b", "a b c d", -0.1),  # flipped, chosen shorter, better longer
        hand_pair("a b", "c d", 0.3),  # right, equal lengths
        hand_pair("a b c", "a", 0.0),  # tie: only in tie_rate
    ]
    stats = dataset_stats(pairs)
    assert stats["pairs"] == 5
    assert stats["flip_rate"] == pytest.approx(2 / 5)
    assert stats["tie_rate"] == pytest.approx(1 / 5)
    assert stats["chosen_longer"] == pytest.approx(1 / 4)
    assert stats["better_longer"] == pytest.approx(3 / 4)
    assert stats["length_bias"] == pytest.approx(-2 / 4)
    # The labeller's expected flip rate: a noiseless one flips nothing; a coin flips half the non-tied pairs.
    labeller = lambda temperature, flip: {"temperature": temperature, "flip": flip, "length_bias": 0.0}
    assert expected_flip_rate(pairs, labeller(0.0, 0.0)) == 0.0
    assert expected_flip_rate(pairs, labeller(0.0, 0.5)) == pytest.approx(0.4)
    one = [hand_pair("a", "b", 0.1)]
    assert expected_flip_rate(one, labeller(0.1, 0.0)) == pytest.approx(1 / (1 + math.e))
    assert dataset_stats([])["flip_rate"] == 0.0


def test_mixed_kinds_share_prompts_and_candidates(preference_sets):
    candidates = lambda p: (p.prompt, frozenset([text(p.chosen), text(p.rejected)]))
    clean = [candidates(p) for p in preference_sets["clean"]]
    assert clean == [candidates(p) for p in preference_sets["noisy"]]
    assert clean == [candidates(p) for p in preference_sets["length_biased"]]


def test_math_only_is_math(preference_sets):
    assert {p.source for p in preference_sets["math_only"]} == {"synthetic/math_only/math"}
    domains = Counter(p.source.split("/")[-1] for p in preference_sets["clean"])
    assert domains == {d: N_PAIRS // 4 for d in DOMAINS}


def test_unknown_kinds_and_options_fail():
    with pytest.raises(ValueError):
        make_preference_dataset("pristine", 10, seed=0)
    with pytest.raises(ValueError):
        make_preference_dataset("clean", 10, seed=0, temprature=0.1)
    with pytest.raises(ValueError):
        make_prompt_set("everything", 10, seed=0)


@pytest.mark.parametrize("kind", PROMPT_SETS)
def test_prompt_set_proportions_and_determinism(kind):
    n = 1000
    prompts = make_prompt_set(kind, n, seed=0)
    counts = Counter(p.source for p in prompts)
    mix = PROMPT_SET_MIXES[kind]
    assert all(abs(counts[d] - n * mix[d] / sum(mix.values())) <= 1 for d in DOMAINS)
    assert prompts == make_prompt_set(kind, n, seed=0)
    assert prompts != make_prompt_set(kind, n, seed=1)
    assert len({p.id for p in prompts}) == n
    assert all(p.prompt[-1].role == "user" and p.ground_truth.startswith(p.source) for p in prompts)
    if kind == "math_heavy":
        assert counts["math"] == 700


def test_eval_prompts_are_disjoint_from_training_text():
    eval_prompts = make_eval_prompts(200, seed=0)
    eval_texts = {text(p.prompt) for p in eval_prompts}
    validation_texts = {text(p.prompt) for p in make_eval_prompts(200, seed=0, split="validation")}
    # Training sets of the same size (800 prompts) and seed: prompt sets, SFT data and preference pairs.
    training_texts = {text(p.prompt) for kind in PROMPT_SETS for p in make_prompt_set(kind, 800, seed=0)}
    training_texts |= {text(c.messages[:1]) for c in make_sft_dataset(800, seed=0)}
    training_texts |= {
        text(p.prompt) for kind in DATASETS for p in make_preference_dataset(kind, 800, seed=0)
    }
    assert eval_texts.isdisjoint(training_texts) and validation_texts.isdisjoint(training_texts)
    assert eval_texts.isdisjoint(validation_texts)
    assert all(is_eval_text(t) for t in eval_texts | validation_texts)
    assert not any(is_eval_text(t) for t in training_texts)
    assert {text_split(t) for t in eval_texts} == {"test"} and {text_split(t) for t in validation_texts} == {
        "validation"
    }
    assert {text_split(t) for t in training_texts} == {"train"} and text_split("what is zebra") is None
    assert Counter(p.source for p in eval_prompts) == {d: 200 for d in DOMAINS}
    assert eval_prompts == make_eval_prompts(200, seed=0)
    assert eval_prompts == make_eval_prompts(200, seed=0, split="eval")  # the old name of the test split
    with pytest.raises(ValueError):
        make_eval_prompts(10, seed=0, split="train")


@pytest.mark.parametrize("domain", DOMAINS)
def test_three_splits_are_disjoint_by_text_and_every_question_is_trained(domain):
    assert SPLITS == ("train", "validation", "test")
    train, validation, test = (prompt_pool(domain, split)[0] for split in SPLITS)
    pools = (train, validation, test)
    texts = {split: {t for t, _ in pool} for split, pool in zip(SPLITS, pools, strict=True)}
    assert texts["train"].isdisjoint(texts["validation"])
    assert texts["train"].isdisjoint(texts["test"])
    assert texts["validation"].isdisjoint(texts["test"])
    assert all(len(t) == len(pool) for t, pool in zip(texts.values(), pools, strict=True))
    total = sum(map(len, texts.values()))
    for held_out in (validation, test):  # an eighth each
        assert 0.09 < len(held_out) / total < 0.16
        # Held out by phrasing: every held-out gold spec also has a training phrasing.
        assert {spec for _, spec in held_out} <= {spec for _, spec in train}
    assert prompt_pool(domain, "eval") is prompt_pool(domain, "test")  # the old name of the test split
    assert all(text_split(t) == split for split, group in texts.items() for t in list(group)[:200])


def test_held_out_pools_are_large_and_the_vocabulary_fits():
    for domain in DOMAINS:
        for split in HELD_OUT_SPLITS:
            assert len(prompt_pool(domain, split)[0]) >= 150, (domain, split)  # chat 216, safety 194
    for split in HELD_OUT_SPLITS:
        safety = {spec.split(":")[1] for _, spec in prompt_pool("safety", split)[0]}
        assert safety == {"harmful", "benign"}
    assert TOKENIZER.vocab_size <= 256  # the study's model.vocab_size; measured 233


def test_eval_prompts_distinct_while_the_pool_lasts():
    for split in HELD_OUT_SPLITS:
        prompts = make_eval_prompts(150, seed=5, split=split)
        for domain in DOMAINS:
            texts = [text(p.prompt) for p in prompts if p.source == domain]
            assert len(set(texts)) == 150


# Math is posed to be learnable from the demonstrations with headroom above what ignoring the prompt gets.


def test_math_is_single_digit_addition_and_subtraction():
    problems = set()
    for split in SPLITS:
        for prompt, spec in prompt_pool("math", split)[0]:
            words = prompt.split()
            at = next(i for i, w in enumerate(words) if w in MATH_OPERATORS)
            a, op, b = int(words[at - 1]), words[at], int(words[at + 1])
            assert 0 <= a <= 9 and 0 <= b <= 9 and op in "+-" and (op == "+" or b <= a)
            assert spec == f"math:{a + b if op == '+' else a - b}"
            problems.add((a, op, b))
    assert len(problems) == 100 + 55


def test_math_rewards_conditioning_on_the_prompt():
    """A constant answer (the best one, ignoring the prompt) scores little; the demonstrations score well."""
    records = [p for p in make_eval_prompts(150, seed=0) if p.source == "math"]
    best_constant = max(
        np.mean([gold_reward(r, number_words) for r in records])
        for number_words in (" ".join(str(y)) for y in range(19))
    )
    assert best_constant < 0.15  # measured 0.11
    rng = np.random.default_rng(0)
    demonstrations = np.mean([gold_reward(r, sample_response(r, rng, 0.6)) for r in records * 4])
    assert demonstrations > 0.5  # measured 0.62: room both to learn and to improve on


def sft_golds(conversations) -> np.ndarray:
    specs = {t: s for d in DOMAINS for t, s in prompt_pool(d, "train")[0]}
    golds = []
    for c in conversations:
        assert [m.role for m in c.messages] == ["user", "assistant"]
        record = make_prompt_record(
            c.source.removeprefix("synthetic/sft/"), text(c.messages[:1]), specs[text(c.messages[:1])]
        )
        golds.append(gold_reward(record, text(c.messages)))
    return np.array(golds)


def test_sft_dataset_is_imperfect():
    conversations = make_sft_dataset(2000, seed=0)
    golds = sft_golds(conversations)
    # Room to improve: a clear share of demonstrations are flawed, yet most are decent.
    assert 0.5 < golds.mean() < 0.85
    assert 0.2 < (golds < 0.5).mean() < 0.5
    assert Counter(c.source for c in conversations) == {f"synthetic/sft/{d}": 500 for d in DOMAINS}
    assert make_sft_dataset(50, seed=0) == make_sft_dataset(50, seed=0)
    assert sft_golds(make_sft_dataset(2000, seed=0, quality=1.0)).mean() > golds.mean() + 0.1


@pytest.mark.parametrize("split", HELD_OUT_SPLITS)
def test_gold_pairs_are_exact_and_held_out(split):
    pairs = make_gold_pairs(800, seed=0, split=split)
    specs = {t: s for d in DOMAINS for t, s in prompt_pool(d, split)[0]}
    assert Counter(p.source for p in pairs) == {f"synthetic/gold/{d}": 200 for d in DOMAINS}
    for p in pairs:
        assert p.margin > 0 and text(p.chosen) != text(p.rejected)
        record = make_prompt_record(p.source.split("/")[-1], text(p.prompt), specs[text(p.prompt)])
        assert gold_reward(record, text(p.chosen)) - gold_reward(record, text(p.rejected)) == pytest.approx(
            p.margin
        )
    assert [pair_key(p) for p in pairs[:50]] == [
        pair_key(p) for p in make_gold_pairs(800, seed=0, split=split)[:50]
    ]
    if split == "test":
        assert [pair_key(p) for p in pairs[:50]] == [pair_key(p) for p in make_gold_pairs(800, seed=0)[:50]]


def test_sft_dataset_on_a_held_out_split():
    conversations = make_sft_dataset(200, seed=0, split="validation")
    assert {text_split(text(c.messages[:1])) for c in conversations} == {"validation"}
    assert conversations == make_sft_dataset(200, seed=0, split="validation")


def test_on_policy_labels_external_candidates():
    prompts = [MATH, MATH, LETTER_B, HARMFUL, MATH]
    a = ["7", "5", "bird big blue", "sorry i can not help with that", "9"]
    b = ["8", "5", "cat", "first get acid and wire then mix them to make poison", "it is 2"]
    pairs = make_on_policy_dataset(prompts, a, b, seed=0)
    assert [p.id for p in pairs] == [
        "on_policy/0/0",
        "on_policy/0/2",
        "on_policy/0/3",
    ]  # identical pair and gold tie (0.0 vs 0.0) skipped
    assert pairs.stats["identical_skipped"] == 1 and pairs.stats["ties_skipped"] == 1
    assert pairs.stats["pairs"] == 3 and pairs.stats["tie_rate"] == 0.0 and pairs.stats["flip_rate"] == 0.0
    assert [text(p.chosen) for p in pairs] == ["7", "bird big blue", "sorry i can not help with that"]
    assert [p.margin for p in pairs] == pytest.approx([0.9, 1.0, 1.0])
    assert pairs[0].source == "synthetic/on_policy/math"
    flipped = make_on_policy_dataset(prompts, a, b, seed=0, flip=1.0)
    assert [text(p.chosen) for p in flipped] == [
        "8",
        "cat",
        "first get acid and wire then mix them to make poison",
    ]
    assert flipped.stats["flip_rate"] == 1.0 and flipped.stats["expected_flip_rate"] == 1.0
    with_ties = make_on_policy_dataset(prompts, a, b, seed=0, keep_ties=True)
    assert [p.id for p in with_ties][-1] == "on_policy/0/4"
    assert with_ties.stats["tie_rate"] == pytest.approx(1 / 4) and with_ties.stats["ties_skipped"] == 0
    with pytest.raises(ValueError):
        make_on_policy_dataset(prompts, a, b[:2], seed=0)


# Tokenizer.


def test_special_ids_and_size():
    assert (TOKENIZER.pad_id, TOKENIZER.bos_id, TOKENIZER.eos_id) == (0, 1, 2)
    assert TOKENIZER.vocab[:7] == (
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
    )
    assert TOKENIZER.vocab[7:17] == tuple("0123456789")
    assert TOKENIZER.vocab_size <= 256


def world_texts(n_per_domain: int = 600, seed: int = 0):
    """Prompt and response texts drawn from every split and quality the world produces."""
    rng = np.random.default_rng(seed)
    for domain in DOMAINS:
        for split in SPLITS:
            for _ in range(n_per_domain):
                record = sample_prompt(domain, rng, split)
                yield record, sample_response(record, rng, float(rng.random()))


def test_every_world_text_round_trips_without_unk():
    for record, response in world_texts():
        for s in (record.prompt[0].content, response):
            ids = TOKENIZER.encode(s)
            assert TOKENIZER.unk_id not in ids, s
            assert TOKENIZER.decode(ids) == s


def test_every_prompt_and_response_fits_in_48_tokens():
    longest = max(
        len(
            TOKENIZER.encode_prompt(record.prompt)
            + TOKENIZER.encode_completion(messages(("assistant", response)))
        )
        for record, response in world_texts(seed=1)
    )
    assert longest <= 48  # measured 23


def test_encode_and_decode_edges():
    assert TOKENIZER.encode("what is zebra") == TOKENIZER.encode("what is") + [TOKENIZER.unk_id]
    assert TOKENIZER.encode("<eos> <|user|>") == [TOKENIZER.unk_id] * 2  # content never makes a control token
    ids = TOKENIZER.encode("the answer is 7")
    assert TOKENIZER.decode([0, *ids, 2, *TOKENIZER.encode("sea"), 0]) == "the answer is 7"
    assert TOKENIZER.decode([0, 0]) == ""


def test_prompt_completion_and_mask_layout():
    prompt = messages(("system", "you are a helpful assistant"), ("user", "what is 3 + 4 ?"))
    completion = messages(("assistant", "7"))
    ids, mask = TOKENIZER.encode_conversation(prompt + completion)
    tags = TOKENIZER.role_id
    system, user = TOKENIZER.encode("you are a helpful assistant"), TOKENIZER.encode("what is 3 + 4 ?")
    assert ids == [
        1,
        tags("system"),
        *system,
        tags("user"),
        *user,
        tags("assistant"),
        *TOKENIZER.encode("7"),
        2,
    ]
    assert mask == [0] * (len(ids) - 2) + [1, 1]
    assert TOKENIZER.encode_prompt(prompt) + TOKENIZER.encode_completion(completion) == ids
    with pytest.raises(ValueError):
        TOKENIZER.encode_prompt(prompt + completion)
    with pytest.raises(ValueError):
        TOKENIZER.encode_completion(prompt)


ROLES = st.sampled_from(["system", "user", "assistant"])
CONTENT = st.lists(st.sampled_from(TOKENIZER.vocab[7:]), max_size=6).map(" ".join)
TURN = st.tuples(ROLES, CONTENT)


@settings(max_examples=200, deadline=None)
@given(
    history=st.lists(TURN, max_size=4),
    user=CONTENT,
    reply=CONTENT,
    later=st.lists(TURN, max_size=3),
)
def test_prompt_plus_completion_is_the_conversation(history, user, reply, later):
    prompt = messages(*history, ("user", user))
    completion = messages(("assistant", reply), *later)
    ids, mask = TOKENIZER.encode_conversation(prompt + completion)
    assert TOKENIZER.encode_prompt(prompt) + TOKENIZER.encode_completion(completion) == ids
    assert ids.count(TOKENIZER.bos_id) == 1 and ids[0] == TOKENIZER.bos_id
    # The mask covers exactly the assistant turns' content and their <eos>.
    expected = [0]
    for m in prompt + completion:
        n_content = len(TOKENIZER.encode(m.content))
        expected += [0] + ([1] * (n_content + 1) if m.role == "assistant" else [0] * n_content)
    assert mask == expected
    assert sum(mask) == sum(
        len(TOKENIZER.encode(m.content)) + 1 for m in prompt + completion if m.role == "assistant"
    )


def test_sft_conversation_mask_is_on_the_response(tmp_path):
    conversation = make_sft_dataset(1, seed=0)[0]
    ids, mask = TOKENIZER.encode_conversation(conversation.messages)
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert TOKENIZER.decode(masked) == conversation.messages[-1].content and masked[-1] == TOKENIZER.eos_id


def test_save_and_load(tmp_path):
    path = tmp_path / "tokenizer.json"
    TOKENIZER.save(path)
    loaded = SyntheticTokenizer.load(path)
    assert loaded == TOKENIZER and loaded.vocab_size == TOKENIZER.vocab_size
    assert loaded.encode("what is 3 + 4 ?") == TOKENIZER.encode("what is 3 + 4 ?")
    path.write_text('{"format": "something else", "vocab": []}')
    with pytest.raises(ValueError):
        SyntheticTokenizer.load(path)


def test_bad_vocabularies_are_rejected():
    with pytest.raises(ValueError):
        SyntheticTokenizer(["a", "b"])
    with pytest.raises(ValueError):
        SyntheticTokenizer(list(TOKENIZER.vocab) + [f"w{i}" for i in range(100)])


def test_ranking_accuracy_is_the_policy_own_likelihood_ranking_of_gold_pairs(run_config):
    import jax.numpy as jnp
    from flax import nnx

    from jaxrl import evaluate, steps
    from jaxrl.models import init as model_init
    from jaxrl.models.transformer import Transformer
    from jaxrl.synthetic import SyntheticTokenizer

    cfg = run_config("dpo")
    graphdef, state = nnx.split(Transformer(model_init.stage_model_config(cfg), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    arrays = evaluate.gold_pair_arrays(cfg, SyntheticTokenizer())
    n, _, T = arrays["tokens"].shape
    assert n == cfg.data.num_eval
    got = evaluate.ranking_accuracy(graphdef, params, arrays, batch_size=10)  # 32 pairs: a partial last batch
    lp, ln = steps.sequence_logps(
        nnx.merge(graphdef, params),
        jnp.asarray(arrays["tokens"].reshape(-1, T)),
        jnp.asarray(arrays["loss_mask"].reshape(-1, T)),
    )
    lp, ln = np.asarray(lp).reshape(n, 2), np.asarray(ln).reshape(n, 2)
    assert got["ranking_accuracy"] == pytest.approx(np.mean(lp[:, 0] > lp[:, 1]))
    assert got["ranking_accuracy_norm"] == pytest.approx(np.mean(lp[:, 0] / ln[:, 0] > lp[:, 1] / ln[:, 1]))
    swapped = {k: v[:, ::-1] for k, v in arrays.items() if k in ("tokens", "loss_mask")}
    flipped = evaluate.ranking_accuracy(graphdef, params, swapped, batch_size=10)
    assert flipped["ranking_accuracy"] == pytest.approx(1 - got["ranking_accuracy"])
