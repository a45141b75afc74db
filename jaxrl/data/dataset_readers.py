"""Readers of public preference datasets, each registered under its name: tulu25, ultrafeedback,
ultrafeedback_binarized, hh_rlhf, shp, helpsteer, nectar, chatbot_arena, helpsteer3, helpsteer2_preference,
arena_human_preference and pku_saferlhf_{better,safer}. A tie the dataset records is a counted
SkipRow("tie")."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from jaxrl.data.fields import (
    SkipRow,
    alternating_turns,
    as_object,
    assistant_reply,
    check_prompt,
    check_text,
    fail,
    get_field,
    get_id,
    get_list,
    get_number,
    get_string,
    kind_of,
    parse_messages,
    parse_transcript,
    split_pair,
    user_prompt,
)
from jaxrl.data.records import Message, Messages, PreferencePair, RatedCompletions
from jaxrl.data.registry import register

ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
HELPSTEER_ASPECTS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
ARENA_WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
_HELPSTEER_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")


@register("tulu25")
def read_tulu25(row: Mapping) -> list[PreferencePair]:
    """allenai/tulu-2.5-preference-data: full `chosen`/`rejected` conversations sharing a prompt prefix."""
    prompt, chosen, rejected = split_pair(
        parse_messages(get_field(row, "chosen"), "chosen"),
        parse_messages(get_field(row, "rejected"), "rejected"),
    )
    source = get_string(row, "source", optional=True) or "tulu25"
    return [PreferencePair(prompt, chosen, rejected, source=source, id=get_id(row, "id"))]


def _ultrafeedback_rating(entry: Any, field: str) -> float | None:
    """One aspect's `Rating` string ("1".."5" or "N/A"); a list of annotations is averaged."""
    entries = entry if isinstance(entry, list | tuple) else [entry]
    values = []
    for index, item in enumerate(entries):
        where = f"{field}[{index}]" if isinstance(entry, list | tuple) else field
        rating = as_object(item, where).get("Rating")
        if rating is None or (isinstance(rating, str) and rating.strip().upper() == "N/A"):
            continue
        if isinstance(rating, bool) or not isinstance(rating, str | int | float):
            raise fail("wrong_type", f"'Rating' must be a string, got {kind_of(rating)}", f"{where}.Rating")
        try:
            value = float(rating)
        except ValueError:
            raise fail("bad_value", f"unparseable rating {rating!r}", f"{where}.Rating") from None
        if not math.isfinite(value):
            raise fail("bad_value", f"unparseable rating {rating!r}", f"{where}.Rating")
        values.append(value)
    return sum(values) / len(values) if values else None


def _optional_score(completion: Mapping, key: str, where: str) -> float | None:
    value = completion.get(key)
    if isinstance(value, float) and math.isnan(value):
        return None  # UltraFeedback stores some unrated scores as NaN
    return get_number(completion, key, where, optional=True)


def _ultrafeedback_ratings(completion: Mapping, where: str) -> dict[str, float]:
    annotations = as_object(get_field(completion, "annotations", where), f"{where}.annotations")
    ratings = {}
    for aspect in ULTRAFEEDBACK_ASPECTS:
        if annotations.get(aspect) is not None:
            value = _ultrafeedback_rating(annotations[aspect], f"{where}.annotations.{aspect}")
            if value is not None:
                ratings[aspect] = value
    for key, name in (("overall_score", "overall"), ("fine-grained_score", "fine_grained")):
        value = _optional_score(completion, key, where)
        if value is not None:
            ratings[name] = value
    return ratings


@register("ultrafeedback")
def read_ultrafeedback(row: Mapping) -> list[RatedCompletions]:
    """openbmb/UltraFeedback: `instruction` and 4 `completions` with per-aspect `annotations`."""
    prompt = user_prompt(get_string(row, "instruction"), "instruction")
    completions, ratings = [], []
    for index, item in enumerate(get_list(row, "completions")):
        where = f"completions[{index}]"
        item = as_object(item, where)
        completions.append(assistant_reply(get_string(item, "response", where), f"{where}.response"))
        ratings.append(_ultrafeedback_ratings(item, where))
    if not completions:
        raise fail("bad_structure", "no completions", "completions")
    return [RatedCompletions(prompt, tuple(completions), tuple(ratings), source="ultrafeedback")]


@register("ultrafeedback_binarized")
def read_ultrafeedback_binarized(row: Mapping) -> list[PreferencePair]:
    """HuggingFaceH4/ultrafeedback_binarized: message-list pairs; margin = score_chosen - score_rejected;
    equal scores are a counted `tie`."""
    get_string(row, "prompt", optional=True)
    prompt, chosen, rejected = split_pair(
        parse_messages(get_field(row, "chosen"), "chosen"),
        parse_messages(get_field(row, "rejected"), "rejected"),
    )
    margin = get_number(row, "score_chosen") - get_number(row, "score_rejected")
    if margin < 0:
        raise fail("bad_value", "score_chosen is below score_rejected", "score_chosen")
    if margin == 0:
        raise SkipRow("tie", "score_chosen equals score_rejected: no preference")
    pair = PreferencePair(
        prompt, chosen, rejected, margin, "ultrafeedback_binarized", get_id(row, "prompt_id")
    )
    return [pair]


@register("hh_rlhf")
def read_hh_rlhf(row: Mapping) -> list[PreferencePair]:
    """Anthropic/hh-rlhf: raw "\\n\\nHuman:/\\n\\nAssistant:" transcripts; the shared prefix is the prompt."""
    chosen = parse_transcript(get_string(row, "chosen"), "chosen")
    rejected = parse_transcript(get_string(row, "rejected"), "rejected")
    prompt, chosen_tail, rejected_tail = split_pair(tuple(chosen), tuple(rejected))
    return [PreferencePair(prompt, chosen_tail, rejected_tail, source="hh_rlhf")]


def _shp_margin(chosen_score: float, rejected_score: float) -> float | None:
    # log of SHP's score ratio: scale-free across subreddits of very different traffic, 0 for equal scores.
    if chosen_score > 0 and rejected_score > 0:
        return math.log(chosen_score / rejected_score)
    return None


@register("shp")
def read_shp(row: Mapping) -> list[PreferencePair]:
    """stanfordnlp/SHP: `history`, `human_ref_A/B`, `labels` (1: A preferred); margin = log(score ratio)."""
    prompt = user_prompt(get_string(row, "history"), "history")
    refs = {side: assistant_reply(get_string(row, f"human_ref_{side}"), f"human_ref_{side}") for side in "AB"}
    label = get_field(row, "labels")
    if isinstance(label, bool) or not isinstance(label, int):
        raise fail("wrong_type", f"'labels' must be 0 or 1, got {kind_of(label)}", "labels")
    if label not in (0, 1):
        raise fail("bad_value", f"'labels' must be 0 or 1, got {label}", "labels")
    win, lose = ("A", "B") if label == 1 else ("B", "A")
    if refs[win] == refs[lose]:
        raise fail("identical", "human_ref_A and human_ref_B are the same text", "human_ref_A")
    win_score, lose_score = get_number(row, f"score_{win}"), get_number(row, f"score_{lose}")
    if win_score < lose_score:
        raise fail("bad_value", f"labels prefers {win} but score_{win} < score_{lose}", "labels")
    margin = _shp_margin(win_score, lose_score)
    return [PreferencePair(prompt, refs[win], refs[lose], margin, "shp", get_id(row, "post_id"))]


def _helpsteer_prompt(text: str) -> Messages:
    """HelpSteer2 writes multi-turn prompts as "u1\\n<extra_id_1>Assistant\\na1\\n<extra_id_1>User\\nu2"."""
    if "<extra_id_1>" not in text:
        return (Message("user", text),)
    parts = _HELPSTEER_TURN.split(text)
    speakers, contents = ["User", *parts[1::2]], [parts[0], *parts[2::2]]
    return tuple(alternating_turns(speakers, contents, {"User": "user", "Assistant": "assistant"}, "prompt"))


def _group_by_prompt(records: list[RatedCompletions]) -> list[RatedCompletions]:
    """One record per distinct prompt of the whole file, its completions and ratings in file order; prompts
    in order of first appearance. Rows of a prompt need not be adjacent."""
    groups: dict[Messages, list[RatedCompletions]] = {}
    for record in records:
        groups.setdefault(record.prompt, []).append(record)
    return [
        dataclasses.replace(
            group[0],
            completions=tuple(c for r in group for c in r.completions),
            ratings=tuple(x for r in group for x in r.ratings),
        )
        for group in groups.values()
    ]


@register("helpsteer", combine=_group_by_prompt)
def read_helpsteer(row: Mapping) -> list[RatedCompletions]:
    """nvidia/HelpSteer and HelpSteer2: one response per row (`prompt`, `response` and the five 0-4 attributes
    `helpfulness`, `correctness`, `coherence`, `complexity`, `verbosity`). After the last row, read() groups
    the rows by prompt over the whole file (rows of one prompt need not be adjacent: the prompt's text, parsed
    into turns, is the key), so a prompt's responses form one rated list: binarised into pairs, or kept whole
    for a listwise loss (`binarize.to_lists`), both scored by the same data.aspect_weights (helpfulness alone
    by default). The read summary counts the rows and the lists they make."""
    prompt = check_prompt(_helpsteer_prompt(get_string(row, "prompt")), "prompt")
    response = assistant_reply(get_string(row, "response"), "response")
    ratings = {aspect: get_number(row, aspect) for aspect in HELPSTEER_ASPECTS}
    return [RatedCompletions(prompt, (response,), (ratings,), source="helpsteer")]


@register("nectar")
def read_nectar(row: Mapping) -> list[RatedCompletions]:
    """berkeley-nest/Nectar: transcript `prompt` and ranked `answers`; rating = -rank (rank 1 is best)."""
    turns = parse_transcript(get_string(row, "prompt"), "prompt")
    if turns and turns[-1].role == "assistant" and not turns[-1].content:
        turns = turns[:-1]  # the prompt ends with an empty "\n\nAssistant:" cue for the answers
    prompt = check_prompt(tuple(turns), "prompt")
    completions, ratings = [], []
    for index, item in enumerate(get_list(row, "answers")):
        where = f"answers[{index}]"
        item = as_object(item, where)
        completions.append(assistant_reply(get_string(item, "answer", where), f"{where}.answer"))
        ratings.append(-get_number(item, "rank", where))
    if not completions:
        raise fail("bad_structure", "no answers", "answers")
    return [RatedCompletions(prompt, tuple(completions), tuple(ratings), source="nectar")]


@register("chatbot_arena")
def read_chatbot_arena(row: Mapping) -> list[PreferencePair]:
    """lmsys/chatbot_arena_conversations: two conversations and a `winner`; ties are skipped as `tie`."""
    winner = get_string(row, "winner")
    if winner not in ARENA_WINNERS:
        raise fail("bad_value", f"unknown winner {winner!r}; expected one of {ARENA_WINNERS}", "winner")
    if winner.startswith("tie"):
        raise SkipRow("tie", f"winner is {winner!r}")
    sides = ("conversation_a", "conversation_b")
    if winner == "model_b":
        sides = sides[::-1]
    conversations = [parse_messages(get_field(row, side), side) for side in sides]
    prompt, chosen, rejected = split_pair(*conversations, fields=sides)
    return [PreferencePair(prompt, chosen, rejected, source="chatbot_arena", id=get_id(row, "question_id"))]


def _preference_strength(row: Mapping, key: str) -> int:
    """A -3..3 preference (negative: the first response is better); 0 is a counted tie."""
    value = get_number(row, key)
    if not value.is_integer() or not -3 <= value <= 3:
        raise fail("bad_value", f"{key!r} must be an integer from -3 to 3, got {value:g}", key)
    if value == 0:
        raise SkipRow("tie", f"{key} is 0: the responses are about the same")
    return int(value)


def _strength_pair(
    prompt: Messages, first: Messages, second: Messages, strength: int, fields, source: str, id: str = ""
) -> PreferencePair:
    if first == second:
        raise fail("identical", "the two responses are the same text", fields[0])
    chosen, rejected = (first, second) if strength < 0 else (second, first)
    return PreferencePair(prompt, chosen, rejected, float(abs(strength)), source, id)


@register("helpsteer3")
def read_helpsteer3(row: Mapping) -> list[PreferencePair]:
    """nvidia/HelpSteer3 (preference): `context` (messages), `response1`, `response2` and `overall_preference`
    from -3 (response1 much better) to 3 (response2 much better); margin = |overall_preference|; 0: a tie."""
    prompt = check_prompt(parse_messages(get_field(row, "context"), "context"), "context")
    first = assistant_reply(get_string(row, "response1"), "response1")
    second = assistant_reply(get_string(row, "response2"), "response2")
    strength = _preference_strength(row, "overall_preference")
    return [_strength_pair(prompt, first, second, strength, ("response1", "response2"), "helpsteer3")]


@register("helpsteer2_preference")
def read_helpsteer2_preference(row: Mapping) -> list[PreferencePair]:
    """nvidia/HelpSteer2 preference/preference.jsonl.gz: `prompt` (HelpSteer2 turns), `response_1`,
    `response_2` and `preference_strength` from -3 (response_1 much better) to 3; margin = |strength|; 0 is a
    tie."""
    prompt = check_prompt(_helpsteer_prompt(get_string(row, "prompt")), "prompt")
    first = assistant_reply(get_string(row, "response_1"), "response_1")
    second = assistant_reply(get_string(row, "response_2"), "response_2")
    strength = _preference_strength(row, "preference_strength")
    fields = ("response_1", "response_2")
    return [_strength_pair(prompt, first, second, strength, fields, "helpsteer2_preference")]


def _flag(row: Mapping, key: str) -> bool:
    """A 0/1 column, as an integer, a boolean or (CSV) a string."""
    value = get_field(row, key)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return value.strip() == "1"
    if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
        return bool(value)
    if isinstance(value, int | float):
        raise fail("bad_value", f"{key!r} must be 0 or 1, got {value!r}", key)
    raise fail("wrong_type", f"{key!r} must be 0 or 1, got {kind_of(value)}", key)


def _turns(row: Mapping, key: str) -> list[str | None]:
    """A list of turn texts, or the JSON text of one (the arena CSV stores '["turn 1", "turn 2"]')."""
    value = get_field(row, key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise fail("bad_value", f"{key!r} must be a JSON list of strings", key) from None
    if not isinstance(value, list | tuple) or not value:
        raise fail("wrong_type", f"{key!r} must be a non-empty list of strings, got {kind_of(value)}", key)
    for index, text in enumerate(value):
        if text is not None and not isinstance(text, str):
            raise fail("wrong_type", f"turn {index} must be a string, got {kind_of(text)}", f"{key}[{index}]")
    return list(value)


def _arena_conversation(prompts: list, responses: list, key: str) -> Messages:
    if len(responses) != len(prompts):
        raise fail("bad_structure", f"{len(prompts)} prompts but {len(responses)} responses", key)
    out = []
    for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if prompt is None or not prompt.strip():
            raise fail("empty_prompt", f"empty user turn {index}", f"prompt[{index}]")
        if response is None or not response.strip():
            raise fail("empty_response", f"empty response turn {index}", f"{key}[{index}]")
        out += [
            Message("user", check_text(prompt, f"prompt[{index}]")),
            Message("assistant", check_text(response, f"{key}[{index}]")),
        ]
    return tuple(out)


@register("arena_human_preference")
def read_arena_human_preference(row: Mapping) -> list[PreferencePair]:
    """lmsys/lmsys-arena-human-preference-55k (train.csv or Parquet): `prompt`, `response_a`, `response_b`
    (JSON lists, one entry per turn) and one-hot `winner_model_a` / `winner_model_b` / `winner_tie`; ties are
    skipped."""
    winners = {key: _flag(row, f"winner_{key}") for key in ("model_a", "model_b", "tie")}
    if sum(winners.values()) != 1:
        raise fail("bad_value", f"exactly one winner column must be 1, got {winners}", "winner_model_a")
    if winners["tie"]:
        raise SkipRow("tie", "winner_tie is 1")
    prompts = _turns(row, "prompt")
    sides = ("response_a", "response_b") if winners["model_a"] else ("response_b", "response_a")
    conversations = [_arena_conversation(prompts, _turns(row, side), side) for side in sides]
    prompt, chosen, rejected = split_pair(*conversations, fields=sides)
    source, id = "arena_human_preference", get_id(row, "id")
    return [PreferencePair(prompt, chosen, rejected, source=source, id=id)]


def _response_id(row: Mapping, key: str) -> int:
    value = get_field(row, key)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail("wrong_type", f"{key!r} must be 0 or 1, got {kind_of(value)}", key)
    if value not in (0, 1):
        raise fail("bad_value", f"{key!r} must be 0 or 1, got {value!r}", key)
    return int(value)


def _pku_saferlhf(row: Mapping, label: str) -> list[PreferencePair]:
    prompt = user_prompt(get_string(row, "prompt"), "prompt")
    responses = [assistant_reply(get_string(row, f"response_{i}"), f"response_{i}") for i in (0, 1)]
    if responses[0] == responses[1]:
        raise fail("identical", "response_0 and response_1 are the same text", "response_0")
    winner = _response_id(row, f"{label}_response_id")
    return [PreferencePair(prompt, responses[winner], responses[1 - winner], source=f"pku_saferlhf_{label}")]


@register("pku_saferlhf_better")
def read_pku_saferlhf_better(row: Mapping) -> list[PreferencePair]:
    """PKU-Alignment/PKU-SafeRLHF labelled by helpfulness: `prompt`, `response_0`/`response_1`, chosen =
    `better_response_id`."""
    return _pku_saferlhf(row, "better")


@register("pku_saferlhf_safer")
def read_pku_saferlhf_safer(row: Mapping) -> list[PreferencePair]:
    """PKU-Alignment/PKU-SafeRLHF labelled by harmlessness: `prompt`, `response_0`/`response_1`, chosen =
    `safer_response_id`."""
    return _pku_saferlhf(row, "safer")
