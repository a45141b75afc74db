"""Hugging Face checkpoints: config.json + safetensors <-> (ModelConfig, params), read tensor by tensor.

Supported: Llama (2, 3.x with llama3 RoPE scaling), Mistral, Qwen2 (QKV bias), Qwen3 (per-head QK-norm),
OLMo 2 (QK-norm over all heads, post-norm), each as *ForCausalLM (head "lm") or *ForSequenceClassification
(head "scalar", one label). Loading reads, for each device shard, only the part of each HF tensor that the
shard needs and puts it on its devices before reading the next, so besides the device buffers the host holds
one shard of one parameter at a time (a whole stacked parameter when there is no mesh).

Reward convention: a *ForSequenceClassification model scores every position; the sequence's reward is the
score at its last real token, i.e. the rightmost position where `mask_BT` is 1 (`last_token_scores`). This
equals transformers' pooling (the rightmost token that is not `pad_token_id`) when `mask_BT = tokens != pad`,
for right or left padding, and stays right when the pad id equals the eos id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrl.config import ModelConfig
from jaxrl.models.transformer import Transformer
from jaxrl.sharding import tree_shardings, use_mesh

# Architecture name -> (model family, head). The family decides the block variant (see _FAMILY).
_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "olmo2": "Olmo2"}
ARCHITECTURES: dict[str, tuple[str, str]] = {
    f"{prefix}For{kind}": (family, head)
    for family, prefix in _PREFIX.items()
    for kind, head in (("CausalLM", "lm"), ("SequenceClassification", "scalar"))
}

# Per family: its model_type and the block variant it fixes.
_FAMILY: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", qk_norm="none", norm_position="pre"),
    "mistral": dict(model_type="mistral", qk_norm="none", norm_position="pre"),
    "qwen2": dict(model_type="qwen2", qk_norm="none", norm_position="pre"),
    "qwen3": dict(model_type="qwen3", qk_norm="head", norm_position="pre"),
    "olmo2": dict(model_type="olmo2", qk_norm="full", norm_position="post"),
}

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
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
# Tensors a checkpoint may carry that the model recomputes or does not use.
_IGNORED_TENSORS = re.compile(r"rotary_emb\.inv_freq$")


class HFCheckpointError(ValueError):
    """An unsupported, incomplete or inconsistent Hugging Face checkpoint."""


def is_hf_dir(path: str | Path) -> bool:
    """A directory holding an HF config.json (with `architectures`) rather than a jaxrl run."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    return "architectures" in json.loads(cfg_file.read_text())


def read_hf_config(path: str | Path) -> dict:
    """The checkpoint's config.json as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HFCheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    return json.loads(file.read_text())


def architecture_of(hf: Mapping[str, Any]) -> str:
    """The single supported architecture a config.json names, or an error listing what is supported."""
    names = hf.get("architectures") or []
    if not names and hf.get("model_type") in _FAMILY:
        names = [_PREFIX[hf["model_type"]] + "ForCausalLM"]  # a bare config: the causal LM of its family
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise HFCheckpointError(
            f"unsupported architecture {names or '(none in config.json)'}; supported: {sorted(ARCHITECTURES)}"
        )
    return names[0]


def _rope_params(hf: Mapping[str, Any]) -> dict:
    """RoPE settings from either transformers 4 (`rope_theta` + `rope_scaling`) or 5 (`rope_parameters`)."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if "full_attention" in params and isinstance(params["full_attention"], Mapping):
        params = params["full_attention"]  # nested by layer type; these families use full attention only
    params = dict(params)
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _check_unsupported(hf: Mapping[str, Any], family: str) -> None:
    """Refuses config features the model does not implement, rather than loading a different model."""
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if family != "qwen2" and hf.get("attention_bias", False):
        raise HFCheckpointError("attention_bias=True (which includes an o_proj bias) is not supported")
    if hf.get("mlp_bias", False):
        raise HFCheckpointError("mlp_bias=True is not supported")


def _sliding_window(hf: Mapping[str, Any], family: str) -> tuple[int, int]:
    """(sliding_window, window_layers) as ModelConfig holds them: Mistral windows every layer when
    `sliding_window` is set; Qwen2/3 when `use_sliding_window`, from layer `max_window_layers` on (or as
    `layer_types` says, when it is full attention then sliding attention)."""
    window = hf.get("sliding_window")
    uses = window is not None if family == "mistral" else bool(hf.get("use_sliding_window", False))
    if family not in ("mistral", "qwen2", "qwen3") or not uses or not window:
        return 0, 0
    layers = int(hf["num_hidden_layers"])
    start = 0 if family == "mistral" else min(int(hf.get("max_window_layers", 28)), layers)
    types = hf.get("layer_types")
    if types:
        start = next((i for i, t in enumerate(types) if t == "sliding_attention"), layers)
        if list(types) != ["full_attention"] * start + ["sliding_attention"] * (layers - start):
            raise HFCheckpointError(f"layer_types={list(types)} is not supported: only full attention layers "
                                    f"followed by sliding-window layers")
    return (int(window), start) if start < layers else (0, 0)


def config_from_hf(
    hf: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str = "float32"
) -> ModelConfig:
    """A ModelConfig from a config.json dict; unsupported features are errors."""
    family, head = ARCHITECTURES[architecture_of(hf)]
    _check_unsupported(hf, family)
    if head == "scalar" and int(hf.get("num_labels", len(hf.get("id2label") or [0]))) != 1:
        raise HFCheckpointError(
            "a sequence-classification checkpoint must have num_labels=1 to be a reward model"
        )
    rope = _rope_params(hf)
    if rope["rope_type"] not in ("default", "llama3"):
        raise HFCheckpointError(f"rope type {rope['rope_type']!r} is not supported (only default and llama3)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    llama3 = rope["rope_type"] == "llama3"
    sliding_window, window_layers = _sliding_window(hf, family)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden=hidden,
        layers=int(hf["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        mlp=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope["rope_theta"]),
        rope_scaling="llama3" if llama3 else "none",
        rope_factor=float(rope.get("factor", 8.0)) if llama3 else ModelConfig.rope_factor,
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0))
        if llama3
        else ModelConfig.rope_low_freq_factor,
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0))
        if llama3
        else ModelConfig.rope_high_freq_factor,
        rope_original_max_positions=int(
            rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        )
        if llama3
        else ModelConfig.rope_original_max_positions,
        qkv_bias=family == "qwen2",
        qk_norm=_FAMILY[family]["qk_norm"],
        norm_position=_FAMILY[family]["norm_position"],
        sliding_window=sliding_window,
        window_layers=window_layers,
        # All five families default to untied embeddings when the key is absent.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head=head,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def architecture_for(cfg: ModelConfig) -> str:
    """The natural HF architecture of a model: Qwen3 / OLMo 2 / Qwen2 / Llama by its block variant."""
    if cfg.qk_norm == "head":
        family = "Qwen3"
    elif cfg.qk_norm == "full":
        family = "Olmo2"
    elif cfg.qkv_bias:
        family = "Qwen2"
    else:
        family = "Mistral" if cfg.sliding_window else "Llama"
    return f"{family}For{'SequenceClassification' if cfg.head == 'scalar' else 'CausalLM'}"


_STRUCTURAL = (
    "vocab_size",
    "hidden",
    "layers",
    "heads",
    "kv_heads",
    "head_size",
    "mlp",
    "norm_eps",
    "rope_theta",
    "rope_scaling",
    "qkv_bias",
    "qk_norm",
    "norm_position",
    "tie_embeddings",
    "head",
    "sliding_window",
    "window_layers",
)


def hf_config_for(
    cfg: ModelConfig, architecture: str | None = None, overrides: Mapping | None = None
) -> dict:
    """A config.json dict describing `cfg` as `architecture`; an error if that architecture cannot hold it."""
    architecture = architecture or architecture_for(cfg)
    if architecture not in ARCHITECTURES:
        raise HFCheckpointError(
            f"unsupported architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}"
        )
    family, _ = ARCHITECTURES[architecture]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_positions,
        )
    max_positions = 4096
    if cfg.rope_scaling == "llama3":
        max_positions = int(cfg.rope_original_max_positions * cfg.rope_factor)
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": _FAMILY[family]["model_type"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.mlp,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings, so transformers 4 (rope_theta/rope_scaling) and 5 (rope_parameters) read the same.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling != "none" else None,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
        "use_cache": True,
    }
    if family != "qwen2":
        hf["attention_bias"] = False
    if family == "llama":
        hf["mlp_bias"] = False
    if family in ("mistral", "qwen2", "qwen3"):
        hf.update(sliding_window=None, use_sliding_window=False)
        if cfg.sliding_window:
            hf.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
            if family != "mistral":
                hf["max_window_layers"] = cfg.window_layers
    if cfg.head == "scalar":
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    hf.update(overrides or {})
    parsed = config_from_hf(hf, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    differ = [f for f in _STRUCTURAL if getattr(parsed, f) != getattr(cfg, f)]
    if cfg.rope_scaling == "llama3":
        rope_fields = (
            "rope_factor",
            "rope_low_freq_factor",
            "rope_high_freq_factor",
            "rope_original_max_positions",
        )
        differ += [f for f in rope_fields if getattr(parsed, f) != getattr(cfg, f)]
    if differ:
        raise HFCheckpointError(
            f"architecture {architecture} cannot represent this model: {differ} would change"
        )
    return hf


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


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    """The model's graphdef and its parameters as a pure dict of ShapeDtypeStructs (nothing allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0))))
    return graphdef, nnx.to_pure_dict(state)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
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
    # Biases are stored flat ([H*Dh]); norms and embeddings as they are.
    return (math.prod(per_layer),) if m.path.endswith("/bias") else per_layer


def hf_tensor_shapes(cfg: ModelConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of a model with its shape, in table order."""
    flat = _flatten(abstract_model(cfg)[1])
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
    flat_abstract, flat_shardings = _flatten(abstract), _flatten(shardings)
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
    return cfg, _unflatten(params)


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
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {"_from_model_config": True, **{k: hf[k] for k in keys if hf.get(k) is not None}}


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
    flat = _flatten(params)
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
    if source is not None and (source / "generation_config.json").is_file():
        # Keep the original (e.g. Llama 3 Instruct lists several stop ids).
        if (source / "generation_config.json").resolve() != (path / "generation_config.json").resolve():
            shutil.copyfile(source / "generation_config.json", path / "generation_config.json")
        return
    (path / "generation_config.json").write_text(
        json.dumps(_generation_config(hf), indent=2, sort_keys=True) + "\n"
    )


def last_token_scores(scores_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Per-sequence scores [B]: the score at the rightmost position where mask_BT is 1 (0 if none is)."""
    positions_BT = jnp.arange(scores_BT.shape[1])[None, :] * (mask_BT != 0)
    last_B = jnp.argmax(positions_BT, axis=1)
    return jnp.take_along_axis(scores_BT, last_B[:, None], axis=1)[:, 0]


def _pad_batch(tokens, pad_id: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(tokens [B,T], mask [B,T], was_single): ragged lists are right-padded with pad_id."""
    if isinstance(tokens, (np.ndarray, jax.Array)):
        tokens = np.asarray(tokens)
        single = tokens.ndim == 1
        tokens_BT = tokens[None] if single else tokens
        return tokens_BT.astype(np.int32), np.ones(tokens_BT.shape, np.int32), single
    rows = list(tokens)
    single = bool(rows) and not isinstance(rows[0], (list, tuple, np.ndarray))
    rows = [rows] if single else rows
    T = max(len(r) for r in rows)
    tokens_BT = np.full((len(rows), T), pad_id, np.int32)
    mask_BT = np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        tokens_BT[b, : len(row)] = row
        mask_BT[b, : len(row)] = 1
    return tokens_BT, mask_BT, single


class HFModel:
    """A loaded checkpoint for notebooks: call it on token ids for logits (LM) or per-sequence scores (RM)."""

    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        *,
        hf_config: Mapping,
        tokenizer=None,
        mesh=None,
        preset: str = "fsdp",
    ):
        self.config, self.params, self.hf_config, self.tokenizer = config, params, dict(hf_config), tokenizer
        self.mesh, self.preset = mesh, preset
        self.graphdef, _ = abstract_model(config)
        pad = hf_config.get("pad_token_id")
        self.pad_id = int(pad if pad is not None else (tokenizer.pad_id if tokenizer is not None else 0))
        self._forward = jax.jit(self._apply)

    @property
    def module(self) -> Transformer:
        """The nnx module holding these parameters."""
        return nnx.merge(self.graphdef, self.params)

    def _apply(self, params, tokens_BT, mask_BT):
        ctx = use_mesh(self.mesh, self.preset) if self.mesh is not None else contextlib.nullcontext()
        # As the sampler does: pads form segment 0 and never attend to or from real tokens, and positions
        # count real tokens only, so a left-padded row gives its unpadded logits (pad positions are junk).
        valid_BT = (mask_BT != 0).astype(jnp.int32)
        positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
        with ctx:
            out = nnx.merge(self.graphdef, params)(tokens_BT, positions_BT, valid_BT)
        return last_token_scores(out, mask_BT) if self.config.head == "scalar" else out

    def __call__(self, tokens, mask=None) -> jax.Array:
        """Logits [B,T,V] (LM) or scores [B] at each sequence's last real token (RM).

        `tokens` is [B,T] or [T] (ids), or a list of ragged id lists (right-padded here); `mask` [B,T] marks
        the real tokens of a padded array, left- or right-padded (default: all real). Real tokens never attend
        to pads and their positions start at 0 at the first real token (transformers' generate convention).
        """
        tokens_BT, mask_BT, single = _pad_batch(tokens, self.pad_id)
        if mask is not None:
            mask_BT = np.asarray(mask, np.int32).reshape(tokens_BT.shape)
        out = self._forward(self.params, jax.device_put(tokens_BT), jax.device_put(mask_BT))
        return out[0] if single else out

    def __repr__(self) -> str:
        kind = "reward model" if self.config.head == "scalar" else "LM"
        return (
            f"HFModel({self.hf_config.get('architectures')}, {kind}, tokenizer={self.tokenizer is not None})"
        )


def load_model(
    path: str | Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    preset: str = "fsdp",
    dtype: str = "float32",
    param_dtype: str = "float32",
) -> HFModel:
    """One call for notebooks: parameters, config and (when present) the checkpoint's chat tokenizer."""
    path = Path(path)
    cfg, params = load_hf(path, mesh=mesh, preset=preset, dtype=dtype, param_dtype=param_dtype)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from jaxrl.data.chat import HFChatTokenizer

        tokenizer = HFChatTokenizer.from_dir(path)
    return HFModel(cfg, params, hf_config=read_hf_config(path), tokenizer=tokenizer, mesh=mesh, preset=preset)
