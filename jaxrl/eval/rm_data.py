"""The input files of reward-model evaluation: RewardBench-format preference rows and prompt rows.

A preference file holds `prompt`, `chosen`, `rejected`, `subset` and optionally `id` per row; a prompt file
`prompt` and optionally `id`. A prompt is a string (one user turn) or a list of chat messages. Either file is
JSONL or one JSON list; a bad row is a one-line error naming file, row and field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxrl.config import ConfigError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    id: str
    subset: str
    prompt: tuple  # of jaxrl.data.records.Message
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: tuple  # of Message


def _read_rows(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(row number from 1, object) of a JSONL file or a JSON list; one-line errors naming file and row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} {path}: not valid JSON ({e})") from e
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{what} {path} row {number}: not valid JSON ({e.msg})") from e
    if not rows:
        raise ConfigError(f"{what} {path}: no rows")
    for number, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"{what} {path} row {number}: a JSON object expected, got {type(row).__name__}")
    return rows


def _prompt(value: Any, where: str) -> tuple:
    """A prompt as messages: a string is one user turn; a list holds {"role", "content"} turns."""
    from jaxrl.data.records import Message

    if isinstance(value, str):
        return (Message("user", value),)
    if isinstance(value, list) and value:
        messages = []
        for k, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(
                    f"{where}, field 'prompt' turn {k}: needs a role ({', '.join(ROLES)}) and string content"
                )
            messages.append(Message(m["role"], m["content"]))
        if messages[-1].role == "assistant":
            raise ConfigError(f"{where}, field 'prompt': ends with an assistant turn")
        return tuple(messages)
    raise ConfigError(f"{where}, field 'prompt': a string or a non-empty list of chat messages expected")


def _field(row: dict, name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise ConfigError(f"{where}: missing field '{name}'")
    return row[name]


def read_preferences(path: str | Path, limit: int | None = None) -> list[PreferenceRow]:
    """Rows of a RewardBench-format file (JSONL or a JSON list): prompt, chosen, rejected, subset, id."""
    out = []
    for number, row in _read_rows(path, "preference data"):
        where = f"preference data {path} row {number}"
        prompt = _prompt(_field(row, "prompt", where), where)
        texts = {}
        for name in ("chosen", "rejected"):
            value = _field(row, name, where)
            if not isinstance(value, str):
                raise ConfigError(f"{where}, field '{name}': a string expected, got {type(value).__name__}")
            texts[name] = value
        subset = row.get("subset", "unlabelled")
        if not isinstance(subset, str) or not subset:
            raise ConfigError(f"{where}, field 'subset': a non-empty string expected")
        out.append(
            PreferenceRow(str(row.get("id", number)), subset, prompt, texts["chosen"], texts["rejected"])
        )
    return out[:limit] if limit else out


def read_prompts(path: str | Path, limit: int | None = None) -> list[PromptRow]:
    """Rows with `prompt` (a string or chat messages) and optionally `id` (JSONL or a JSON list)."""
    out = []
    for number, row in _read_rows(path, "prompt file"):
        where = f"prompt file {path} row {number}"
        out.append(PromptRow(str(row.get("id", number)), _prompt(_field(row, "prompt", where), where)))
    return out[:limit] if limit else out
