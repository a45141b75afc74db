"""The tensor table (each parameter's HF tensor name and layout) and loading: for each device shard, only the
part of each HF tensor that the shard needs is read and put on its devices before the next, so besides the
device buffers the host holds one shard of one parameter at a time (a whole stacked parameter when there is
no mesh).

Shape letters: L layers, D model width, H query heads, K kv heads, E head_dim, F mlp width, V vocab. HF
stores a kernel as torch's Linear [out, in] with heads flattened (q: [H*E, D]); we store it [in..., out...]
(q: [D, H, E], o: [H, E, D]), stacked over L.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from jaxrl.config import ModelConfig
from jaxrl.models.abstract import abstract_model
from jaxrl.models.hf_config import HFCheckpointError, config_from_hf, read_hf_config
from jaxrl.sharding import tree_shardings

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors a checkpoint may carry that the model recomputes or does not use.
_IGNORED_TENSORS = re.compile(r"rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter and its HF tensor(s): `hf` holds `{i}` for the layer index of a stacked parameter.

    `fan_in` > 0 marks a kernel: HF stores [out, in] (flattened), we store [in dims..., out dims...], with
    `fan_in` leading input dims. Otherwise the tensor is only reshaped (embeddings, norms, biases).
    """

    path: str
    hf: str
    fan_in: int = 0

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def tensor_maps(cfg: ModelConfig, prefix: str = "model.") -> list[TensorMap]:
    """Every parameter of `cfg` with its HF tensor name and layout."""
    layer = prefix + "layers.{i}."
    pre = cfg.norm_position == "pre"
    maps = [
        TensorMap("embed/embedding", prefix + "embed_tokens.weight"),
        TensorMap(
            "layers/attn_norm/scale",
            layer + ("input_layernorm.weight" if pre else "post_attention_layernorm.weight"),
        ),
        TensorMap(
            "layers/mlp_norm/scale",
            layer + ("post_attention_layernorm.weight" if pre else "post_feedforward_layernorm.weight"),
        ),
        TensorMap("layers/attn/o/kernel", layer + "self_attn.o_proj.weight", fan_in=2),
        TensorMap("final_norm/scale", prefix + "norm.weight"),
    ]
    for name in ("q", "k", "v"):
        maps.append(
            TensorMap(f"layers/attn/{name}/kernel", layer + f"self_attn.{name}_proj.weight", fan_in=1)
        )
        if cfg.qkv_bias:
            maps.append(TensorMap(f"layers/attn/{name}/bias", layer + f"self_attn.{name}_proj.bias"))
    if cfg.qk_norm != "none":
        maps += [
            TensorMap(f"layers/attn/{n}_norm/scale", layer + f"self_attn.{n}_norm.weight") for n in ("q", "k")
        ]
    for name in ("gate", "up", "down"):
        maps.append(TensorMap(f"layers/mlp/{name}/kernel", layer + f"mlp.{name}_proj.weight", fan_in=1))
    if cfg.head == "scalar":
        maps.append(TensorMap("score/kernel", "score.weight", fan_in=1))
    elif not cfg.tie_embeddings:
        maps.append(TensorMap("lm_head/kernel", "lm_head.weight", fan_in=1))
    return maps


def from_hf_layout(w: np.ndarray, shape: Sequence[int], fan_in: int) -> np.ndarray:
    """An HF tensor (torch Linear [out, in] for kernels) in jaxrl's layout `shape` (one layer)."""
    return w.T.reshape(shape) if fan_in else w.reshape(shape)


def to_hf_layout(x: np.ndarray, fan_in: int) -> np.ndarray:
    """Inverse of from_hf_layout: jaxrl layout (one layer) -> the HF tensor."""
    if not fan_in:
        return x
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:fan_in]), -1).T)


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """A nested params dict as {"a/b/c": leaf}, the paths TensorMap names."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict:
    """Inverse of flatten_tree."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _hf_shape(shape: Sequence[int], m: TensorMap) -> tuple[int, ...]:
    per_layer = tuple(shape[1:]) if m.stacked else tuple(shape)
    if m.fan_in:
        return (math.prod(per_layer[m.fan_in :]), math.prod(per_layer[: m.fan_in]))
    # Biases are stored flat ([H*E]); norms and embeddings as they are.
    return (math.prod(per_layer),) if m.path.endswith("/bias") else per_layer


def hf_tensor_shapes(cfg: ModelConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of a model with its shape, in table order."""
    flat = flatten_tree(abstract_model(cfg)[1])
    return {
        m.hf.format(i=i): _hf_shape(flat[m.path].shape, m)
        for m in tensor_maps(cfg, prefix)
        for i in range(cfg.layers if m.stacked else 1)
    }


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        return {name: path / file for name, file in index["weight_map"].items()}
    if (path / WEIGHTS_FILE).is_file():
        with safe_open(path / WEIGHTS_FILE, framework="numpy") as f:
            return dict.fromkeys(f.keys(), path / WEIGHTS_FILE)
    raise HFCheckpointError(f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")


class _Reader:
    """Opens each safetensors file on demand; `close()` unmaps them so their pages leave the process."""

    def __init__(self, weight_map: Mapping[str, Path]):
        self.weight_map = weight_map
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, Any] = {}

    def _file(self, name: str):
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def block(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Part of a tensor, read from the mapped file."""
        return self._file(name).get_slice(name)[index]

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _check_tensors(maps: Sequence[TensorMap], abstract: Mapping[str, Any], reader: _Reader, cfg: ModelConfig):
    """Every needed tensor exists with the right shape, and none is left unused (e.g. an o_proj bias)."""
    needed = set()
    for m in maps:
        names = [m.hf.format(i=i) for i in range(cfg.layers)] if m.stacked else [m.hf]
        want = _hf_shape(abstract[m.path].shape, m)
        for name in names:
            if name not in reader.weight_map:
                raise HFCheckpointError(f"checkpoint is missing tensor {name!r} (for parameter {m.path})")
            got = reader.shape(name)
            if got != want:
                raise HFCheckpointError(f"tensor {name!r} has shape {got}, expected {want} (for {m.path})")
        needed.update(names)
    unused = sorted(
        n
        for n in reader.weight_map
        if n not in needed
        and not _IGNORED_TENSORS.search(n)
        and not (n.endswith("lm_head.weight") and cfg.head == "lm")
    )
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise HFCheckpointError(f"checkpoint has tensors this model does not use: {unused[:5]}{more}")


def _hf_groups(ndim: int, m: TensorMap) -> list[tuple[int, ...]]:
    """Our (per-layer) dims grouped as HF flattens them, in HF's dim order: kernels are [out, in]."""
    dims = tuple(range(ndim))
    if m.fan_in:
        return [dims[m.fan_in :], dims[: m.fan_in]]
    return [dims] if m.path.endswith("/bias") else [(d,) for d in dims]


def _read_block(reader: _Reader, name: str, idx: tuple[slice, ...], shape: tuple[int, ...], m: TensorMap):
    """The block `idx` of one HF tensor in our layout, reading only the rows and columns it needs.

    A group of our dims that HF flattens into one maps to a contiguous HF range when only its leading dim is
    sliced (heads split, head_dim whole); otherwise the group is read whole and cut afterwards.
    """
    full = slice(None)
    hf_index, block_dims, rest = [], [], list(idx)
    for group in _hf_groups(len(shape), m):
        inner = math.prod(shape[d] for d in group[1:])
        if all(idx[d] == full for d in group[1:]):
            lo, hi, _ = idx[group[0]].indices(shape[group[0]])
            hf_index.append(slice(lo * inner, hi * inner))
            block_dims += [hi - lo] + [shape[d] for d in group[1:]]
            rest[group[0]] = full
        else:  # a split inside the group: read the group whole, cut below
            hf_index.append(full)
            block_dims += [shape[d] for d in group]
    order = [d for group in _hf_groups(len(shape), m) for d in group]
    block = reader.block(name, tuple(hf_index)).reshape(block_dims).transpose(np.argsort(order))
    return block[tuple(rest)]


def _read_shard(reader: _Reader, m: TensorMap, shape: tuple[int, ...], idx: tuple[slice, ...], layers, dtype):
    """One device shard of a parameter as a host array, layer by layer for a stacked parameter."""
    sizes = [len(range(*s.indices(n))) for s, n in zip(idx, shape, strict=True)]
    shard = np.empty(sizes, dtype)
    if not m.stacked:
        shard[...] = _read_block(reader, m.hf, idx, shape, m)
        return shard
    lo, hi, _ = idx[0].indices(shape[0])
    for i in range(lo, min(hi, layers)):
        shard[i - lo] = _read_block(reader, m.hf.format(i=i), idx[1:], shape[1:], m)
    return shard


def _load_param(reader: _Reader, m: TensorMap, aval, sharding) -> jax.Array:
    """One parameter placed shard by shard on this host's devices: the host holds one shard at a time."""
    shape = tuple(aval.shape)
    index_map = sharding.addressable_devices_indices_map(shape)
    replicas: dict[tuple, tuple[tuple[slice, ...], list]] = {}
    for device, idx in index_map.items():
        replicas.setdefault(_index_key(idx), (idx, []))[1].append(device)
    on_device = {}
    for idx, devices in replicas.values():
        shard = _read_shard(reader, m, shape, idx, shape[0] if m.stacked else 1, aval.dtype)
        on_device.update({d: jax.device_put(shard, d) for d in devices})
        del shard
    return jax.make_array_from_single_device_arrays(shape, sharding, [on_device[d] for d in index_map])


def _tensor_prefix(weight_map: Mapping[str, Path]) -> str:
    """'model.' for *ForCausalLM / *ForSequenceClassification files, '' for a bare base model's."""
    if "model.embed_tokens.weight" in weight_map or "embed_tokens.weight" not in weight_map:
        return "model."
    return ""


def load_hf(
    path: str | Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    preset: str = "fsdp",
    dtype: str = "float32",
    param_dtype: str = "float32",
) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params pure dict) from an HF checkpoint directory, sharded over `mesh` by `preset`."""
    path = Path(path)
    cfg = config_from_hf(read_hf_config(path), dtype=dtype, param_dtype=param_dtype)
    _, abstract = abstract_model(cfg)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        shardings = tree_shardings(abstract, preset, mesh)
    flat_abstract, flat_shardings = flatten_tree(abstract), flatten_tree(shardings)
    weight_map = _weight_map(path)
    maps = tensor_maps(cfg, _tensor_prefix(weight_map))
    if {m.path for m in maps} != set(flat_abstract):
        raise AssertionError(
            f"tensor table and model disagree: {sorted({m.path for m in maps} ^ set(flat_abstract))}"
        )
    reader = _Reader(weight_map)
    try:
        _check_tensors(maps, flat_abstract, reader, cfg)
    finally:
        reader.close()
    params = {}
    for m in maps:
        reader = _Reader(weight_map)
        try:
            params[m.path] = _load_param(reader, m, flat_abstract[m.path], flat_shardings[m.path])
        finally:
            reader.close()  # unmap now: mapped file pages would otherwise count towards host RSS
    return cfg, unflatten_tree(params)
