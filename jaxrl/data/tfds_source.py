"""The read side of a dataset prepared by jaxrl.data.tfds_builder: the JSON form of a canonical record that
each example holds, and the dataset's random-access source.

An example is {"record": the record as JSON (`record_to_json`), "kind": its type name, "index": its position}.
`data_source` is what `grain.MapDataset.source` takes; `iter_records` yields the records in prepared order.
No TensorFlow is needed; tensorflow_datasets is imported only when a dataset is opened.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jaxrl.data.fields import fail
from jaxrl.data.records import (
    Conversation,
    Message,
    PreferencePair,
    PromptRecord,
    RatedCompletions,
    RecordError,
    UnpairedExample,
)

RECORD_TYPES = {
    cls.__name__: cls
    for cls in (PreferencePair, RatedCompletions, UnpairedExample, PromptRecord, Conversation)
}
SPLIT = "train"
_MESSAGE_FIELDS = ("prompt", "chosen", "rejected", "completion", "messages")
_CHUNK = 1024  # examples fetched per read when iterating a data source


def import_tfds():
    """The tensorflow_datasets module, or an ImportError that says how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise ImportError(
            f'the TFDS path needs tensorflow-datasets and array-record: pip install "jaxrl[tfds]" ({exc})'
        ) from None
    return tfds


def _bad(reason: str, message: str) -> RecordError:
    return fail(reason, message, "record")  # read() re-raises it with the file and row attached


def _messages_json(messages) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def record_to_json(record) -> str:
    """Lossless JSON of a canonical record: {"type": <class name>, <field>: <value>, ...} (messages as lists
    of {role, content}, ratings as numbers or {aspect: number}). Non-finite numbers are a ValueError."""
    kind = type(record).__name__
    if RECORD_TYPES.get(kind) is not type(record):
        raise TypeError(f"not a canonical record: {type(record).__name__}")
    out: dict[str, Any] = {"type": kind}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if field.name in _MESSAGE_FIELDS:
            value = _messages_json(value)
        elif field.name == "completions":
            value = [_messages_json(c) for c in value]
        elif field.name == "ratings":
            value = [dict(r) if isinstance(r, Mapping) else r for r in value]
        out[field.name] = value
    return json.dumps(out, ensure_ascii=False, allow_nan=False)


def _check(ok: bool, where: str, expected: str, value: Any):
    if not ok:
        raise _bad("bad_structure", f"{where} must be {expected}, got {type(value).__name__}")


def _parse_messages(value: Any, where: str) -> tuple[Message, ...]:
    _check(isinstance(value, list), where, "a list of messages", value)
    out = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        _check(
            isinstance(item, dict) and set(item) == {"role", "content"}, at, "a {role, content} object", item
        )
        _check(isinstance(item["role"], str) and isinstance(item["content"], str), at, "two strings", item)
        try:
            out.append(Message(item["role"], item["content"]))
        except RecordError as err:
            raise _bad(err.reason, f"{at}: {err}") from None
    return tuple(out)


def _number(value: Any, where: str) -> float:
    _check(isinstance(value, int | float) and not isinstance(value, bool), where, "a number", value)
    return value


def _parse_rating(value: Any, where: str) -> float | dict[str, float]:
    if isinstance(value, dict):
        return {str(k): _number(v, f"{where}.{k}") for k, v in value.items()}
    return _number(value, where)


def _parse_field(name: str, value: Any) -> Any:
    where = f"record.{name}"
    if name in _MESSAGE_FIELDS:
        return _parse_messages(value, where)
    if name == "completions":
        _check(isinstance(value, list), where, "a list", value)
        return tuple(_parse_messages(c, f"{where}[{i}]") for i, c in enumerate(value))
    if name == "ratings":
        _check(isinstance(value, list), where, "a list", value)
        return tuple(_parse_rating(r, f"{where}[{i}]") for i, r in enumerate(value))
    if name == "margin":
        return None if value is None else _number(value, where)
    if name == "desirable":
        _check(isinstance(value, bool), where, "a boolean", value)
        return value
    if name == "ground_truth":
        _check(value is None or isinstance(value, str), where, "a string or null", value)
        return value
    _check(isinstance(value, str), where, "a string", value)  # source, id
    return value


def record_from_json(text: str | bytes):
    """The canonical record written by `record_to_json`; malformed input is a RecordError on field "record"
    (reason invalid_utf8, invalid_json or bad_structure)."""
    try:
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise _bad("invalid_utf8", f"invalid UTF-8 at byte {exc.start} ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise _bad("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    _check(isinstance(data, dict), "record", "a JSON object", data)
    cls = RECORD_TYPES.get(data.get("type"))
    if cls is None:
        raise _bad(
            "bad_structure",
            f"unknown record type {data.get('type')!r}; expected one of {sorted(RECORD_TYPES)}",
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields) - {"type"}
    if unknown:
        raise _bad("bad_structure", f"unknown field(s) {sorted(unknown)} for {cls.__name__}")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _parse_field(name, data[name])
        elif field.default is dataclasses.MISSING:
            raise _bad("bad_structure", f"{cls.__name__} needs field {name!r}")
    return cls(**values)


def decode_example(example: Mapping) -> Any:
    """The canonical record of one data-source example ({"record", "kind", "index"}): e.g. a grain `.map`."""
    return record_from_json(example["record"])


def is_dataset_dir(path: str | Path) -> bool:
    """Whether `path` is one version of a prepared TFDS dataset (features.json and dataset_info.json)."""
    path = Path(path)
    return (path / "features.json").is_file() and (path / "dataset_info.json").is_file()


def data_source(dataset_dir: str | Path, split: str = SPLIT):
    """The random-access source of a prepared dataset (len, [i]): what `grain.MapDataset.source(...)` takes.
    Item i is {"record": JSON bytes, "kind": bytes, "index": i}, the reader's i-th record (decode_example)."""
    dataset_dir = Path(dataset_dir)
    if not is_dataset_dir(dataset_dir):
        raise ValueError(
            f"{dataset_dir} is not a prepared TFDS dataset version directory (expected "
            f"features.json and dataset_info.json, e.g. <data_dir>/<name>/1.0.0)"
        )
    return import_tfds().builder_from_directory(str(dataset_dir)).as_data_source(split)


def iter_examples(dataset_dir: str | Path, split: str = SPLIT) -> Iterator[tuple[int, dict]]:
    """(position, example) of a prepared dataset in order, fetched in chunks; an example whose stored index is
    not its position is a RecordError (the files are not in the order they were prepared in)."""
    source = data_source(dataset_dir, split)
    for start in range(0, len(source), _CHUNK):
        keys = list(range(start, min(start + _CHUNK, len(source))))
        for position, example in zip(keys, source.__getitems__(keys), strict=True):
            if int(example["index"]) != position:
                raise RecordError(
                    "unreadable_file",
                    f"example {position} holds index {example['index']}: not in prepared order",
                    file=str(dataset_dir),
                    row=position,
                )
            yield position, example


def iter_records(dataset_dir: str | Path, split: str = SPLIT) -> Iterator[Any]:
    """The canonical records of a prepared dataset, in the reader's order; a malformed one is a RecordError
    naming the dataset, row and field."""
    for index, example in iter_examples(dataset_dir, split):
        try:
            record = decode_example(example)
        except RecordError as err:
            raise RecordError(
                err.reason, err.detail, file=str(dataset_dir), row=index, field=err.field
            ) from None
        yield record
