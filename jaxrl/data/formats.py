"""File layouts -> raw rows: JSONL, JSON, CSV, Parquet, Arrow, a `datasets.save_to_disk` directory (read
without importing `datasets`) and a TFDS dataset version prepared by jaxrl.data.tfds_builder.

`raw_rows(path)` yields (0-based row index, row dict or the RecordError that row raised); a file that cannot
be read at all is a RecordError ("unreadable_file", "invalid_json", "invalid_utf8") naming the file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jaxrl.data import tfds_source
from jaxrl.data.fields import fail, kind_of, locate
from jaxrl.data.records import RecordError

# An object-wrapped JSON file keeps its rows under one of these keys; any other object is a single row.
JSON_ROW_KEYS = ("data", "rows", "examples", "instances", "records", "train", "test", "validation")

RawRows = Iterator[tuple[int, Any]]  # (0-based row index, dict or the RecordError that row raised)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _jsonl_row(raw: bytes, first: bool) -> Any:
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return fail("invalid_utf8", f"invalid UTF-8 at byte {exc.start} of the line ({exc.reason})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return fail("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(row, dict):
        return fail("wrong_type", f"a row must be a JSON object, got {kind_of(row)}")
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
        "wrong_type", f"a JSON file must hold a list or an object, got {kind_of(document)}", file=str(path)
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
            else fail("wrong_type", f"a row must be an object, got {kind_of(row)}"),
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
        versions = sorted(
            (p.parent.name for p in path.glob("*/features.json")),
            key=lambda v: [int(x) if x.isdigit() else -1 for x in v.split(".")],
        )
        hint = f"; it has TFDS versions {versions}: read one, e.g. {path / versions[-1]}" if versions else ""
        raise ValueError(
            f"{path} is not a save_to_disk directory (needs state.json and dataset_info.json) "
            f"nor a prepared TFDS dataset version (needs features.json and dataset_info.json)"
            f"{hint}"
        )
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
    try:
        for index, example in tfds_source.iter_examples(path):
            yield index, {"record": example["record"], "kind": example["kind"]}
    except RuntimeError as exc:  # array_record's error for a damaged file
        raise RecordError("unreadable_file", f"cannot read: {exc}", file=str(path)) from None


def _layout_rows(path: Path) -> RawRows:
    name = path.name.lower()
    if path.is_dir():
        if tfds_source.is_dataset_dir(path):
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


def raw_rows(path: Path) -> RawRows:
    """Rows of `path`; a file-level failure (missing, corrupt) is a RecordError naming the file."""
    try:
        yield from _layout_rows(path)
    except (
        OSError,
        pa.ArrowException,
        json.JSONDecodeError,
        UnicodeDecodeError,
        KeyError,
        TypeError,
        csv.Error,
    ) as exc:
        raise RecordError(
            "unreadable_file", f"cannot read: {type(exc).__name__}: {exc}", file=str(path)
        ) from None


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yields (0-based row index, row dict) from a JSONL/JSON/Parquet/Arrow file or save_to_disk directory."""
    path = Path(path)
    for index, row in raw_rows(path):
        if isinstance(row, RecordError):
            raise locate(row, str(path), index)
        yield index, row
