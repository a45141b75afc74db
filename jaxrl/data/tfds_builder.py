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

The read side (the record JSON codec, `data_source`, `iter_examples`, `iter_records`) is
jaxrl.data.tfds_source, re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sys
import tempfile
from pathlib import Path

from jaxrl.data import readers
from jaxrl.data.tfds_source import (  # noqa: F401  (the read side, re-exported)
    RECORD_TYPES,
    SPLIT,
    data_source,
    decode_example,
    import_tfds,
    is_dataset_dir,
    iter_examples,
    iter_records,
    record_from_json,
    record_to_json,
)

_NAME = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


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
    tfds = import_tfds()
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
            return tfds.core.DatasetInfo(
                builder=self,
                description=description,
                features=features,
                metadata=tfds.core.MetadataDict(metadata),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {SPLIT: self._generate_examples()}

        def _generate_examples(self):
            width = max(12, len(str(len(records))))
            for index, record in enumerate(records):
                yield (
                    f"{index:0{width}d}",
                    {"record": record_to_json(record), "kind": type(record).__name__, "index": index},
                )

    return Builder


def metadata(dataset_dir: str | Path) -> dict:
    """What `prepare` recorded: source, format, on_error, rows_read/used, dropped, records, source_sha256."""
    return dict(import_tfds().builder_from_directory(str(dataset_dir)).info.metadata or {})


def prepare(
    source: str | Path,
    format: str,
    data_dir: str | Path,
    *,
    name: str,
    version: str = "1.0.0",
    on_error: str = "raise",
    log=print,
) -> Path:
    """Reads `source` with the reader `format` and writes it as the TFDS dataset data_dir/name/version;
    returns that directory. The same name, version and source again reuse it; a different source (sha256) or
    format under an existing version is a ValueError: prepare it as a new version."""
    tfds = import_tfds()
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"dataset name {name!r} is not a valid TFDS name: use snake_case "
            f"(lowercase letters, digits and single underscores, starting with a letter)"
        )
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
    description = (
        f"jaxrl canonical records (jaxrl.data.tfds_builder) from {meta['source']} read with "
        f"format {format!r} (on_error={on_error!r}): {result.summary()}; source sha256 {digest}"
    )
    builder_cls = _builder_class(name, version, result.records, meta, description)
    # TFDS prints its own progress to stdout; keep stdout for the caller's lines.
    with tempfile.TemporaryDirectory() as downloads, contextlib.redirect_stdout(sys.stderr):
        builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare(download_dir=downloads)
    log(f"prepared {dataset_dir}: {len(result.records)} records; {result.summary()}")
    return dataset_dir
