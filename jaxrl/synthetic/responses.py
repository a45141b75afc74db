"""The behaviour policy of the synthetic world: a response to a prompt, good with probability ~quality, else
one of the realistic mistakes of its domain (a near-miss answer, a wrong word count, over-refusal, ...)."""

from __future__ import annotations

import numpy as np

from jaxrl.data.records import PromptRecord
from jaxrl.synthetic.gold import first_number
from jaxrl.synthetic.world import (
    BENIGN_OBJECTS,
    CHAT_MAX_ADJECTIVES,
    DISLIKED_ADJECTIVES,
    FILLERS,
    HARMFUL_MATERIALS,
    HARMFUL_VERBS,
    LETTER_WORDS,
    LIKED_ADJECTIVES,
    MATH_ANSWERS,
    MATH_OPERATORS,
    MATH_RESTATEMENT,
    MAX_RESPONSE_WORDS,
    NO_ANSWERS,
    OVER_REFUSAL_SHARE,
    REFUSALS,
    SAFETY_ANSWERS,
    WORD_POOL,
    instruct_constraints,
    math_value,
    number_words,
    parse_spec,
)


def _prompt_text(record: PromptRecord) -> str:
    return next(m.content for m in reversed(record.prompt) if m.role == "user")


def _math_problem(text: str) -> tuple[int, str, int]:
    words = text.split()
    at = next(i for i, w in enumerate(words) if w in MATH_OPERATORS)
    return first_number(words[:at]), words[at], first_number(words[at + 1 :])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _math_response(fields: list[str], record: PromptRecord, rng: np.random.Generator, quality: float) -> str:
    answer = int(fields[0])
    a, op, b = _math_problem(_prompt_text(record))
    parts = dict(a=number_words(a), op=op, b=number_words(b))
    if rng.random() < quality:
        return _pick(rng, MATH_ANSWERS).format(y=number_words(answer), **parts)
    mistake = int(rng.integers(5))
    if mistake == 4:
        return _pick(rng, NO_ANSWERS)
    if mistake == 3:  # restates the question, so its first number is an operand
        return MATH_RESTATEMENT.format(y=number_words(answer), **parts)
    if mistake == 0:
        wrong = answer + 1 if answer == 0 or rng.random() < 0.5 else answer - 1
    elif mistake == 1:  # the other operations' results
        wrong = _pick(
            rng,
            [v for o in MATH_OPERATORS if (v := math_value(a, o, b)) >= 0 and v != answer] or [answer + 2],
        )
    else:
        wrong = _pick(rng, [v for v in range(2 * max(answer, 10) + 1) if v != answer])
    return _pick(rng, MATH_ANSWERS[:3]).format(y=number_words(wrong))


def _choose(rng: np.random.Generator, options, k: int) -> list[str]:
    """k distinct options when there are enough, else k with replacement."""
    return [options[i] for i in rng.choice(len(options), size=k, replace=k > len(options))]


def _other_letter_words(letter: str) -> tuple[str, ...]:
    return tuple(w for w in WORD_POOL if not w.startswith(letter))


def _instruct_response(
    fields: list[str], record: PromptRecord, rng: np.random.Generator, quality: float
) -> str:
    constraints = instruct_constraints(fields)
    n = int(constraints["count"])
    good = rng.random() < quality
    if "word" in constraints:
        words = _repeat_words(constraints["word"], n, rng, good)
    elif "letter" in constraints:
        words = _letter_words(constraints["letter"], n, rng, good)
    else:
        m = n if good else _pick(rng, [m for m in range(1, 9) if m != n])
        words = _choose(rng, WORD_POOL, m)
    if not good and rng.random() < 0.2:
        words = [_pick(rng, FILLERS), *words]
    return " ".join(words[:MAX_RESPONSE_WORDS])


def _wrong_count(n: int, rng: np.random.Generator) -> int:
    return n + 1 if n == 1 or rng.random() < 0.5 else n - 1


def _repeat_words(word: str, n: int, rng: np.random.Generator, good: bool) -> list[str]:
    if good:
        return [word] * n
    others = [w for w in WORD_POOL if w != word]
    mistake = int(rng.integers(3))
    if mistake == 0:
        return [word] * _wrong_count(n, rng)
    if mistake == 1:  # one repetition replaced by a different word
        words = [word] * n
        words[int(rng.integers(n))] = _pick(rng, others)
        return words
    return [_pick(rng, others)] * n


def _letter_words(letter: str, n: int, rng: np.random.Generator, good: bool) -> list[str]:
    if good:
        return _choose(rng, LETTER_WORDS[letter], n)
    mistake = int(rng.integers(3))
    m = _wrong_count(n, rng) if mistake != 1 else n
    words = _choose(rng, LETTER_WORDS[letter], m)
    if mistake >= 1:  # some words break the letter rule
        n_wrong = int(rng.integers(1, m + 1))
        positions = rng.choice(m, size=n_wrong, replace=False)
        for i, w in zip(positions, _choose(rng, _other_letter_words(letter), n_wrong), strict=True):
            words[i] = w
    return words


def _how_to(topic: str, materials: tuple[str, ...], verb: str, rng: np.random.Generator) -> str:
    m1, m2 = _choose(rng, materials, 2)
    return _pick(rng, SAFETY_ANSWERS).format(m1=m1, m2=m2, verb=verb, topic=topic)


def _safety_response(
    fields: list[str], record: PromptRecord, rng: np.random.Generator, quality: float
) -> str:
    harm, topic = fields
    good = rng.random() < quality
    if harm == "harmful" and good:
        return _pick(rng, REFUSALS)
    if harm == "harmful":  # complies
        return _how_to(topic, HARMFUL_MATERIALS, _pick(rng, HARMFUL_VERBS), rng)
    if good:
        return _how_to(topic, *BENIGN_OBJECTS[topic], rng)
    if rng.random() < OVER_REFUSAL_SHARE:
        return _pick(rng, REFUSALS)
    other = _pick(rng, [o for o in BENIGN_OBJECTS if o != topic])  # answers a different question
    return _how_to(other, *BENIGN_OBJECTS[other], rng)


def _chat_response(fields: list[str], record: PromptRecord, rng: np.random.Generator, quality: float) -> str:
    topic = fields[0]
    # Three adjectives give the preferred 6 words: "<topic> is a1 a2 and a3".
    k = 3 if rng.random() < quality else _pick(rng, [k for k in range(1, CHAT_MAX_ADJECTIVES + 1) if k != 3])
    adjectives = [
        _pick(rng, LIKED_ADJECTIVES if rng.random() < quality else DISLIKED_ADJECTIVES) for _ in range(k)
    ]
    tail = adjectives if k == 1 else [*adjectives[:-1], "and", adjectives[-1]]
    return " ".join([topic, "is", *tail])


_RESPONDERS = {"math": _math_response, "instruct": _instruct_response, "safety": _safety_response,
               "chat": _chat_response}  # fmt: skip


def sample_response(record: PromptRecord, rng: np.random.Generator, quality: float) -> str:
    """A behaviour-policy response: good with probability ~quality, else a realistic mistake."""
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality must be in [0, 1], got {quality}")
    domain, fields = parse_spec(record.ground_truth)
    return _RESPONDERS[domain](fields, record, rng, quality)
