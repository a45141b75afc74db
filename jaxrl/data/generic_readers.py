"""Readers of generic formats, each registered under its name: prompt files (prompts, trl_prompt_only), SFT
conversations (sft, openai_chat), pairs (trl_preference, openai_dpo), unpaired KTO rows (unpaired,
trl_unpaired) and a dataset prepared by jaxrl.data.tfds_builder (tfds)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxrl.data import tfds_source
from jaxrl.data.fields import (
    as_object,
    assistant_reply,
    check_completion,
    check_prompt,
    check_text,
    fail,
    field_label,
    get_field,
    get_id,
    get_string,
    kind_of,
    parse_messages,
    split_pair,
    text_or_messages,
    user_prompt,
)
from jaxrl.data.records import Conversation, PreferencePair, PromptRecord, UnpairedExample
from jaxrl.data.registry import register


def _ground_truth(row: Mapping) -> str | None:
    for key in ("ground_truth", "answer", "solution"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise fail("wrong_type", f"{key!r} must be a string or number, got {kind_of(value)}", key)
        return check_text(str(value), key)
    return None


@register("prompts")
def read_prompts(row: Mapping) -> list[PromptRecord]:
    """Generic prompt files: `messages` (or a `prompt` string), optional `ground_truth`/`answer` and `id`."""
    if row.get("messages") is not None:
        prompt = check_prompt(parse_messages(row["messages"], "messages"), "messages")
    else:
        prompt = user_prompt(get_string(row, "prompt"), "prompt")
    source = get_string(row, "source", optional=True) or "prompts"
    return [PromptRecord(prompt, _ground_truth(row), source, get_id(row, "id"))]


@register("sft")
def read_sft(row: Mapping) -> list[Conversation]:
    """SFT conversations: a `messages` list with at least one assistant turn."""
    return [_conversation(row, "sft")]


def _conversation(row: Mapping, default_source: str) -> Conversation:
    """A `messages` conversation with at least one assistant turn and no empty turn (system aside)."""
    messages = parse_messages(get_field(row, "messages"), "messages")
    if not any(m.role == "assistant" for m in messages):
        raise fail("bad_structure", "no assistant turn to train on", "messages")
    for index, message in enumerate(messages):
        if message.role != "system" and not message.content.strip():
            reason = "empty_response" if message.role == "assistant" else "empty_prompt"
            raise fail(reason, f"empty {message.role} turn", f"messages[{index}].content")
    source = get_string(row, "source", optional=True) or default_source
    return Conversation(messages, source, get_id(row, "id"))


def _unpaired(row: Mapping, source: str) -> list[UnpairedExample]:
    prompt = check_prompt(text_or_messages(get_field(row, "prompt"), "prompt", "user"), "prompt")
    completion = text_or_messages(get_field(row, "completion"), "completion", "assistant")
    check_completion(completion, "completion")
    label = get_field(row, "label")
    if not isinstance(label, bool):
        raise fail("wrong_type", f"'label' must be a boolean, got {kind_of(label)}", "label")
    source = get_string(row, "source", optional=True) or source
    return [UnpairedExample(prompt, completion, label, source, get_id(row, "id"))]


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
        raise fail("identical", "chosen and rejected are the same text", "chosen")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared and chosen[shared - 1] == " ":
        shared -= 1
    if not chosen[:shared].strip():
        raise fail("bad_structure", "chosen and rejected share no prompt prefix", "chosen")
    return chosen[:shared], chosen[shared:], rejected[shared:]


@register("trl_preference")
def read_trl_preference(row: Mapping) -> list[PreferencePair]:
    """TRL's preference format, standard (strings) or conversational (message lists), with an explicit
    `prompt` or an implicit one (the shared prefix of `chosen` and `rejected`). As in TRL, a `prompt` of the
    other kind than `chosen` (a string beside full conversations, as ultrafeedback_binarized has) is
    ignored."""
    chosen, rejected, prompt = get_field(row, "chosen"), get_field(row, "rejected"), row.get("prompt")
    conversational = _is_conversational(chosen)
    if prompt is not None and _is_conversational(prompt) != conversational:
        prompt = None
    if conversational:
        chosen, rejected = parse_messages(chosen, "chosen"), parse_messages(rejected, "rejected")
        if prompt is None:
            prompt, chosen, rejected = split_pair(chosen, rejected)
        else:
            prompt = check_prompt(parse_messages(prompt, "prompt"), "prompt")
            check_completion(chosen, "chosen")
            check_completion(rejected, "rejected")
    else:
        chosen, rejected = get_string(row, "chosen"), get_string(row, "rejected")
        if prompt is None:
            prompt, chosen, rejected = _split_text(chosen, rejected)
        else:
            prompt = get_string(row, "prompt")
        prompt = user_prompt(prompt, "prompt")
        chosen, rejected = assistant_reply(chosen, "chosen"), assistant_reply(rejected, "rejected")
    if chosen == rejected:
        raise fail("identical", "chosen and rejected are the same completion", "chosen")
    source = get_string(row, "source", optional=True) or "trl_preference"
    return [PreferencePair(prompt, chosen, rejected, source=source, id=get_id(row, "id"))]


@register("trl_prompt_only")
def read_trl_prompt_only(row: Mapping) -> list[PromptRecord]:
    """TRL's prompt-only format (online RL): `prompt`, a string or a message list ending with a user turn;
    an optional `ground_truth`, `answer` or `solution` for verifiable rewards."""
    prompt = get_field(row, "prompt")
    if _is_conversational(prompt):
        prompt = check_prompt(parse_messages(prompt, "prompt"), "prompt")
    else:
        prompt = user_prompt(get_string(row, "prompt"), "prompt")
    source = get_string(row, "source", optional=True) or "trl_prompt_only"
    return [PromptRecord(prompt, _ground_truth(row), source, get_id(row, "id"))]


def _no_tools(row: Mapping, key: str = "tools", where: str = "") -> None:
    for name in (key, "functions"):
        if row.get(name):
            raise fail(
                "tool_call",
                f"tool definitions ({name!r}) cannot be rendered by the chat templates",
                field_label(where, name),
            )


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
    given = as_object(get_field(row, "input"), "input")
    _no_tools(given, where="input")
    messages = parse_messages(get_field(given, "messages", "input"), "input.messages")
    prompt = check_prompt(messages, "input.messages")
    chosen = check_completion(
        parse_messages(get_field(row, "preferred_output"), "preferred_output"), "preferred_output"
    )
    rejected = check_completion(
        parse_messages(get_field(row, "non_preferred_output"), "non_preferred_output"), "non_preferred_output"
    )
    if chosen == rejected:
        raise fail("identical", "preferred and non-preferred outputs are the same", "preferred_output")
    return [PreferencePair(prompt, chosen, rejected, source="openai_dpo", id=get_id(row, "id"))]


@register("tfds")
def read_tfds(row: Mapping) -> list:
    """A dataset prepared by jaxrl.data.tfds_builder: `record` (a canonical record as JSON) and its `kind`."""
    text = get_field(row, "record")
    if not isinstance(text, str | bytes):
        raise fail("wrong_type", f"'record' must be JSON text, got {kind_of(text)}", "record")
    record = tfds_source.record_from_json(text)
    kind = row.get("kind")
    kind = kind.decode("utf-8", "replace") if isinstance(kind, bytes) else kind
    if kind is not None and kind != type(record).__name__:
        raise fail("bad_value", f"'kind' is {kind!r} but the record is a {type(record).__name__}", "kind")
    return [record]
