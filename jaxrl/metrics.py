"""Metric sinks: metrics.jsonl (always) and TensorBoard event files in the workdir, from process 0 only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

from jaxrl.files import replacing


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float (nan, inf, -inf) anywhere in nested dicts/lists/tuples replaced by
    None, so json.dumps(..., allow_nan=False) accepts it. Numpy/JAX scalars are turned into Python numbers."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0 and getattr(obj, "size", 1) == 1:
        return strict_json(obj.item())  # numpy / jax scalars
    return obj


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class MetricWriter:
    """Appends {"step": s, name: value, ...} rows to <workdir>/metrics.jsonl and mirrors them to TensorBoard.

    The rows are strict JSON: a non-finite value is written as null (TensorBoard still gets the float)."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if self.active and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.active or not values:
            return
        row = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _split_rows(text: str) -> tuple[list[str], str]:
    """(the newline-terminated lines of `text`, the tail after the last newline: '' when none)."""
    head, sep, tail = text.rpartition("\n")
    return (head.split("\n") if sep else []), tail


def read_metrics(workdir: str | Path) -> list[dict]:
    """All rows of a run's metrics.jsonl. A torn last line (a partial write cut off by a kill: no newline and
    not a whole JSON row) is skipped; a whole row that merely lacks its newline is kept."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines, tail = _split_rows(path.read_text())
    rows = [json.loads(line) for line in lines if line.strip()]
    if tail.strip() and (row := _parse_row(tail)) is not None:
        rows.append(row)
    return rows


def last_logged(workdir: str | Path, prefix: str = "train/") -> dict:
    """The metrics of the last logged step (names without `prefix`), for the summary of a resumed run."""
    rows = [r for r in read_metrics(workdir) if not any(k.startswith(("eval/", "val/")) for k in r)]
    if not rows:
        return {}
    return {k[len(prefix) :]: v for k, v in rows[-1].items() if k != "step" and k.startswith(prefix)}


def truncate_after(workdir: str | Path, step: int, *, final: bool = False) -> int:
    """Rewrites <workdir>/metrics.jsonl keeping only rows whose "step" <= `step`; returns how many rows it
    dropped. A resumed run calls it with the step of its checkpoint (-1 for a fresh start), so each step is
    logged once; with `final` (it resumes at its last step, killed before its summary), the final evaluation's
    rows at `step` go too, as it evaluates again.

    A torn last line (no newline and not a whole JSON row, left by a kill) is dropped and counted, as is any
    other line that does not parse. The rewrite is atomic (a temp file, then os.replace). Only process 0 (the
    one MetricWriter writes from) touches the file; elsewhere, and without a metrics.jsonl, it returns 0."""
    path = Path(workdir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return 0
    lines, tail = _split_rows(path.read_text())
    if tail.strip():
        lines.append(tail)
    kept, dropped = [], 0
    for line in lines:
        if not line.strip():
            continue
        row = _parse_row(line)
        if (
            row is not None
            and row.get("step", 0) <= step
            and not (final and row.get("step") == step and any(k.startswith(("eval/", "val/")) for k in row))
        ):
            kept.append(line)
        else:
            dropped += 1
    with replacing(path) as tmp, tmp.open("w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    return dropped
