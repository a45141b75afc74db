"""Canonical records: every reader (real formats and the synthetic world) produces these."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A malformed input row; the message names the file, row and field."""

    def __init__(self, reason: str, message: str, *, file: str = "", row: int | None = None, field: str = ""):
        where = ", ".join(
            p
            for p in (file and f"file {file}", row is not None and f"row {row}", field and f"field {field!r}")
            if p
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = reason
        self.file, self.row, self.field = file, row, field


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise RecordError(
                "unknown_role", f"unknown role {self.role!r}; expected one of {ROLES}", field="role"
            )
        if not isinstance(self.content, str):
            raise RecordError(
                "wrong_type", f"content must be a string, got {type(self.content).__name__}", field="content"
            )


Messages = tuple[Message, ...]


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages ending with a user turn) and two assistant continuations."""

    prompt: Messages
    chosen: Messages
    rejected: Messages
    margin: float | None = None
    source: str = ""
    id: str = ""


@dataclasses.dataclass(frozen=True)
class RatedCompletions:
    """Several completions of one prompt with scalar or per-aspect ratings (higher is better)."""

    prompt: Messages
    completions: tuple[Messages, ...]
    ratings: tuple[float | Mapping[str, float], ...]
    source: str = ""
    id: str = ""


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    """One completion labelled desirable or undesirable (KTO)."""

    prompt: Messages
    completion: Messages
    desirable: bool
    source: str = ""
    id: str = ""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A policy-training prompt, with an optional ground truth for verifiable rewards."""

    prompt: Messages
    ground_truth: str | None = None
    source: str = ""
    id: str = ""


@dataclasses.dataclass(frozen=True)
class Conversation:
    """An SFT example: the loss falls on assistant turns only."""

    messages: Messages
    source: str = ""
    id: str = ""


def messages(*turns: tuple[str, str]) -> Messages:
    """Builds a Messages tuple from (role, content) pairs."""
    return tuple(Message(role, content) for role, content in turns)
