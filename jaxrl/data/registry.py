"""The reader registry: a name (`data.format`) -> a row -> records function. Readers register themselves
with `@register("name")`; `jaxrl.data.readers` imports every reader module, so its READERS is complete."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxrl.data.fields import fail, kind_of


@dataclasses.dataclass(frozen=True)
class Reader:
    """A named row -> records function, with an optional whole-file step `combine` over every row's records
    (HelpSteer: grouping rows by prompt), whose output is what `read` returns (and counts as its records)."""

    name: str
    parse: Callable[[Mapping[str, Any]], list]
    combine: Callable[[list], list] | None = None

    def __call__(self, row: Any) -> list:
        """Converts one row into a list of canonical records; raises RecordError or SkipRow."""
        if not isinstance(row, Mapping):
            raise fail("wrong_type", f"a row must be an object, got {kind_of(row)}")
        return self.parse(row)


READERS: dict[str, Reader] = {}


def register(name: str, *, combine: Callable[[list], list] | None = None):
    """Registers a row reader under `name` (a decorator)."""

    def decorate(parse):
        READERS[name] = Reader(name, parse, combine)
        return parse

    return decorate


def get_reader(name: str) -> Reader:
    """The reader registered under `name`; a clear error lists the known names."""
    if name not in READERS:
        raise ValueError(f"unknown format {name!r}; known formats: {sorted(READERS)}")
    return READERS[name]
