"""Meshes, the parameter-path rule table, presets (the only place mesh axis names meet logical names)."""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# First match wins. Paths are "/"-joined pytree keys; a leading "layers" axis comes from stacking the blocks.
# Applied to jax.eval_shape of the whole train state, so optimizer moments (whose paths end the same way)
# inherit the layout of their parameter.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embed/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"score/kernel$", ("embed", None)),
    (r"attn/q/kernel$", ("layers", "embed", "heads", "head_dim")),
    (r"attn/(k|v)/kernel$", ("layers", "embed", "kv_heads", "head_dim")),
    (r"attn/q/bias$", ("layers", "heads", "head_dim")),
    (r"attn/(k|v)/bias$", ("layers", "kv_heads", "head_dim")),
    (r"attn/o/kernel$", ("layers", "heads", "head_dim", "embed")),
    (r"attn/(q|k)_norm/scale$", ("layers", None)),
    (r"mlp/(gate|up)/kernel$", ("layers", "embed", "mlp")),
    (r"mlp/down/kernel$", ("layers", "mlp", "embed")),
    (r"layers/.*norm/scale$", ("layers", None)),
    (r"norm/scale$", (None,)),
]

PRESETS: dict[str, dict[str, tuple[str, ...] | str]] = {
    "dp": {"batch": ("data", "fsdp")},
    "fsdp": {"batch": ("data", "fsdp"), "embed": "fsdp"},
    "fsdp_tp": {
        "batch": ("data", "fsdp"),
        "embed": "fsdp",
        "mlp": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "vocab": "tensor",
    },
}
# fsdp_tp with sequence parallelism: the residual stream's sequence between blocks (what full remat saves per
# layer) split over the tensor axis too, a quarter of the saved activations on a tensor axis of 4, for the
# all-gathers and reduce-scatters around each block (bench/results/preflight.md: Llama-3-8B DPO at 4096
# tokens on v5e-64, train-step temporaries 4.90 -> 3.48 GiB, estimated bytes per step +15%).
PRESETS["fsdp_tp_sp"] = {**PRESETS["fsdp_tp"], "seq": "tensor"}
# Activation axes whose sharding is an optimisation: replicated without a warning when the mesh axis does
# not divide them (one decode position, an odd prompt width).
OPTIONAL_AXES = frozenset({"seq"})

# Leaves this small may match no rule and are replicated (step counters, scalars, tiny biases).
MAX_UNMATCHED_SIZE = 1 << 16


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over all (or the given) devices; one -1 axis absorbs the rest."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    if -1 in sizes:
        if len(devices) % known:
            named = dict(zip(MESH_AXES, sizes, strict=True))
            raise ConfigError(f"mesh axes {named} do not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        named = dict(zip(MESH_AXES, sizes, strict=True))
        raise ConfigError(f"mesh {named} needs {math.prod(sizes)} devices, have {len(devices)}")
    if cfg.preset not in PRESETS:
        raise ConfigError(f"mesh.preset must be one of {sorted(PRESETS)}, got {cfg.preset!r}")
    if cfg.granule not in ("slice", "process"):
        raise ConfigError(f"mesh.granule must be 'slice' or 'process', got {cfg.granule!r}")
    granules = _granules(devices, cfg.granule)
    if granules > 1:
        return _hybrid_mesh(devices, sizes, granules, by_process=cfg.granule == "process")
    # Process-major device order keeps the data axis across hosts and fsdp/tensor within one.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


def _granules(devices, granule: str) -> int:
    """How many granules (TPU slices, or processes with mesh.granule=process) the devices form."""
    if granule == "process":
        return len({d.process_index for d in devices})
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def _hybrid_mesh(devices, sizes: list[int], granules: int, by_process: bool = False) -> Mesh:
    """Devices in several granules joined by the data-centre network (TPU slices of a multi-slice job, or
    processes): the data axis spans the granules (its gradients' all-reduce crosses that network once per
    step) and every other axis stays within a granule (ICI, NVLink)."""
    from jax.experimental import mesh_utils

    what, one = ("processes", "process") if by_process else ("slices", "slice")
    if sizes[0] % granules:
        named = dict(zip(MESH_AXES, sizes, strict=True))
        raise ConfigError(
            f"mesh {named} over {granules} {what}: mesh.data must be a multiple of the {one} count "
            f"(data parallelism crosses {what}; fsdp and tensor stay within one)"
        )
    per_granule = (sizes[0] // granules, sizes[1], sizes[2])
    grid = mesh_utils.create_hybrid_device_mesh(
        per_granule,
        (granules, 1, 1),
        devices,
        process_is_granule=by_process,
        allow_split_physical_axes=True,
    )
    return Mesh(grid, MESH_AXES)


def describe(mesh: Mesh, cfg: MeshConfig) -> str:
    """One log line: the mesh's axes and preset, its devices and processes, and what the data axis spans."""
    axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    devices = list(mesh.devices.flat)
    processes = len({d.process_index for d in devices})
    line = f"mesh: {axes} (preset {cfg.preset}) over {len(devices)} devices in {processes} process(es)"
    granules = _granules(devices, cfg.granule)
    if granules > 1:
        what = {"slice": "slices", "process": "processes"}[cfg.granule]
        line += f"; the data axis spans {granules} {what} over the data-centre network"
    return line


def path_str(path) -> str:
    """A pytree key path as 'a/b/c'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def adapter_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """A LoRA adapter's logical axes (jaxrl.models.lora), derived from its kernel's rule in the same table:
    A [*layers, *in, r] keeps the kernel's input axes, B [*layers, r, *out] its output axes; the rank axis is
    replicated (it is small)."""
    kernel_path = path.rsplit("/", 1)[0] + "/kernel"
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, kernel_path):
            lead = axes[:1] if axes[0] == "layers" else ()
            body, n = axes[len(lead) :], ndim - 1 - len(lead)
            if not 0 < n < len(body):
                raise ValueError(f"{path}: {ndim} dims do not fit the rule {pattern!r} of its kernel")
            return lead + body[:n] + (None,) if path.endswith("lora_a") else lead + (None,) + body[-n:]
    raise ValueError(f"no sharding rule matches the kernel of adapter {path}; add one to PARAM_AXES")


def logical_axes(path: str, ndim: int, size: int) -> tuple[str | None, ...]:
    """The logical axis names of one leaf from the rule table; large unmatched leaves are an error."""
    if path.endswith(("/lora_a", "/lora_b")):
        return adapter_axes(path, ndim)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            if len(axes) == ndim:
                return axes
            if len(axes) == ndim + 1 and axes[0] == "layers":
                return axes[1:]  # an unstacked (single-layer) leaf
            raise ValueError(f"rule {pattern!r} gives {len(axes)} axes but {path} has {ndim} dims")
    if size > MAX_UNMATCHED_SIZE:
        raise ValueError(f"no sharding rule matches parameter {path} (size {size}); add one to PARAM_AXES")
    return (None,) * ndim


def spec_for(axes: Sequence[str | None], shape: Sequence[int], preset: str, mesh: Mesh) -> PartitionSpec:
    """Maps logical axes to mesh axes by preset, skipping mesh axes that do not divide or are already used."""
    rules = PRESETS[preset]
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=False):  # a rule may name fewer axes than the array has
        mesh_axes = rules.get(name) if name else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and dim % size and name in OPTIONAL_AXES:
            mesh_axes = ()
        elif mesh_axes and dim % size:
            warnings.warn(
                f"dimension {name}={dim} does not divide mesh axes {mesh_axes} (size {size}); replicated",
                stacklevel=2,
            )
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def tree_specs(abstract_tree, preset: str, mesh: Mesh):
    """PartitionSpecs for every leaf of an (abstract) pytree, by path rules."""

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        axes = logical_axes(path_str(path), len(shape), int(np.prod(shape)) if shape else 1)
        return spec_for(axes, shape, preset, mesh)

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def tree_shardings(abstract_tree, preset: str, mesh: Mesh):
    """NamedShardings for every leaf of an (abstract) pytree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(abstract_tree, preset, mesh))


def stacked_sharding(s: NamedSharding) -> NamedSharding:
    """A leaf stacked on a leading member axis (a sweep group): its sharding with that axis unsharded."""
    return NamedSharding(s.mesh, PartitionSpec(None, *s.spec))


def stack(trees: list):
    """Pytrees of one structure stacked leaf by leaf on a new leading axis."""
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


def batch_axes(preset: str) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over."""
    axes = PRESETS[preset]["batch"]
    return (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: Mesh, preset: str) -> NamedSharding:
    """Sharding of a batch array: leading dimension over the batch axes, the rest replicated."""
    axes = tuple(a for a in batch_axes(preset) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def batch_divisor(mesh: Mesh, preset: str) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in batch_axes(preset))


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh, preset: str) -> None:
    """Fails before compiling when a (micro)batch does not divide over the mesh."""
    divisor = batch_divisor(mesh, preset)
    micro = batch_size // grad_accum
    if batch_size % grad_accum or micro % divisor:
        raise ConfigError(
            f"train.batch_size={batch_size} with train.grad_accum={grad_accum} gives microbatches of {micro} "
            f"examples, which do not divide over the {divisor} batch shards of mesh {dict(mesh.shape)}; "
            f"use a batch size that is a multiple of {divisor * grad_accum}"
        )


_ACTIVE: contextvars.ContextVar[tuple[Mesh, str] | None] = contextvars.ContextVar("jaxrl_mesh", default=None)


def active_mesh() -> tuple[Mesh, str] | None:
    """The (mesh, preset) of the enclosing `use_mesh` block, or None outside one."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, preset: str):
    """Makes `constrain` active for code traced inside this block."""
    token = _ACTIVE.set((mesh, preset))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axis names; a no-op outside `use_mesh`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, preset = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, preset, mesh)))
