"""Writing an HF checkpoint: safetensors files (sharded with an index above a size), config.json, the
tokenizer files and, for a policy, generation_config.json. Parameters are fetched to the host one at a time
and each file is written as soon as its tensors are ready."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxrl.config import ModelConfig
from jaxrl.models.hf_config import SPECIAL_TOKEN_KEYS, hf_config_for
from jaxrl.models.hf_weights import INDEX_FILE, WEIGHTS_FILE, flatten_tree, tensor_maps, to_hf_layout

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
GENERATION_FILE = "generation_config.json"


def _host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array gathered to a numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_tensors(cfg: ModelConfig, flat: Mapping[str, Any], save_dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) in table order, fetching one parameter to the host at a time."""
    for m in tensor_maps(cfg):
        value = _host(flat[m.path])
        value = value if save_dtype is None else value.astype(save_dtype)
        for i in range(cfg.layers if m.stacked else 1):
            layer = value[i] if m.stacked else value
            out = to_hf_layout(layer, m.fan_in)
            yield m.hf.format(i=i), out.reshape(-1) if m.path.endswith("/bias") else out


def _shard_plan(cfg: ModelConfig, flat: Mapping[str, Any], itemsize, max_shard_bytes: int) -> list[list[str]]:
    """HF tensor names grouped into files of at most `max_shard_bytes` (a bigger tensor gets its own file)."""
    groups: list[list[str]] = [[]]
    size = 0
    for m in tensor_maps(cfg):
        shape = flat[m.path].shape
        nbytes = math.prod(shape[1:] if m.stacked else shape) * (itemsize or flat[m.path].dtype.itemsize)
        for i in range(cfg.layers if m.stacked else 1):
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(m.hf.format(i=i))
            size += nbytes
    return groups


def _generation_config(hf: Mapping[str, Any]) -> dict:
    return {"_from_model_config": True, **{k: hf[k] for k in SPECIAL_TOKEN_KEYS if hf.get(k) is not None}}


def _token_ids(tokenizer_dir: Path) -> dict:
    """bos/eos/pad token ids of a tokenizer directory, for config.json."""
    from jaxrl.data.chat import HFChatTokenizer

    tok = HFChatTokenizer.from_dir(tokenizer_dir)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    if tok.has_pad_token:
        ids["pad_token_id"] = tok.pad_id
    return {k: v for k, v in ids.items() if v is not None}


def save_hf(
    path: str | Path,
    cfg: ModelConfig,
    params: Mapping,
    *,
    architecture: str | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 10**9,
    save_dtype: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Writes an HF checkpoint (safetensors, sharded with an index above `max_shard_bytes`, + config.json)."""
    path = Path(path)
    overrides = _token_ids(Path(tokenizer_dir)) if tokenizer_dir is not None else {}
    # hf_config_for re-parses the result, so overrides that would change the model are refused.
    hf = hf_config_for(cfg, architecture, {**overrides, **(config_overrides or {})})
    if cfg.head == "scalar" and hf.get("pad_token_id") is None:
        warnings.warn(
            "saving a reward model without pad_token_id: transformers cannot pool a padded batch; pass "
            "tokenizer_dir or config_overrides={'pad_token_id': ...}",
            stacklevel=2,
        )
    flat = flatten_tree(params)
    np_dtype = None if save_dtype is None else jnp.dtype(save_dtype)
    hf["torch_dtype"] = str(np_dtype or next(iter(flat.values())).dtype)
    writer = jax.process_index() == 0  # every process joins the gathers; one writes
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        for stale in (WEIGHTS_FILE, INDEX_FILE, *(p.name for p in path.glob("model-*-of-*.safetensors"))):
            (path / stale).unlink(missing_ok=True)
    _write_weights(path, cfg, flat, np_dtype, max_shard_bytes, writer)
    if writer:
        (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        _write_extras(path, cfg, hf, tokenizer_dir)
    return path


def _write_weights(path: Path, cfg: ModelConfig, flat: Mapping[str, Any], np_dtype, max_shard_bytes, writer):
    """Safetensors files (+ an index when more than one), each written as soon as its tensors are ready."""
    groups = _shard_plan(cfg, flat, np_dtype.itemsize if np_dtype is not None else None, max_shard_bytes)
    files = (
        [WEIGHTS_FILE]
        if len(groups) == 1
        else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    )
    tensors = _hf_tensors(cfg, flat, np_dtype)  # same order as the plan
    weight_map, total = {}, 0
    for file, group in zip(files, groups, strict=True):
        data = dict(itertools.islice(tensors, len(group)))
        assert list(data) == group, "shard plan and tensor order disagree"
        weight_map.update(dict.fromkeys(data, file))
        total += sum(t.nbytes for t in data.values())
        if writer:
            save_file(data, path / file, metadata={"format": "pt"})  # transformers requires format=pt
        del data
    if writer and len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_extras(
    path: Path, cfg: ModelConfig, hf: Mapping[str, Any], tokenizer_dir: str | Path | None
) -> None:
    """Tokenizer files copied from `tokenizer_dir`, and generation_config.json for a policy."""
    source = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and (source / name).resolve() != (path / name).resolve():
                shutil.copyfile(source / name, path / name)
    if cfg.head != "lm":
        return
    if source is not None and (source / GENERATION_FILE).is_file():
        # Keep the original (e.g. Llama 3 Instruct lists several stop ids).
        if (source / GENERATION_FILE).resolve() != (path / GENERATION_FILE).resolve():
            shutil.copyfile(source / GENERATION_FILE, path / GENERATION_FILE)
        return
    (path / GENERATION_FILE).write_text(json.dumps(_generation_config(hf), indent=2, sort_keys=True) + "\n")
