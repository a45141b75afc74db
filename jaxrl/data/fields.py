"""Row fields -> canonical pieces: the validators every reader shares, each failing with a RecordError that
names its reason and field.

A helper raises `fail(reason, message, field)`; `jaxrl.data.readers.read` re-raises it with the file and row
(`locate`). Messages are read the OpenAI way: `content` is a string or a list of text parts (joined as they
are), `developer` is a system turn, a `refusal` is the assistant's text; tool use and non-text parts are
refused by reason (see jaxrl.data.readers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from jaxrl.data.records import ROLES, Message, Messages, RecordError

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn
TOOL_ROLES = ("tool", "function", "ipython")
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


class SkipRow(Exception):
    """A well-formed row a reader leaves out on purpose (e.g. an arena tie): counted, never an error."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


def fail(reason: str, message: str, field: str = "") -> RecordError:
    """A RecordError for a row's field; `locate` adds the file and row."""
    err = RecordError(reason, message, field=field)
    err.detail = message  # the bare message, so read() can re-raise it with the file and row attached
    return err


def locate(err: RecordError, file: str, row: int | None) -> RecordError:
    """`err` again, naming the file and the 0-based row it came from."""
    detail = getattr(err, "detail", None) or str(err)
    message = f"{detail} (row is a 0-based index)" if row is not None else detail
    located = RecordError(err.reason, message, file=file, row=row, field=err.field)
    located.detail = detail
    return located


def kind_of(value: Any) -> str:
    """A JSON-ish name of a value's type, for error messages (null, bool, object, list, int, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    return {int: "int", float: "float", str: "string"}.get(type(value), type(value).__name__)


def field_label(where: str, key: str) -> str:
    """The dotted field name of `key` inside `where` (e.g. completions[0].response)."""
    return f"{where}.{key}" if where else key


def get_field(row: Mapping, key: str, where: str = "", optional: bool = False) -> Any:
    """row[key]; a missing or null required field is a missing_field error."""
    value = row.get(key)
    if value is None and not optional:
        raise fail("missing_field", f"missing required field {key!r}", field_label(where, key))
    return value


def check_text(value: str, field: str) -> str:
    """`value` if it encodes as UTF-8 (no lone surrogates), else an invalid_utf8 error."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from \ud800-style JSON escapes
        raise fail("invalid_utf8", f"text is not valid Unicode ({exc.reason})", field) from None
    return value


def get_string(row: Mapping, key: str, where: str = "", optional: bool = False) -> str | None:
    """A string field (None when optional and absent)."""
    value = get_field(row, key, where=where, optional=optional)
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail("wrong_type", f"{key!r} must be a string, got {kind_of(value)}", field_label(where, key))
    return check_text(value, field_label(where, key))


def get_number(row: Mapping, key: str, where: str = "", optional: bool = False) -> float | None:
    """A finite number field as a float (None when optional and absent); booleans are refused."""
    value = get_field(row, key, where=where, optional=optional)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail("wrong_type", f"{key!r} must be a number, got {kind_of(value)}", field_label(where, key))
    if not math.isfinite(value):
        raise fail("bad_value", f"{key!r} must be finite, got {value}", field_label(where, key))
    return float(value)


def get_list(row: Mapping, key: str, where: str = "") -> list:
    """A required list field."""
    value = get_field(row, key, where)
    if not isinstance(value, list | tuple):
        raise fail("wrong_type", f"{key!r} must be a list, got {kind_of(value)}", field_label(where, key))
    return list(value)


def as_object(value: Any, field: str) -> Mapping:
    """`value` if it is an object (a mapping), else a wrong_type error naming `field`."""
    if not isinstance(value, Mapping):
        raise fail("wrong_type", f"expected an object, got {kind_of(value)}", field)
    return value


def get_id(row: Mapping, key: str) -> str:
    """An optional string or integer id as a string ("" when absent)."""
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise fail("wrong_type", f"{key!r} must be a string or integer, got {kind_of(value)}", key)
    return check_text(str(value), key)


def _content_parts(parts: list, where: str) -> str:
    """OpenAI content parts: text (and refusal) parts joined as they are; any other part is non-text."""
    texts = []
    for index, part in enumerate(parts):
        at = f"{where}.content[{index}]"
        part = as_object(part, at)
        kind = get_string(part, "type", at)
        if kind not in TEXT_PARTS:
            raise fail(
                "non_text_content",
                f"a {kind!r} content part; only text parts can be trained on",
                f"{at}.type",
            )
        texts.append(get_string(part, TEXT_PARTS[kind], at))
    return "".join(texts)


def _message(item: Any, where: str) -> Message:
    """One chat message (OpenAI chat format): role, string or text-part content; tool calls are refused."""
    item = as_object(item, where)
    role = get_string(item, "role", where)
    role = ROLE_ALIASES.get(role, role)
    if role in TOOL_ROLES:
        raise fail(
            "tool_call",
            f"a {role!r} turn; tool use cannot be rendered by the chat templates",
            f"{where}.role",
        )
    if role not in ROLES:
        raise fail(
            "unknown_role", f"unknown role {role!r}; expected one of {ROLES} (or developer)", f"{where}.role"
        )
    for key in ("tool_calls", "function_call"):
        if item.get(key):
            raise fail(
                "tool_call",
                f"a message with {key!r}; tool use cannot be rendered by the chat templates",
                f"{where}.{key}",
            )
    weight = item.get("weight")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise fail("bad_value", f"'weight' must be 0 or 1, got {weight!r}", f"{where}.weight")
    if weight == 0:
        raise fail("unsupported", "a turn with weight 0 (not trained on) is unsupported", f"{where}.weight")
    content = item.get("content")
    if content is None and isinstance(item.get("refusal"), str):
        return Message(role, check_text(item["refusal"], f"{where}.refusal"))
    if isinstance(content, list | tuple):
        return Message(role, _content_parts(list(content), where))
    if content is not None and not isinstance(content, str):
        raise fail(
            "wrong_type",
            f"'content' must be a string or a list of text parts, got {kind_of(content)}",
            f"{where}.content",
        )
    return Message(role, get_string(item, "content", where))


def parse_messages(value: Any, field: str) -> Messages:
    """A list of chat messages (OpenAI chat format) as Messages."""
    if not isinstance(value, list | tuple):
        raise fail("wrong_type", f"{field!r} must be a list of messages, got {kind_of(value)}", field)
    return tuple(_message(item, f"{field}[{index}]") for index, item in enumerate(value))


def text_or_messages(value: Any, field: str, role: str) -> Messages:
    """A plain string becomes one `role` turn; a list is read as messages."""
    if isinstance(value, str):
        return (Message(role, check_text(value, field)),)
    return parse_messages(value, field)


def user_prompt(text: str, field: str) -> Messages:
    """A one-turn prompt from a string field."""
    if not text.strip():
        raise fail("empty_prompt", "empty prompt", field)
    return (Message("user", text),)


def assistant_reply(text: str, field: str) -> Messages:
    """A one-turn completion from a string field."""
    if not text.strip():
        raise fail("empty_response", "empty response", field)
    return (Message("assistant", text),)


def check_prompt(prompt: Messages, field: str) -> Messages:
    """`prompt` if it ends with a user turn and has no empty turn (an empty system turn aside)."""
    if not prompt or prompt[-1].role != "user":
        raise fail("bad_structure", "a prompt must end with a user turn", field)
    for index, message in enumerate(prompt):
        # An empty system prompt is harmless; an empty user turn is not a prompt.
        if message.role != "system" and not message.content.strip():
            raise fail(
                "empty_prompt", f"empty {message.role} turn in the prompt", f"{field}[{index}].content"
            )
    return prompt


def check_completion(completion: Messages, field: str, offset: int = 0) -> Messages:
    """`completion` if it starts and ends with an assistant turn and has no system or empty turn."""
    if not completion:
        raise fail("empty_response", "no assistant turn after the prompt", field)
    if completion[0].role != "assistant" or completion[-1].role != "assistant":
        raise fail("bad_structure", "a completion must start and end with an assistant turn", field)
    for index, message in enumerate(completion, start=offset):
        if message.role == "system":
            raise fail("bad_structure", "a system turn inside a completion", f"{field}[{index}].role")
        if not message.content.strip():
            reason = "empty_response" if message.role == "assistant" else "empty_prompt"
            raise fail(reason, f"empty {message.role} turn", f"{field}[{index}].content")
    return completion


def split_pair(chosen: Messages, rejected: Messages, fields=("chosen", "rejected")):
    """Splits two full conversations into (prompt, chosen tail, rejected tail) at their shared prefix."""
    if chosen == rejected:
        raise fail("identical", "chosen and rejected are the same conversation", fields[0])
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # The prompt ends at the last shared user turn; later shared assistant turns belong to both completions.
    while shared and chosen[shared - 1].role != "user":
        shared -= 1
    if not shared:
        raise fail("bad_structure", "chosen and rejected share no prompt ending with a user turn", fields[0])
    prompt = check_prompt(chosen[:shared], fields[0])
    return (
        prompt,
        check_completion(chosen[shared:], fields[0], offset=shared),
        check_completion(rejected[shared:], fields[1], offset=shared),
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_transcript(text: str, field: str) -> list[Message]:
    """Parses an Anthropic-style "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript into alternating turns."""
    body = text.lstrip("\n")
    if not body.startswith("Human:"):
        raise fail("bad_transcript", "a transcript must start with '\\n\\nHuman:'", field)
    parts = _HH_TURN.split("\n\n" + body)
    return alternating_turns(parts[1::2], parts[2::2], {"Human": "user", "Assistant": "assistant"}, field)


def alternating_turns(speakers, contents, roles: Mapping[str, str], field: str) -> list[Message]:
    """Messages from parallel speaker and content lists; two turns of one role in a row are an error."""
    out: list[Message] = []
    for speaker, content in zip(speakers, contents, strict=True):
        role = roles[speaker]
        if out and out[-1].role == role:
            raise fail("bad_transcript", f"two consecutive {speaker} turns", field)
        out.append(Message(role, content.strip()))
    return out
