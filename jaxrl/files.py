"""Writing a file so that no reader ever sees half of it (another process, a run killed and resumed)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path):
    """A temporary path beside `path` (same suffix) to write a file at: when the block ends without error it
    replaces `path` atomically; otherwise it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
