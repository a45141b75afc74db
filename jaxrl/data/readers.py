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

The pieces: jaxrl.data.fields (row field validators), jaxrl.data.registry (`register`, READERS), the readers
in jaxrl.data.dataset_readers (public datasets) and jaxrl.data.generic_readers (TRL, OpenAI and generic
formats), and jaxrl.data.formats (file layouts -> rows). This module re-exports their public names.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

# Every reader module registers its readers on import, so READERS is complete once this module is imported.
from jaxrl.data import dataset_readers, generic_readers  # noqa: F401
from jaxrl.data.dataset_readers import ARENA_WINNERS, HELPSTEER_ASPECTS, ULTRAFEEDBACK_ASPECTS
from jaxrl.data.fields import ROLE_ALIASES, TEXT_PARTS, TOOL_ROLES, SkipRow, locate
from jaxrl.data.formats import JSON_ROW_KEYS, RawRows, iter_rows, raw_rows
from jaxrl.data.records import RecordError
from jaxrl.data.registry import READERS, Reader, get_reader, register

__all__ = [
    "ARENA_WINNERS",
    "HELPSTEER_ASPECTS",
    "JSON_ROW_KEYS",
    "ON_ERROR",
    "READERS",
    "ROLE_ALIASES",
    "TEXT_PARTS",
    "TOOL_ROLES",
    "ULTRAFEEDBACK_ASPECTS",
    "RawRows",
    "ReadResult",
    "Reader",
    "SkipRow",
    "get_reader",
    "iter_rows",
    "read",
    "register",
]

ON_ERROR = ("raise", "skip")


@dataclasses.dataclass
class ReadResult:
    """Records from one file and the accounting of every row: rows_read == rows_used + sum(dropped)."""

    records: list = dataclasses.field(default_factory=list)
    rows_read: int = 0
    rows_used: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    path: str = ""
    format: str = ""
    combined: int | None = None  # records the reader's whole-file step made of the rows used (None: no step)

    def summary(self) -> str:
        """One line: rows read N = used U + dropped D (reason: count, ...), then "; U rows grouped into C
        records" when the reader has a whole-file step."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.dropped.items()))
        line = f"rows read {self.rows_read} = used {self.rows_used} + dropped {sum(self.dropped.values())}"
        line = f"{line} ({reasons})" if reasons else line
        if self.combined is not None:
            line += f"; {self.rows_used} rows grouped into {self.combined} records"
        return line


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
    for index, row in raw_rows(path):
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
                raise locate(err, str(path), index) from None
            result.dropped[err.reason] += 1
            continue
        result.rows_used += 1
        result.records.extend(records)
    if reader.combine is not None:
        result.records = reader.combine(result.records)
        result.combined = len(result.records)
    if source is not None:
        result.records = [dataclasses.replace(record, source=source) for record in result.records]
    return result
