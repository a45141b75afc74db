"""Readers for public preference datasets: files -> rows -> canonical records, with every bad row accounted.

`read(path, format)` loads JSONL / JSON / CSV / Parquet / Arrow / a `datasets.save_to_disk` directory (without
importing `datasets`) / a TFDS dataset version written by jaxrl.data.tfds_builder (format "tfds"), turns
each row into canonical records with the reader registered under `format`, and returns a `ReadResult` whose
counts always satisfy rows_read == rows_used + sum(dropped).

A malformed row raises `RecordError` naming file, row (0-based) and field, or with `on_error="skip"` is
counted under its reason. Reasons: missing_field, wrong_type, bad_value, empty_prompt, empty_response,
identical, unknown_role, bad_structure, bad_transcript, invalid_utf8, invalid_json, and for what jaxrl's chat
templates cannot render: tool_call (tool calls, tool turns, tool definitions), non_text_content (image, audio
or file parts) and unsupported (an OpenAI `weight: 0` turn). A row a reader leaves out on purpose (a tie,
reason "tie") raises `SkipRow` and is always counted, never an error.

Message lists are read the OpenAI way everywhere: `content` is a string or a list of text parts (joined
as they are), the `developer` role is a system turn, and a `refusal` is the assistant's text. A file
that cannot be read at all is a RecordError ("unreadable_file", "invalid_json") with no row, on any on_error.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import io
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jaxrl.data.records import (
    ROLES,
    Conversation,
    Message,
    Messages,
    PreferencePair,
    PromptRecord,
    RatedCompletions,
    RecordError,
    UnpairedExample,
)

ON_ERROR = ("raise", "skip")
# An object-wrapped JSON file keeps its rows under one of these keys; any other object is a single row.
JSON_ROW_KEYS = ("data", "rows", "examples", "instances", "records", "train", "test", "validation")
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
HELPSTEER_ASPECTS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
ARENA_WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn
TOOL_ROLES = ("tool", "function", "ipython")
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


class SkipRow(Exception):
    """A well-formed row a reader leaves out on purpose (e.g. an arena tie): counted, never an error."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


def _fail(reason: str, message: str, field: str = "") -> RecordError:
    err = RecordError(reason, message, field=field)
    err.detail = message  # the bare message, so read() can re-raise it with the file and row attached
    return err


def _locate(err: RecordError, file: str, row: int | None) -> RecordError:
    detail = getattr(err, "detail", None) or str(err)
    message = f"{detail} (row is a 0-based index)" if row is not None else detail
    located = RecordError(err.reason, message, file=file, row=row, field=err.field)
    located.detail = detail
    return located


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    return {int: "int", float: "float", str: "string"}.get(type(value), type(value).__name__)


def _label(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _value(row: Mapping, key: str, where: str = "", optional: bool = False) -> Any:
    value = row.get(key)
    if value is None and not optional:
        raise _fail("missing_field", f"missing required field {key!r}", _label(where, key))
    return value


def _check_text(value: str, field: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from \ud800-style JSON escapes
        raise _fail("invalid_utf8", f"text is not valid Unicode ({exc.reason})", field) from None
    return value


def _string(row: Mapping, key: str, where: str = "", optional: bool = False) -> str | None:
    value = _value(row, key, where=where, optional=optional)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail("wrong_type", f"{key!r} must be a string, got {_kind(value)}", _label(where, key))
    return _check_text(value, _label(where, key))


def _number(row: Mapping, key: str, where: str = "", optional: bool = False) -> float | None:
    value = _value(row, key, where=where, optional=optional)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail("wrong_type", f"{key!r} must be a number, got {_kind(value)}", _label(where, key))
    if not math.isfinite(value):
        raise _fail("bad_value", f"{key!r} must be finite, got {value}", _label(where, key))
    return float(value)


def _list(row: Mapping, key: str, where: str = "") -> list:
    value = _value(row, key, where)
    if not isinstance(value, list | tuple):
        raise _fail("wrong_type", f"{key!r} must be a list, got {_kind(value)}", _label(where, key))
    return list(value)


def _object(value: Any, field: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise _fail("wrong_type", f"expected an object, got {_kind(value)}", field)
    return value


def _identifier(row: Mapping, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _fail("wrong_type", f"{key!r} must be a string or integer, got {_kind(value)}", key)
    return _check_text(str(value), key)


def _content_parts(parts: list, where: str) -> str:
    """OpenAI content parts: text (and refusal) parts joined as they are; any other part is non-text."""
    texts = []
    for index, part in enumerate(parts):
        at = f"{where}.content[{index}]"
        part = _object(part, at)
        kind = _string(part, "type", at)
        if kind not in TEXT_PARTS:
            raise _fail("non_text_content", f"a {kind!r} content part; only text parts can be trained on",
                        f"{at}.type")
        texts.append(_string(part, TEXT_PARTS[kind], at))
    return "".join(texts)


def _message(item: Any, where: str) -> Message:
    """One chat message (OpenAI chat format): role, string or text-part content; tool calls are refused."""
    item = _object(item, where)
    role = _string(item, "role", where)
    role = ROLE_ALIASES.get(role, role)
    if role in TOOL_ROLES:
        raise _fail("tool_call", f"a {role!r} turn; tool use cannot be rendered by the chat templates",
                    f"{where}.role")
    if role not in ROLES:
        raise _fail("unknown_role", f"unknown role {role!r}; expected one of {ROLES} (or developer)",
                    f"{where}.role")
    for key in ("tool_calls", "function_call"):
        if item.get(key):
            raise _fail(
                "tool_call", f"a message with {key!r}; tool use cannot be rendered by the chat templates",
                f"{where}.{key}",
            )
    weight = item.get("weight")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise _fail("bad_value", f"'weight' must be 0 or 1, got {weight!r}", f"{where}.weight")
    if weight == 0:
        raise _fail("unsupported", "a turn with weight 0 (not trained on) is unsupported", f"{where}.weight")
    content = item.get("content")
    if content is None and isinstance(item.get("refusal"), str):
        return Message(role, _check_text(item["refusal"], f"{where}.refusal"))
    if isinstance(content, list | tuple):
        return Message(role, _content_parts(list(content), where))
    if content is not None and not isinstance(content, str):
        raise _fail("wrong_type", f"'content' must be a string or a list of text parts, got {_kind(content)}",
                    f"{where}.content")
    return Message(role, _string(item, "content", where))


def _messages(value: Any, field: str) -> Messages:
    if not isinstance(value, list | tuple):
        raise _fail("wrong_type", f"{field!r} must be a list of messages, got {_kind(value)}", field)
    return tuple(_message(item, f"{field}[{index}]") for index, item in enumerate(value))


def _text_messages(value: Any, field: str, role: str) -> Messages:
    """A plain string becomes one `role` turn; a list is read as messages."""
    if isinstance(value, str):
        return (Message(role, _check_text(value, field)),)
    return _messages(value, field)


def _user(text: str, field: str) -> Messages:
    """A one-turn prompt from a string field."""
    if not text.strip():
        raise _fail("empty_prompt", "empty prompt", field)
    return (Message("user", text),)


def _reply(text: str, field: str) -> Messages:
    """A one-turn completion from a string field."""
    if not text.strip():
        raise _fail("empty_response", "empty response", field)
    return (Message("assistant", text),)


def _check_prompt(prompt: Messages, field: str) -> Messages:
    if not prompt or prompt[-1].role != "user":
        raise _fail("bad_structure", "a prompt must end with a user turn", field)
    for index, message in enumerate(prompt):
        # An empty system prompt is harmless; an empty user turn is not a prompt.
        if message.role != "system" and not message.content.strip():
            raise _fail(
                "empty_prompt", f"empty {message.role} turn in the prompt", f"{field}[{index}].content"
            )
    return prompt


def _check_completion(completion: Messages, field: str, offset: int = 0) -> Messages:
    if not completion:
        raise _fail("empty_response", "no assistant turn after the prompt", field)
    if completion[0].role != "assistant" or completion[-1].role != "assistant":
        raise _fail("bad_structure", "a completion must start and end with an assistant turn", field)
    for index, message in enumerate(completion, start=offset):
        if message.role == "system":
            raise _fail("bad_structure", "a system turn inside a completion", f"{field}[{index}].role")
        if not message.content.strip():
            reason = "empty_response" if message.role == "assistant" else "empty_prompt"
            raise _fail(reason, f"empty {message.role} turn", f"{field}[{index}].content")
    return completion


def _split_pair(chosen: Messages, rejected: Messages, fields=("chosen", "rejected")):
    """Splits two full conversations into (prompt, chosen tail, rejected tail) at their shared prefix."""
    if chosen == rejected:
        raise _fail("identical", "chosen and rejected are the same conversation", fields[0])
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # The prompt ends at the last shared user turn; later shared assistant turns belong to both completions.
    while shared and chosen[shared - 1].role != "user":
        shared -= 1
    if not shared:
        raise _fail("bad_structure", "chosen and rejected share no prompt ending with a user turn", fields[0])
    prompt = _check_prompt(chosen[:shared], fields[0])
    return (
        prompt,
        _check_completion(chosen[shared:], fields[0], offset=shared),
        _check_completion(rejected[shared:], fields[1], offset=shared),
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HELPSTEER_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")


def _parse_transcript(text: str, field: str) -> list[Message]:
    """Parses an Anthropic-style "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript into alternating turns."""
    body = text.lstrip("\n")
    if not body.startswith("Human:"):
        raise _fail("bad_transcript", "a transcript must start with '\\n\\nHuman:'", field)
    parts = _HH_TURN.split("\n\n" + body)
    return _alternating(parts[1::2], parts[2::2], {"Human": "user", "Assistant": "assistant"}, field)


def _alternating(speakers, contents, roles: Mapping[str, str], field: str) -> list[Message]:
    out: list[Message] = []
    for speaker, content in zip(speakers, contents, strict=True):
        role = roles[speaker]
        if out and out[-1].role == role:
            raise _fail("bad_transcript", f"two consecutive {speaker} turns", field)
        out.append(Message(role, content.strip()))
    return out


@dataclasses.dataclass(frozen=True)
class Reader:
    """A named row -> records function, with an optional whole-file step (e.g. grouping rows by prompt)."""

    name: str
    parse: Callable[[Mapping[str, Any]], list]
    combine: Callable[[list], list] | None = None

    def __call__(self, row: Any) -> list:
        """Converts one row into a list of canonical records; raises RecordError or SkipRow."""
        if not isinstance(row, Mapping):
            raise _fail("wrong_type", f"a row must be an object, got {_kind(row)}")
        return self.parse(row)


READERS: dict[str, Reader] = {}


def register(name: str, *, combine: Callable[[list], list] | None = None):
    """Registers a row reader under `name` (a decorator)."""

    def decorate(parse):
        READERS[name] = Reader(name, parse, combine)
        return parse

    return decorate


def get_reader(name: str) -> Reader:
    """The reader registered under `name`; a clear error lists the known names."""
    if name not in READERS:
        raise ValueError(f"unknown format {name!r}; known formats: {sorted(READERS)}")
    return READERS[name]


@register("tulu25")
def read_tulu25(row: Mapping) -> list[PreferencePair]:
    """allenai/tulu-2.5-preference-data: full `chosen`/`rejected` conversations sharing a prompt prefix."""
    prompt, chosen, rejected = _split_pair(
        _messages(_value(row, "chosen"), "chosen"),
        _messages(_value(row, "rejected"), "rejected"),
    )
    source = _string(row, "source", optional=True) or "tulu25"
    return [PreferencePair(prompt, chosen, rejected, source=source, id=_identifier(row, "id"))]


def _ultrafeedback_rating(entry: Any, field: str) -> float | None:
    """One aspect's `Rating` string ("1".."5" or "N/A"); a list of annotations is averaged."""
    entries = entry if isinstance(entry, list | tuple) else [entry]
    values = []
    for index, item in enumerate(entries):
        where = f"{field}[{index}]" if isinstance(entry, list | tuple) else field
        rating = _object(item, where).get("Rating")
        if rating is None or (isinstance(rating, str) and rating.strip().upper() == "N/A"):
            continue
        if isinstance(rating, bool) or not isinstance(rating, str | int | float):
            raise _fail("wrong_type", f"'Rating' must be a string, got {_kind(rating)}", f"{where}.Rating")
        try:
            value = float(rating)
        except ValueError:
            raise _fail("bad_value", f"unparseable rating {rating!r}", f"{where}.Rating") from None
        if not math.isfinite(value):
            raise _fail("bad_value", f"unparseable rating {rating!r}", f"{where}.Rating")
        values.append(value)
    return sum(values) / len(values) if values else None


def _optional_score(completion: Mapping, key: str, where: str) -> float | None:
    value = completion.get(key)
    if isinstance(value, float) and math.isnan(value):
        return None  # UltraFeedback stores some unrated scores as NaN
    return _number(completion, key, where, optional=True)


def _ultrafeedback_ratings(completion: Mapping, where: str) -> dict[str, float]:
    annotations = _object(_value(completion, "annotations", where), f"{where}.annotations")
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
    prompt = _user(_string(row, "instruction"), "instruction")
    completions, ratings = [], []
    for index, item in enumerate(_list(row, "completions")):
        where = f"completions[{index}]"
        item = _object(item, where)
        completions.append(_reply(_string(item, "response", where), f"{where}.response"))
        ratings.append(_ultrafeedback_ratings(item, where))
    if not completions:
        raise _fail("bad_structure", "no completions", "completions")
    return [RatedCompletions(prompt, tuple(completions), tuple(ratings), source="ultrafeedback")]


@register("ultrafeedback_binarized")
def read_ultrafeedback_binarized(row: Mapping) -> list[PreferencePair]:
    """HuggingFaceH4/ultrafeedback_binarized: message-list pairs; margin = score_chosen - score_rejected;
    equal scores are a counted `tie`."""
    _string(row, "prompt", optional=True)
    prompt, chosen, rejected = _split_pair(
        _messages(_value(row, "chosen"), "chosen"),
        _messages(_value(row, "rejected"), "rejected"),
    )
    margin = _number(row, "score_chosen") - _number(row, "score_rejected")
    if margin < 0:
        raise _fail("bad_value", "score_chosen is below score_rejected", "score_chosen")
    if margin == 0:
        raise SkipRow("tie", "score_chosen equals score_rejected: no preference")
    pair = PreferencePair(
        prompt, chosen, rejected, margin, "ultrafeedback_binarized", _identifier(row, "prompt_id")
    )
    return [pair]


@register("hh_rlhf")
def read_hh_rlhf(row: Mapping) -> list[PreferencePair]:
    """Anthropic/hh-rlhf: raw "\\n\\nHuman:/\\n\\nAssistant:" transcripts; the shared prefix is the prompt."""
    chosen = _parse_transcript(_string(row, "chosen"), "chosen")
    rejected = _parse_transcript(_string(row, "rejected"), "rejected")
    prompt, chosen_tail, rejected_tail = _split_pair(tuple(chosen), tuple(rejected))
    return [PreferencePair(prompt, chosen_tail, rejected_tail, source="hh_rlhf")]


def _shp_margin(chosen_score: float, rejected_score: float) -> float | None:
    # log of SHP's score ratio: scale-free across subreddits of very different traffic, 0 for equal scores.
    if chosen_score > 0 and rejected_score > 0:
        return math.log(chosen_score / rejected_score)
    return None


@register("shp")
def read_shp(row: Mapping) -> list[PreferencePair]:
    """stanfordnlp/SHP: `history`, `human_ref_A/B`, `labels` (1: A preferred); margin = log(score ratio)."""
    prompt = _user(_string(row, "history"), "history")
    refs = {side: _reply(_string(row, f"human_ref_{side}"), f"human_ref_{side}") for side in "AB"}
    label = _value(row, "labels")
    if isinstance(label, bool) or not isinstance(label, int):
        raise _fail("wrong_type", f"'labels' must be 0 or 1, got {_kind(label)}", "labels")
    if label not in (0, 1):
        raise _fail("bad_value", f"'labels' must be 0 or 1, got {label}", "labels")
    win, lose = ("A", "B") if label == 1 else ("B", "A")
    if refs[win] == refs[lose]:
        raise _fail("identical", "human_ref_A and human_ref_B are the same text", "human_ref_A")
    win_score, lose_score = _number(row, f"score_{win}"), _number(row, f"score_{lose}")
    if win_score < lose_score:
        raise _fail("bad_value", f"labels prefers {win} but score_{win} < score_{lose}", "labels")
    margin = _shp_margin(win_score, lose_score)
    return [PreferencePair(prompt, refs[win], refs[lose], margin, "shp", _identifier(row, "post_id"))]


def _helpsteer_prompt(text: str) -> Messages:
    """HelpSteer2 writes multi-turn prompts as "u1\\n<extra_id_1>Assistant\\na1\\n<extra_id_1>User\\nu2"."""
    if "<extra_id_1>" not in text:
        return (Message("user", text),)
    parts = _HELPSTEER_TURN.split(text)
    speakers, contents = ["User", *parts[1::2]], [parts[0], *parts[2::2]]
    return tuple(_alternating(speakers, contents, {"User": "user", "Assistant": "assistant"}, "prompt"))


def _group_by_prompt(records: list[RatedCompletions]) -> list[RatedCompletions]:
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
    """nvidia/HelpSteer(2): one rated response per row; read() groups rows by prompt."""
    prompt = _check_prompt(_helpsteer_prompt(_string(row, "prompt")), "prompt")
    response = _reply(_string(row, "response"), "response")
    ratings = {aspect: _number(row, aspect) for aspect in HELPSTEER_ASPECTS}
    return [RatedCompletions(prompt, (response,), (ratings,), source="helpsteer")]


@register("nectar")
def read_nectar(row: Mapping) -> list[RatedCompletions]:
    """berkeley-nest/Nectar: transcript `prompt` and ranked `answers`; rating = -rank (rank 1 is best)."""
    turns = _parse_transcript(_string(row, "prompt"), "prompt")
    if turns and turns[-1].role == "assistant" and not turns[-1].content:
        turns = turns[:-1]  # the prompt ends with an empty "\n\nAssistant:" cue for the answers
    prompt = _check_prompt(tuple(turns), "prompt")
    completions, ratings = [], []
    for index, item in enumerate(_list(row, "answers")):
        where = f"answers[{index}]"
        item = _object(item, where)
        completions.append(_reply(_string(item, "answer", where), f"{where}.answer"))
        ratings.append(-_number(item, "rank", where))
    if not completions:
        raise _fail("bad_structure", "no answers", "answers")
    return [RatedCompletions(prompt, tuple(completions), tuple(ratings), source="nectar")]


@register("chatbot_arena")
def read_chatbot_arena(row: Mapping) -> list[PreferencePair]:
    """lmsys/chatbot_arena_conversations: two conversations and a `winner`; ties are skipped as `tie`."""
    winner = _string(row, "winner")
    if winner not in ARENA_WINNERS:
        raise _fail("bad_value", f"unknown winner {winner!r}; expected one of {ARENA_WINNERS}", "winner")
    if winner.startswith("tie"):
        raise SkipRow("tie", f"winner is {winner!r}")
    sides = ("conversation_a", "conversation_b")
    if winner == "model_b":
        sides = sides[::-1]
    conversations = [_messages(_value(row, side), side) for side in sides]
    prompt, chosen, rejected = _split_pair(*conversations, fields=sides)
    return [
        PreferencePair(prompt, chosen, rejected, source="chatbot_arena", id=_identifier(row, "question_id"))
    ]


def _ground_truth(row: Mapping) -> str | None:
    for key in ("ground_truth", "answer", "solution"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _fail("wrong_type", f"{key!r} must be a string or number, got {_kind(value)}", key)
        return _check_text(str(value), key)
    return None


@register("prompts")
def read_prompts(row: Mapping) -> list[PromptRecord]:
    """Generic prompt files: `messages` (or a `prompt` string), optional `ground_truth`/`answer` and `id`."""
    if row.get("messages") is not None:
        prompt = _check_prompt(_messages(row["messages"], "messages"), "messages")
    else:
        prompt = _user(_string(row, "prompt"), "prompt")
    source = _string(row, "source", optional=True) or "prompts"
    return [PromptRecord(prompt, _ground_truth(row), source, _identifier(row, "id"))]


@register("sft")
def read_sft(row: Mapping) -> list[Conversation]:
    """SFT conversations: a `messages` list with at least one assistant turn."""
    return [_conversation(row, "sft")]


def _conversation(row: Mapping, default_source: str) -> Conversation:
    """A `messages` conversation with at least one assistant turn and no empty turn (system aside)."""
    messages = _messages(_value(row, "messages"), "messages")
    if not any(m.role == "assistant" for m in messages):
        raise _fail("bad_structure", "no assistant turn to train on", "messages")
    for index, message in enumerate(messages):
        if message.role != "system" and not message.content.strip():
            reason = "empty_response" if message.role == "assistant" else "empty_prompt"
            raise _fail(reason, f"empty {message.role} turn", f"messages[{index}].content")
    source = _string(row, "source", optional=True) or default_source
    return Conversation(messages, source, _identifier(row, "id"))


def _unpaired(row: Mapping, source: str) -> list[UnpairedExample]:
    prompt = _check_prompt(_text_messages(_value(row, "prompt"), "prompt", "user"), "prompt")
    completion = _text_messages(_value(row, "completion"), "completion", "assistant")
    _check_completion(completion, "completion")
    label = _value(row, "label")
    if not isinstance(label, bool):
        raise _fail("wrong_type", f"'label' must be a boolean, got {_kind(label)}", "label")
    source = _string(row, "source", optional=True) or source
    return [UnpairedExample(prompt, completion, label, source, _identifier(row, "id"))]


@register("unpaired")
def read_unpaired(row: Mapping) -> list[UnpairedExample]:
    """KTO-style rows: `prompt` and `completion` (strings or message lists) and a boolean `label`."""
    return _unpaired(row, "unpaired")


@register("trl_unpaired")
def read_trl_unpaired(row: Mapping) -> list[UnpairedExample]:
    """TRL's unpaired preference format (KTO): `prompt`, `completion` (standard strings or conversational
    message lists) and a boolean `label` (True: desirable)."""
    return _unpaired(row, "trl_unpaired")


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list | tuple)


def _split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit prompt of two strings: their shared prefix, a space at its end left to the answers."""
    if chosen == rejected:
        raise _fail("identical", "chosen and rejected are the same text", "chosen")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared and chosen[shared - 1] == " ":
        shared -= 1
    if not chosen[:shared].strip():
        raise _fail("bad_structure", "chosen and rejected share no prompt prefix", "chosen")
    return chosen[:shared], chosen[shared:], rejected[shared:]


@register("trl_preference")
def read_trl_preference(row: Mapping) -> list[PreferencePair]:
    """TRL's preference format, standard (strings) or conversational (message lists), with an explicit
    `prompt` or an implicit one (the shared prefix of `chosen` and `rejected`). As in TRL, a `prompt` of the
    other kind than `chosen` (a string beside full conversations, as ultrafeedback_binarized has) is
    ignored."""
    chosen, rejected, prompt = _value(row, "chosen"), _value(row, "rejected"), row.get("prompt")
    conversational = _is_conversational(chosen)
    if prompt is not None and _is_conversational(prompt) != conversational:
        prompt = None
    if conversational:
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if prompt is None:
            prompt, chosen, rejected = _split_pair(chosen, rejected)
        else:
            prompt = _check_prompt(_messages(prompt, "prompt"), "prompt")
            _check_completion(chosen, "chosen")
            _check_completion(rejected, "rejected")
    else:
        chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
        if prompt is None:
            prompt, chosen, rejected = _split_text(chosen, rejected)
        else:
            prompt = _string(row, "prompt")
        prompt = _user(prompt, "prompt")
        chosen, rejected = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if chosen == rejected:
        raise _fail("identical", "chosen and rejected are the same completion", "chosen")
    source = _string(row, "source", optional=True) or "trl_preference"
    return [PreferencePair(prompt, chosen, rejected, source=source, id=_identifier(row, "id"))]


@register("trl_prompt_only")
def read_trl_prompt_only(row: Mapping) -> list[PromptRecord]:
    """TRL's prompt-only format (online RL): `prompt`, a string or a message list ending with a user turn;
    an optional `ground_truth`, `answer` or `solution` for verifiable rewards."""
    prompt = _value(row, "prompt")
    if _is_conversational(prompt):
        prompt = _check_prompt(_messages(prompt, "prompt"), "prompt")
    else:
        prompt = _user(_string(row, "prompt"), "prompt")
    source = _string(row, "source", optional=True) or "trl_prompt_only"
    return [PromptRecord(prompt, _ground_truth(row), source, _identifier(row, "id"))]


def _no_tools(row: Mapping, key: str = "tools", where: str = "") -> None:
    for name in (key, "functions"):
        if row.get(name):
            raise _fail("tool_call", f"tool definitions ({name!r}) cannot be rendered by the chat templates",
                        _label(where, name))


@register("openai_chat")
def read_openai_chat(row: Mapping) -> list[Conversation]:
    """OpenAI's chat fine-tuning format: `messages` with string or text-part `content`, `developer` as system;
    tool calls, tool turns, tool definitions and non-text parts are errors (or counted skips) by reason."""
    _no_tools(row)
    return [_conversation(row, "openai_chat")]


@register("openai_dpo")
def read_openai_dpo(row: Mapping) -> list[PreferencePair]:
    """OpenAI's preference (DPO) fine-tuning format: `input.messages` (the prompt), `preferred_output` and
    `non_preferred_output` (assistant message lists)."""
    given = _object(_value(row, "input"), "input")
    _no_tools(given, where="input")
    prompt = _check_prompt(_messages(_value(given, "messages", "input"), "input.messages"), "input.messages")
    chosen = _check_completion(
        _messages(_value(row, "preferred_output"), "preferred_output"), "preferred_output"
    )
    rejected = _check_completion(
        _messages(_value(row, "non_preferred_output"), "non_preferred_output"), "non_preferred_output"
    )
    if chosen == rejected:
        raise _fail("identical", "preferred and non-preferred outputs are the same", "preferred_output")
    return [PreferencePair(prompt, chosen, rejected, source="openai_dpo", id=_identifier(row, "id"))]


def _preference_strength(row: Mapping, key: str) -> int:
    """A -3..3 preference (negative: the first response is better); 0 is a counted tie."""
    value = _number(row, key)
    if not value.is_integer() or not -3 <= value <= 3:
        raise _fail("bad_value", f"{key!r} must be an integer from -3 to 3, got {value:g}", key)
    if value == 0:
        raise SkipRow("tie", f"{key} is 0: the responses are about the same")
    return int(value)


def _strength_pair(prompt: Messages, first: Messages, second: Messages, strength: int, fields, source: str,
                   id: str = "") -> PreferencePair:
    if first == second:
        raise _fail("identical", "the two responses are the same text", fields[0])
    chosen, rejected = (first, second) if strength < 0 else (second, first)
    return PreferencePair(prompt, chosen, rejected, float(abs(strength)), source, id)


@register("helpsteer3")
def read_helpsteer3(row: Mapping) -> list[PreferencePair]:
    """nvidia/HelpSteer3 (preference): `context` (messages), `response1`, `response2` and `overall_preference`
    from -3 (response1 much better) to 3 (response2 much better); margin = |overall_preference|; 0: a tie."""
    prompt = _check_prompt(_messages(_value(row, "context"), "context"), "context")
    first = _reply(_string(row, "response1"), "response1")
    second = _reply(_string(row, "response2"), "response2")
    strength = _preference_strength(row, "overall_preference")
    return [_strength_pair(prompt, first, second, strength, ("response1", "response2"), "helpsteer3")]


@register("helpsteer2_preference")
def read_helpsteer2_preference(row: Mapping) -> list[PreferencePair]:
    """nvidia/HelpSteer2 preference/preference.jsonl.gz: `prompt` (HelpSteer2 turns), `response_1`,
    `response_2` and `preference_strength` from -3 (response_1 much better) to 3; margin = |strength|; 0 is a
    tie."""
    prompt = _check_prompt(_helpsteer_prompt(_string(row, "prompt")), "prompt")
    first = _reply(_string(row, "response_1"), "response_1")
    second = _reply(_string(row, "response_2"), "response_2")
    strength = _preference_strength(row, "preference_strength")
    fields = ("response_1", "response_2")
    return [_strength_pair(prompt, first, second, strength, fields, "helpsteer2_preference")]


def _flag(row: Mapping, key: str) -> bool:
    """A 0/1 column, as an integer, a boolean or (CSV) a string."""
    value = _value(row, key)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return value.strip() == "1"
    if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
        return bool(value)
    if isinstance(value, int | float):
        raise _fail("bad_value", f"{key!r} must be 0 or 1, got {value!r}", key)
    raise _fail("wrong_type", f"{key!r} must be 0 or 1, got {_kind(value)}", key)


def _turns(row: Mapping, key: str) -> list[str | None]:
    """A list of turn texts, or the JSON text of one (the arena CSV stores '["turn 1", "turn 2"]')."""
    value = _value(row, key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _fail("bad_value", f"{key!r} must be a JSON list of strings", key) from None
    if not isinstance(value, list | tuple) or not value:
        raise _fail("wrong_type", f"{key!r} must be a non-empty list of strings, got {_kind(value)}", key)
    for index, text in enumerate(value):
        if text is not None and not isinstance(text, str):
            raise _fail("wrong_type", f"turn {index} must be a string, got {_kind(text)}", f"{key}[{index}]")
    return list(value)


def _arena_conversation(prompts: list, responses: list, key: str) -> Messages:
    if len(responses) != len(prompts):
        raise _fail("bad_structure", f"{len(prompts)} prompts but {len(responses)} responses", key)
    out = []
    for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if prompt is None or not prompt.strip():
            raise _fail("empty_prompt", f"empty user turn {index}", f"prompt[{index}]")
        if response is None or not response.strip():
            raise _fail("empty_response", f"empty response turn {index}", f"{key}[{index}]")
        out += [Message("user", _check_text(prompt, f"prompt[{index}]")),
                Message("assistant", _check_text(response, f"{key}[{index}]"))]
    return tuple(out)


@register("arena_human_preference")
def read_arena_human_preference(row: Mapping) -> list[PreferencePair]:
    """lmsys/lmsys-arena-human-preference-55k (train.csv or Parquet): `prompt`, `response_a`, `response_b`
    (JSON lists, one entry per turn) and one-hot `winner_model_a` / `winner_model_b` / `winner_tie`; ties are
    skipped."""
    winners = {key: _flag(row, f"winner_{key}") for key in ("model_a", "model_b", "tie")}
    if sum(winners.values()) != 1:
        raise _fail("bad_value", f"exactly one winner column must be 1, got {winners}", "winner_model_a")
    if winners["tie"]:
        raise SkipRow("tie", "winner_tie is 1")
    prompts = _turns(row, "prompt")
    sides = ("response_a", "response_b") if winners["model_a"] else ("response_b", "response_a")
    conversations = [_arena_conversation(prompts, _turns(row, side), side) for side in sides]
    prompt, chosen, rejected = _split_pair(*conversations, fields=sides)
    source, id = "arena_human_preference", _identifier(row, "id")
    return [PreferencePair(prompt, chosen, rejected, source=source, id=id)]


def _response_id(row: Mapping, key: str) -> int:
    value = _value(row, key)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail("wrong_type", f"{key!r} must be 0 or 1, got {_kind(value)}", key)
    if value not in (0, 1):
        raise _fail("bad_value", f"{key!r} must be 0 or 1, got {value!r}", key)
    return int(value)


def _pku_saferlhf(row: Mapping, label: str) -> list[PreferencePair]:
    prompt = _user(_string(row, "prompt"), "prompt")
    responses = [_reply(_string(row, f"response_{i}"), f"response_{i}") for i in (0, 1)]
    if responses[0] == responses[1]:
        raise _fail("identical", "response_0 and response_1 are the same text", "response_0")
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


@register("tfds")
def read_tfds(row: Mapping) -> list:
    """A dataset prepared by jaxrl.data.tfds_builder: `record` (a canonical record as JSON) and its `kind`."""
    from jaxrl.data import tfds_builder

    text = _value(row, "record")
    if not isinstance(text, str | bytes):
        raise _fail("wrong_type", f"'record' must be JSON text, got {_kind(text)}", "record")
    record = tfds_builder.record_from_json(text)
    kind = row.get("kind")
    kind = kind.decode("utf-8", "replace") if isinstance(kind, bytes) else kind
    if kind is not None and kind != type(record).__name__:
        raise _fail("bad_value", f"'kind' is {kind!r} but the record is a {type(record).__name__}", "kind")
    return [record]


RawRows = Iterator[tuple[int, Any]]  # (0-based row index, dict or the RecordError that row raised)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _jsonl_row(raw: bytes, first: bool) -> Any:
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return _fail("invalid_utf8", f"invalid UTF-8 at byte {exc.start} of the line ({exc.reason})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return _fail("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(row, dict):
        return _fail("wrong_type", f"a row must be a JSON object, got {_kind(row)}")
    return row


def _iter_jsonl(path: Path) -> RawRows:
    # Row index = 0-based line index; blank lines are not rows.
    with _open_binary(path) as handle:
        for index, raw in enumerate(handle):
            if raw.strip():
                yield index, _jsonl_row(raw, index == 0)


def _json_rows(document: Any, path: Path) -> list:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        for key in JSON_ROW_KEYS:
            if isinstance(document.get(key), list):
                return document[key]
        return [document]
    raise RecordError(
        "wrong_type", f"a JSON file must hold a list or an object, got {_kind(document)}", file=str(path)
    )


def _iter_json(path: Path) -> RawRows:
    with _open_binary(path) as handle:
        data = handle.read()
    looks_like_array = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"["
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        if looks_like_array:
            reason = "invalid_utf8" if isinstance(exc, UnicodeDecodeError) else "invalid_json"
            raise RecordError(reason, f"unreadable JSON document: {exc}", file=str(path)) from None
        yield from _iter_jsonl(path)  # e.g. stanfordnlp/SHP ships JSON Lines named *.json
        return
    for index, row in enumerate(_json_rows(document, path)):
        yield (
            index,
            row
            if isinstance(row, dict)
            else _fail("wrong_type", f"a row must be an object, got {_kind(row)}"),
        )


def _iter_csv(path: Path) -> RawRows:
    """A CSV file with a header row (e.g. the arena 55k train.csv); every value is a string. Row index =
    0-based data row (quoted fields may span lines)."""
    csv.field_size_limit(2**31 - 1)  # arena conversations exceed the 128 KiB default
    with _open_binary(path) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")
        yield from enumerate(csv.DictReader(text))


def _iter_batches(batches) -> RawRows:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _iter_parquet(path: Path) -> RawRows:
    yield from _iter_batches(pq.ParquetFile(path).iter_batches(batch_size=1024))


def _arrow_batches(path: Path):
    # `datasets` writes the IPC *stream* format; the IPC file format is accepted too.
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            yield from (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            return
        yield from reader


def _iter_arrow(path: Path) -> RawRows:
    yield from _iter_batches(_arrow_batches(path))


def _iter_saved_dataset(path: Path) -> RawRows:
    """A `datasets.Dataset.save_to_disk` directory: state.json lists the .arrow shards in order."""
    state_path, info_path = path / "state.json", path / "dataset_info.json"
    if not state_path.is_file() or not info_path.is_file():
        splits_path = path / "dataset_dict.json"
        if splits_path.is_file():
            splits = json.loads(splits_path.read_text(encoding="utf-8")).get("splits", [])
            raise ValueError(
                f"{path} is a saved DatasetDict with splits {splits}; read one split, e.g. {path}/<split>"
            )
        versions = sorted((p.parent.name for p in path.glob("*/features.json")),
                          key=lambda v: [int(x) if x.isdigit() else -1 for x in v.split(".")])
        hint = f"; it has TFDS versions {versions}: read one, e.g. {path / versions[-1]}" if versions else ""
        raise ValueError(f"{path} is not a save_to_disk directory (needs state.json and dataset_info.json) "
                         f"nor a prepared TFDS dataset version (needs features.json and dataset_info.json)"
                         f"{hint}")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    json.loads(
        info_path.read_text(encoding="utf-8")
    )  # features are also in the Arrow schema; check it parses
    columns = state.get("_format_columns")
    keep = None if columns is None or state.get("_output_all_columns") else set(columns)
    shards = [path / entry["filename"] for entry in state.get("_data_files", [])]
    batches = (batch for shard in shards for batch in _arrow_batches(shard))
    for index, row in _iter_batches(batches):
        yield index, row if keep is None else {k: v for k, v in row.items() if k in keep}


def _iter_tfds(path: Path) -> RawRows:
    """A dataset version prepared by jaxrl.data.tfds_builder (features.json + dataset_info.json), in order."""
    from jaxrl.data import tfds_builder

    try:
        for index, example in tfds_builder.iter_examples(path):
            yield index, {"record": example["record"], "kind": example["kind"]}
    except RuntimeError as exc:  # array_record's error for a damaged file
        raise RecordError("unreadable_file", f"cannot read: {exc}", file=str(path)) from None


def _raw_rows(path: Path) -> RawRows:
    name = path.name.lower()
    if path.is_dir():
        if (path / "features.json").is_file() and (path / "dataset_info.json").is_file():
            return _iter_tfds(path)
        return _iter_saved_dataset(path)
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return _iter_jsonl(path)
    if name.endswith((".json", ".json.gz")):
        return _iter_json(path)
    if name.endswith((".csv", ".csv.gz")):
        return _iter_csv(path)
    if name.endswith(".parquet"):
        return _iter_parquet(path)
    if name.endswith(".arrow"):
        return _iter_arrow(path)
    raise ValueError(
        f"cannot tell the layout of {path}: expected .jsonl, .json, .csv, .parquet, .arrow or a directory"
    )


def _guarded(path: Path) -> RawRows:
    """Rows of `path`; a file-level failure (missing, corrupt) is a RecordError naming the file."""
    try:
        yield from _raw_rows(path)
    except (OSError, pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
            csv.Error) as exc:
        raise RecordError(
            "unreadable_file", f"cannot read: {type(exc).__name__}: {exc}", file=str(path)
        ) from None


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yields (0-based row index, row dict) from a JSONL/JSON/Parquet/Arrow file or save_to_disk directory."""
    path = Path(path)
    for index, row in _guarded(path):
        if isinstance(row, RecordError):
            raise _locate(row, str(path), index)
        yield index, row


@dataclasses.dataclass
class ReadResult:
    """Records from one file and the accounting of every row: rows_read == rows_used + sum(dropped)."""

    records: list = dataclasses.field(default_factory=list)
    rows_read: int = 0
    rows_used: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    path: str = ""
    format: str = ""

    def summary(self) -> str:
        """One line: rows read N = used U + dropped D (reason: count, ...)."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.dropped.items()))
        line = f"rows read {self.rows_read} = used {self.rows_used} + dropped {sum(self.dropped.values())}"
        return f"{line} ({reasons})" if reasons else line


def read(
    path: str | Path,
    format: str,
    *,
    on_error: str = "raise",
    source: str | None = None,
    limit: int | None = None,
) -> ReadResult:
    """Reads `path` with the reader named `format`; a bad row raises RecordError or, on "skip", is counted."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    reader, path = get_reader(format), Path(path)
    result = ReadResult(path=str(path), format=format)
    for index, row in _guarded(path):
        if limit is not None and result.rows_read >= limit:
            break
        result.rows_read += 1
        try:
            if isinstance(row, RecordError):
                raise row
            records = reader(row)
        except SkipRow as skip:
            result.dropped[skip.reason] += 1
            continue
        except RecordError as err:
            if on_error == "raise":
                raise _locate(err, str(path), index) from None
            result.dropped[err.reason] += 1
            continue
        result.rows_used += 1
        result.records.extend(records)
    if reader.combine is not None:
        result.records = reader.combine(result.records)
    if source is not None:
        result.records = [dataclasses.replace(record, source=source) for record in result.records]
    return result
