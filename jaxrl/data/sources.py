"""File data for a stage: one source read by its reader (rated completions binarised into pairs, kept as
ranked lists or split into KTO examples, as the stage's loss needs), or a mixture of sources
(data.mixture)."""

from __future__ import annotations

import json
from pathlib import Path

from jaxrl.config import Config, ConfigError

DEFAULT_LIST_SIZE = 4  # responses per list for a listwise loss on a file source when data.list_size is 0
MIXTURE_KEYS = (
    "source",
    "format",
    "count",
    "weight",
    "binarize",
    "aspect_weights",
    "min_margin",
    "replace",
    "on_error",
    "name",
)


def is_listwise(cfg: Config) -> bool:
    """Whether the stage trains on ranked lists (stage dpo with a listwise loss.name)."""
    from jaxrl import listwise

    return cfg.stage == "dpo" and listwise.is_listwise(cfg.loss.name)


def source_records(
    cfg: Config,
    source: str,
    format: str,
    *,
    policy: str,
    aspect_weights: str,
    min_margin: float,
    on_error: str,
) -> tuple[list, str]:
    """One file source read by its reader; rated completions become pairs (or KTO examples). Returns the
    records and the one-line account of its rows."""
    from jaxrl import losses
    from jaxrl.data import binarize, readers
    from jaxrl.data.records import RatedCompletions

    result = readers.read(source, format, on_error=on_error)
    records, summary = list(result.records), result.summary()
    if records and isinstance(records[0], RatedCompletions):
        try:
            # data.aspect_reduce, when set, stands in for an empty aspect_weights (the older setting)
            explicit = aspect_weights or ("" if cfg.data.aspect_reduce == "mean" else cfg.data.aspect_reduce)
            aspects = binarize.parse_aspects(explicit, format)
        except ValueError as e:
            raise ConfigError(f"data.aspect_weights: {e}") from None
        pairwise_dpo = cfg.stage == "dpo" and not is_listwise(cfg)
        unpaired = policy == "unpaired" or (
            pairwise_dpo and not losses.get_preference_loss(cfg.loss.name).paired
        )
        if is_listwise(cfg):
            k = cfg.data.list_size or DEFAULT_LIST_SIZE
            records, counts = binarize.to_lists(records, k, aspect_reduce=aspects, seed=cfg.seed)
            cut = counts.pop("cut_to_k", 0)
            what = f"kept as {len(records)} ranked lists of up to {k} ({cut} cut to {k})"
            dropped = counts
        elif unpaired:
            records, dropped = binarize.to_unpaired(records, aspect_reduce=aspects)
            what = f"split into {len(records)} KTO examples (best desirable, worst undesirable)"
        else:
            records, dropped = binarize.binarize(
                records, policy, aspect_reduce=aspects, min_margin=min_margin, seed=cfg.seed
            )
            what = f"binarised ({policy}) to {len(records)} pairs"
        summary += f"; {what}, dropped {dict(dropped) or 'none'}"
    elif records and is_listwise(cfg):
        raise ConfigError(
            f"{source}: loss.name={cfg.loss.name!r} is listwise, but format {format!r} holds "
            f"{type(records[0]).__name__} records, not rated lists (nectar, ultrafeedback, "
            "...)"
        )
    return records, summary


def mixture_entries(text: str) -> list[dict]:
    """data.mixture parsed: a JSON list of {"source", "format", "count" | "weight", ...}; ConfigError names
    the entry and key at fault."""
    from jaxrl.data.readers import READERS

    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"data.mixture must be a JSON list of sources: {e}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError("data.mixture must be a non-empty JSON list of sources")
    for index, entry in enumerate(entries):
        where = f"data.mixture[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise ConfigError(f"{where} must be an object with a 'source' path")
        if unknown := sorted(set(entry) - set(MIXTURE_KEYS)):
            raise ConfigError(f"{where} has unknown keys {unknown}; valid keys are {list(MIXTURE_KEYS)}")
        if entry.get("format") not in READERS:
            raise ConfigError(
                f"{where}.format must name a reader, one of {sorted(READERS)}; got {entry.get('format')!r}"
            )
        if "count" in entry and "weight" in entry:
            raise ConfigError(f"{where}: give 'count' or 'weight', not both")
    if any("weight" in e for e in entries) and any("count" in e for e in entries):
        raise ConfigError(
            "data.mixture: give every source a 'weight' or none (counts and weights do not mix)"
        )
    return entries


def mixture_records(cfg: Config) -> tuple[list, list[str]]:
    """The sources of data.mixture, each read, binarised and subsampled (`count`) or weighted (`weight` shares
    of data.num_train + data.num_eval), then shuffled together; one report line per source."""
    from jaxrl.data.mixture import mix

    d = cfg.data
    sources, counts, weights, lines, replace = {}, {}, {}, [], False
    for index, entry in enumerate(mixture_entries(d.mixture)):
        name = entry.get("name") or Path(entry["source"]).stem
        name = name if name not in sources else f"{name}_{index}"
        records, summary = source_records(
            cfg,
            entry["source"],
            entry["format"],
            policy=entry.get("binarize", d.binarize),
            aspect_weights=entry.get("aspect_weights", d.aspect_weights),
            min_margin=float(entry.get("min_margin", d.min_margin)),
            on_error=entry.get("on_error", d.on_error),
        )
        sources[name] = records
        counts[name] = entry.get("count")
        if "weight" in entry:
            weights[name] = float(entry["weight"])
        replace = replace or bool(entry.get("replace", False))
        lines.append(f"read {name} ({entry['format']}, {entry['source']}): {summary}")
    kinds = {type(r).__name__ for records in sources.values() for r in records[:1]}
    if len(kinds) > 1:
        raise ConfigError(f"data.mixture mixes record kinds {sorted(kinds)}; a stage trains on one kind")
    total = None
    if weights:
        total = d.num_train + d.num_eval if d.num_train else sum(len(r) for r in sources.values())
    try:
        mixture = mix(
            sources,
            counts=None if weights else counts,
            weights=weights or None,
            total=total,
            seed=cfg.seed,
            replace=replace,
        )
    except ValueError as e:
        raise ConfigError(f"data.mixture: {e}") from None
    lines.append(mixture.summary())
    return list(mixture), lines


def file_records(cfg: Config) -> tuple[list, list, list[str]]:
    """(train records, held-out records, report lines) of data.source or data.mixture: the last
    data.num_eval records are held out, the first data.num_train (all when 0) of the rest train."""
    d = cfg.data
    if d.mixture:
        records, report = mixture_records(cfg)
    else:
        records, summary = source_records(
            cfg,
            d.source,
            d.format,
            policy=d.binarize,
            aspect_weights=d.aspect_weights,
            min_margin=d.min_margin,
            on_error=d.on_error,
        )
        report = [f"read {d.source}: {summary}"]
    if len(records) <= d.num_eval:
        raise ConfigError(f"{d.source}: {len(records)} records is not more than data.num_eval={d.num_eval}")
    train, held_out = records[: len(records) - d.num_eval], records[len(records) - d.num_eval :]
    return train[: d.num_train] if d.num_train else train, held_out, report
