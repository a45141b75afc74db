"""LoRA: low-rank adapters on chosen projections, as pure functions of params pytrees.

A small implementation of its own rather than qwix (which Tunix uses): qwix applies LoRA by intercepting the
operations of a Flax model's modules, while jaxrl's forward runs over a pure params dict inside a layer scan
(and the sampler over per-layer slices of it), and qwix could not be installed from the package index here.
Only the layer stack's projections (q, k, v, o, gate, up, down) take adapters, not embeddings or heads. The
model (jaxrl.models.transformer) holds adapter slots `lora_a` [*in, r] and `lora_b`
[r, *out] beside each kernel whose path matches `model.lora_targets` (a regex over parameter paths, as the
sharding table's) and computes x @ W + (alpha / r) * (x @ A) @ B. That form, rather than merging W + s·A@B per
call, leaves the frozen kernel untouched (no merged copy of a 70B model, no full-size weight gradient: only A
and B get gradients), and the adapters take their shardings from their kernel's rule
(`sharding.adapter_axes`).

A run's parameters split in two: the frozen base (every kernel, norm, embedding) and the trainables (the
adapters, and a scalar model's head, which is new and tiny). B starts at zero, so a fresh adapter is an exact
no-op; with B zeroed again (`adapters_off`) the model is the base, bit for bit, which is how DPO's reference
and PPO's KL reference come without a second copy of the model. `merge` folds the adapters into the kernels
for export (`jaxrl convert`, a run's final parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp

from jaxrl import sharding
from jaxrl.config import ConfigError, ModelConfig
from jaxrl.models.transformer import lora_scale

ADAPTER_LEAVES = ("lora_a", "lora_b")
# What a LoRA run trains besides the adapters: a scalar model's head (reward model, value model).
TRAINED_IN_FULL = r"^score/"
PROJECTIONS = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")


def check_targets(cfg: ModelConfig) -> None:
    """Raises ConfigError unless model.lora_targets is a regex that matches at least one projection kernel."""
    try:
        pattern = re.compile(cfg.lora_targets)
    except re.error as e:
        raise ConfigError(f"model.lora_targets is not a regex: {e}") from None
    if not any(pattern.search(f"layers/{name}/kernel") for name in PROJECTIONS):
        paths = ", ".join(f"layers/{name}/kernel" for name in PROJECTIONS)
        raise ConfigError(f"model.lora_targets={cfg.lora_targets!r} matches none of the projections {paths}")


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The model config without adapters (what a LoRA run's base and its merged export are)."""
    return dataclasses.replace(cfg, lora_rank=0)


def _is_trainable(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES or re.search(TRAINED_IN_FULL, path) is not None


def _select(params: dict, keep, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            inner = _select(value, keep, path + "/")
            if inner:
                out[key] = inner
        elif keep(path):
            out[key] = value
    return out


def split(params: dict) -> tuple[dict, dict]:
    """(frozen base, trainables) of a LoRA model's params: the adapters and a scalar head train."""
    return _select(params, lambda p: not _is_trainable(p)), _select(params, _is_trainable)


def combine(frozen: dict, trainable: dict) -> dict:
    """The model's params from its two parts (the inverse of `split`; no array is copied)."""
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = combine(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def adapters_off(params: dict) -> dict:
    """The same params with every B zeroed: the base model's forward exactly, since (x @ A) @ 0 adds exact
    zeros; every other leaf is the same array (not a copy), so no second model is held. (The objectives stop
    the gradient of the reference's log-probs.)"""

    def off(path, x):
        return jnp.zeros_like(x) if sharding.path_str(path).endswith("lora_b") else x

    return jax.tree_util.tree_map_with_path(off, params)


def with_adapters(base: dict, abstract: dict, key: jax.Array) -> dict:
    """`base` (params without adapters) with fresh adapters for the slots of `abstract` (the LoRA model's
    abstract params): A uniform in ±1/sqrt(fan_in) (as PEFT), B zeros, in the kernel's dtype."""
    _, slots = split(abstract)
    leaves = jax.tree_util.tree_leaves_with_path(slots)
    keys = iter(jax.random.split(key, max(1, len(leaves))))

    def fresh(path, leaf):
        name = sharding.path_str(path)
        if name.endswith("lora_b"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        if not name.endswith("lora_a"):
            return None  # a head: kept from `base`
        stacked = name.startswith("layers/")
        fan_in = math.prod(leaf.shape[int(stacked) : -1])
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(next(keys), leaf.shape, leaf.dtype, -bound, bound)

    adapters = jax.tree_util.tree_map_with_path(fresh, slots)
    adapters = _select(adapters, lambda p: p.rsplit("/", 1)[-1] in ADAPTER_LEAVES)
    return combine(base, adapters)


def init_params(model_cfg: ModelConfig, base: dict, seed: int, mesh, preset: str) -> dict:
    """A LoRA model's params: `base` (laid out for `base_config(model_cfg)`) with fresh adapters, created in
    their sharded layout (the adapters' stream is the run's seed folded with a constant, so the base's
    initialisation is the same as without adapters)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x10A)
    return _init_program(model_cfg, mesh, preset)(base, key)


@functools.lru_cache(maxsize=16)
def _init_program(model_cfg: ModelConfig, mesh, preset: str):
    """The jitted adapter initialisation of a model on a mesh, the key an argument (one compile per model)."""
    from jaxrl.models.abstract import abstract_model

    _, abstract = abstract_model(model_cfg)
    shardings = sharding.tree_shardings(abstract, preset, mesh)
    return jax.jit(lambda b, key: with_adapters(b, abstract, key), out_shardings=shardings)


def merge(params: dict, cfg: ModelConfig) -> dict:
    """The base layout with each adapter folded into its kernel, W + (alpha / r) A @ B in the kernel's dtype
    (fp32 products): what an export writes and `base_config(cfg)` reads."""
    scale = lora_scale(cfg)

    def fold(node: dict) -> dict:
        out = {k: fold(v) if isinstance(v, dict) else v for k, v in node.items() if k not in ADAPTER_LEAVES}
        if "lora_a" in node:
            a, b, kernel = node["lora_a"], node["lora_b"], node["kernel"]
            product = lambda a, b: jnp.tensordot(a, b, axes=1, preferred_element_type=jnp.float32)
            lead = a.ndim + b.ndim - 2 - kernel.ndim  # 1 for a layer-stacked kernel
            delta = jax.vmap(product)(a, b) if lead else product(a, b)
            out["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
        return out

    return fold(params)


def count(params: dict) -> int:
    """How many adapter parameters `params` holds."""
    _, trainable = split(params)
    adapters = _select(trainable, lambda p: p.rsplit("/", 1)[-1] in ADAPTER_LEAVES)
    return sum(x.size for x in jax.tree.leaves(adapters))
