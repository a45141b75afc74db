"""A local preference source prepared once into a versioned tensorflow-datasets (TFDS) dataset, and read back.

`prepare(source, format, data_dir, name=...)` reads `source` with `readers.read`, writes the canonical records
as array_record files under data_dir/name/version (one split "train"; features "record": the record as JSON,
"kind": its type name, "index": its position) and returns that dataset directory. The DatasetInfo keeps the
source path, reader format, row accounting and the source's sha256: preparing the same name and version again
reuses the dataset, and a changed source under the same version is an error (bump the version).

A prepared directory is read back with `readers.read(dataset_dir, "tfds")` (so `data.format=tfds` trains on
it), `iter_records`, or randomly accessed through `data_source` (what `grain.MapDataset.source` takes).
No TensorFlow is needed: TFDS writes and reads array_record files without it. tensorflow_datasets is imported
only when used; install it with `pip install "jaxrl[tfds]"`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jaxrl.data import readers
from jaxrl.data.records import (
    Conversation,
    Message,
    PreferencePair,
    PromptRecord,
    RatedCompletions,
    RecordError,
    UnpairedExample,
)

RECORD_TYPES = {cls.__name__: cls for cls in (PreferencePair, RatedCompletions, UnpairedExample, PromptRecord,
                                              Conversation)}
SPLIT = "train"
_NAME = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
_MESSAGE_FIELDS = ("prompt", "chosen", "rejected", "completion", "messages")
_CHUNK = 1024  # examples fetched per read when iterating a data source


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise ImportError(f"the TFDS path needs tensorflow-datasets and array-record: "
                          f'pip install "jaxrl[tfds]" ({exc})') from None
    return tfds


# Records <-> JSON.


def _bad(reason: str, message: str) -> RecordError:
    err = RecordError(reason, message, field="record")
    err.detail = message  # the bare message, so readers.read can re-raise it with the file and row attached
    return err


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
        _check(isinstance(item, dict) and set(item) == {"role", "content"}, at, "a {role, content} object",
               item)
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
        raise _bad("bad_structure",
                   f"unknown record type {data.get('type')!r}; expected one of {sorted(RECORD_TYPES)}")
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


# Preparing and reading a TFDS dataset.


def source_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, or of all files under a directory (relative paths and bytes, path order)."""
    path, digest = Path(path), hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _builder_class(name: str, version: str, records: list, metadata: dict, description: str):
    """A GeneratorBasedBuilder named `name`, kept out of TFDS's registry (so any number of names can be
    prepared in one process). Keys are zero-padded positions and shuffling is off: files keep reader order."""
    tfds = _tfds()
    import numpy as np

    builder_name, builder_version = name, version

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = builder_name
        VERSION = tfds.core.Version(builder_version)
        # No code directory (no checksums.tsv to look up); TFDS 4.9.10 would otherwise import the
        # importlib_resources backport, which it only requires on Python < 3.9.
        code_path = None

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"record": tfds.features.Text(), "kind": tfds.features.Text(), "index": np.int64}
            )
            return tfds.core.DatasetInfo(builder=self, description=description, features=features,
                                         metadata=tfds.core.MetadataDict(metadata), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {SPLIT: self._generate_examples()}

        def _generate_examples(self):
            width = max(12, len(str(len(records))))
            for index, record in enumerate(records):
                yield f"{index:0{width}d}", {"record": record_to_json(record), "kind": type(record).__name__,
                                            "index": index}

    return Builder


def metadata(dataset_dir: str | Path) -> dict:
    """What `prepare` recorded: source, format, on_error, rows_read/used, dropped, records, source_sha256."""
    return dict(_tfds().builder_from_directory(str(dataset_dir)).info.metadata or {})


def prepare(source: str | Path, format: str, data_dir: str | Path, *, name: str, version: str = "1.0.0",
            on_error: str = "raise", log=print) -> Path:
    """Reads `source` with the reader `format` and writes it as the TFDS dataset data_dir/name/version;
    returns that directory. The same name, version and source again reuse it; a different source (sha256) or
    format under an existing version is a ValueError: prepare it as a new version."""
    tfds = _tfds()
    if not _NAME.fullmatch(name):
        raise ValueError(f"dataset name {name!r} is not a valid TFDS name: use snake_case "
                         f"(lowercase letters, digits and single underscores, starting with a letter)")
    version = str(tfds.core.Version(version))  # ValueError unless x.y.z
    readers.get_reader(format)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such source: {source}")
    digest = source_sha256(source)
    dataset_dir = Path(data_dir) / name / version
    if (dataset_dir / "dataset_info.json").is_file():
        previous = metadata(dataset_dir)
        if (previous.get("source_sha256"), previous.get("format")) == (digest, format):
            log(f"{dataset_dir}: already prepared from this source (sha256 {digest[:12]}); reusing it")
            return dataset_dir
        raise ValueError(
            f"{dataset_dir} was prepared from {previous.get('source')} (format {previous.get('format')!r}, "
            f"sha256 {str(previous.get('source_sha256'))[:12]}), not from this source (format {format!r}, "
            f"sha256 {digest[:12]}): bump --version (e.g. past {version}) to prepare a new version"
        )
    result = readers.read(source, format, on_error=on_error)
    if not result.records:
        raise ValueError(f"{source}: no records to prepare ({result.summary()})")
    meta = {
        "source": str(source.absolute()),
        "format": format,
        "on_error": on_error,
        "rows_read": result.rows_read,
        "rows_used": result.rows_used,
        "dropped": dict(result.dropped),
        "records": len(result.records),
        "source_sha256": digest,
    }
    description = (f"jaxrl canonical records (jaxrl.data.tfds_builder) from {meta['source']} read with "
                   f"format {format!r} (on_error={on_error!r}): {result.summary()}; source sha256 {digest}")
    builder_cls = _builder_class(name, version, result.records, meta, description)
    # TFDS prints its own progress to stdout; keep stdout for the caller's lines.
    with tempfile.TemporaryDirectory() as downloads, contextlib.redirect_stdout(sys.stderr):
        builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare(download_dir=downloads)
    log(f"prepared {dataset_dir}: {len(result.records)} records; {result.summary()}")
    return dataset_dir


def is_dataset_dir(path: str | Path) -> bool:
    """Whether `path` is one version of a prepared TFDS dataset (features.json and dataset_info.json)."""
    path = Path(path)
    return (path / "features.json").is_file() and (path / "dataset_info.json").is_file()


def data_source(dataset_dir: str | Path, split: str = SPLIT):
    """The random-access source of a prepared dataset (len, [i]): what `grain.MapDataset.source(...)` takes.
    Item i is {"record": JSON bytes, "kind": bytes, "index": i}, the reader's i-th record (decode_example)."""
    dataset_dir = Path(dataset_dir)
    if not is_dataset_dir(dataset_dir):
        raise ValueError(f"{dataset_dir} is not a prepared TFDS dataset version directory (expected "
                         f"features.json and dataset_info.json, e.g. <data_dir>/<name>/1.0.0)")
    return _tfds().builder_from_directory(str(dataset_dir)).as_data_source(split)


def iter_examples(dataset_dir: str | Path, split: str = SPLIT) -> Iterator[tuple[int, dict]]:
    """(position, example) of a prepared dataset in order, fetched in chunks; an example whose stored index is
    not its position is a RecordError (the files are not in the order they were prepared in)."""
    source = data_source(dataset_dir, split)
    for start in range(0, len(source), _CHUNK):
        keys = list(range(start, min(start + _CHUNK, len(source))))
        for position, example in zip(keys, source.__getitems__(keys), strict=True):
            if int(example["index"]) != position:
                raise RecordError("unreadable_file", f"example {position} holds index {example['index']}: "
                                  f"not in prepared order", file=str(dataset_dir), row=position)
            yield position, example


def iter_records(dataset_dir: str | Path, split: str = SPLIT) -> Iterator[Any]:
    """The canonical records of a prepared dataset, in the reader's order; a malformed one is a RecordError
    naming the dataset, row and field."""
    for index, example in iter_examples(dataset_dir, split):
        try:
            record = decode_example(example)
        except RecordError as err:
            raise RecordError(err.reason, err.detail, file=str(dataset_dir), row=index,
                              field=err.field) from None
        yield record
