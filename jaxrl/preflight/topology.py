"""TPU slices for preflight: chip generations, slice names and shapes, and the devices a compile targets
(libtpu's compile-only topology descriptions, or a fake-CPU mesh of the same device count)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax

GIB = 1 << 30


class PreflightError(RuntimeError):
    """Preflight could not compile (a bad topology, no libtpu where one was required, ...)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip, its peak bf16 FLOP/s and HBM bandwidth per chip (the vendor's
    published figures, for the roofline estimate), and how its slices are named by gcloud and by libtpu."""

    generation: str
    hbm_gib: float
    cores_in_name: int  # "v4-8" and "v5p-8" count TensorCores (2 per chip); v5e and v6e count chips
    dims: int  # torus dimensions
    libtpu_prefix: str
    gcloud_prefix: str
    runtime_version: str  # TPU VM software version for JAX
    peak_bf16_tflops: float = 0.0  # dense bf16 TFLOP/s per chip
    hbm_gbps: float = 0.0  # HBM bandwidth per chip, GB/s (10^9 bytes)


# Peak bf16 TFLOP/s and HBM GB/s per chip, as Google Cloud's system-architecture pages state them:
# v4 275 and 1200 (https://docs.cloud.google.com/tpu/docs/v4), v5e 197 and 819
# (https://docs.cloud.google.com/tpu/docs/v5e), v5p 459 and 2765 (https://docs.cloud.google.com/tpu/docs/v5p),
# v6e 918 and 1638 (https://docs.cloud.google.com/tpu/docs/v6e).
CHIPS = {
    "v4": Chip("v4", 32, 2, 3, "v4", "v4", "tpu-ubuntu2204-base", 275, 1200),
    "v5e": Chip("v5e", 16, 1, 2, "v5e", "v5litepod", "v2-alpha-tpuv5-lite", 197, 819),
    "v5p": Chip("v5p", 95, 2, 3, "v5", "v5p", "v2-alpha-tpuv5", 459, 2765),
    "v6e": Chip("v6e", 32, 1, 2, "v6e", "v6e", "v2-alpha-tpuv6e", 918, 1638),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its chip, chip count and torus shape."""

    chip: Chip
    shape: tuple[int, ...]
    slices: int = 1  # multi-slice: this many identical slices joined over the data-centre network

    @property
    def chips(self) -> int:
        """Chips of one slice."""
        return math.prod(self.shape)

    @property
    def devices(self) -> int:
        """Chips of every slice: the devices a program spans."""
        return self.chips * self.slices

    @property
    def label(self) -> str:
        """The slice's name, with the slice count when there are several ("2 x v5p-128")."""
        return self.name if self.slices == 1 else f"{self.slices} x {self.name}"

    @property
    def name(self) -> str:
        """The slice as this project names it, e.g. "v5p-128" (TensorCores for v4/v5p, chips otherwise)."""
        return f"{self.chip.generation}-{self.chips * self.chip.cores_in_name}"

    @property
    def accelerator_type(self) -> str:
        """The slice as gcloud's --accelerator-type names it, e.g. "v5litepod-64"."""
        return f"{self.chip.gcloud_prefix}-{self.chips * self.chip.cores_in_name}"

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.libtpu_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def hbm_bytes(self) -> int:
        return int(self.chip.hbm_gib * GIB)


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The torus shape of a slice of `chips` chips (a power of two) with `dims` dimensions."""
    # Slices grow by doubling their smallest dimension (the last one on ties): 2x2x1, 2x2x2, 2x2x4, 2x4x4, ...
    if chips & (chips - 1):
        raise PreflightError(f"{chips} chips is not a power of two; give the shape, e.g. v5p:4x4x12")
    shape = [1] * dims
    if dims == 3 and chips >= 4:
        shape = [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """ "v5p-128", "v5e-64" (or "v5litepod-64"), "v6e-8", "v4-8", or an explicit shape "v5p:4x4x12"."""
    text = name.strip().lower()
    if ":" in text:
        generation, shape_text = text.split(":", 1)
    elif "-" in text:
        generation, count_text = text.rsplit("-", 1)
    else:
        raise PreflightError(f"topology {name!r}: expected e.g. v5p-128, v5e-64 or v5p:4x4x8")
    generation = _ALIASES.get(generation, generation)
    if generation not in CHIPS:
        raise PreflightError(
            f"topology {name!r}: unknown TPU generation {generation!r}; known: {sorted(CHIPS)}"
        )
    chip = CHIPS[generation]
    try:
        if ":" in text:
            shape = tuple(int(s) for s in shape_text.split("x"))
            if len(shape) != chip.dims:
                raise PreflightError(f"topology {name!r}: {generation} slices have {chip.dims} dimensions")
        else:
            count = int(count_text)
            if count % chip.cores_in_name:
                raise PreflightError(
                    f"topology {name!r}: {generation} names count TensorCores, {chip.cores_in_name} per chip"
                )
            shape = torus_shape(count // chip.cores_in_name, chip.dims)
    except ValueError:
        raise PreflightError(f"topology {name!r}: cannot read the size") from None
    return Topology(chip, shape)


def _quiet_libtpu_env(topology: Topology) -> None:
    # Off a TPU VM, libtpu looks for the VM's metadata and worker list when it loads, and takes a lock file
    # that lets one process at a time load it; say there is no VM and no lock is needed (only when no TPU chip
    # is attached, so a preflight on a real TPU VM leaves its runtime alone).
    try:
        from jax._src import hardware_utils

        if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
            return
    except Exception:  # noqa: BLE001 - a missing helper only means we cannot tell; keep the defaults
        pass
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_ACCELERATOR_TYPE", topology.accelerator_type),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_WORKER_ID", "0"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),  # compile-only: several preflights (or test workers) at once
    ):
        os.environ.setdefault(key, value)


def tpu_devices(topology: Topology) -> list:
    """Compile-only TPU devices of the slice, from libtpu (raises when libtpu is missing or cannot)."""
    from jax.experimental import topologies

    _quiet_libtpu_env(topology)
    kwargs: dict[str, Any] = {}
    if topology.chip.dims == 3:
        kwargs["chip_config_name"] = "megacore"  # one JAX device per chip, as on a v4/v5p VM
    shape3 = tuple(topology.shape) + (1,) * (3 - len(topology.shape))
    single_host = topology.chips <= (4 if topology.chip.dims == 3 else 8)
    kwargs["chips_per_host_bounds"] = shape3 if single_host else (2, 2, 1)
    if topology.slices > 1:
        kwargs["num_slices"] = topology.slices
    described = topologies.get_topology_desc(topology.libtpu_name, "tpu", **kwargs)
    devices = list(described.devices)
    if len(devices) != topology.devices:
        raise PreflightError(
            f"libtpu described {len(devices)} devices for {topology.label}, expected {topology.devices}"
        )
    return devices


def cpu_devices(count: int) -> list:
    """`count` CPU devices for a fallback compile (sets the CPU device count if JAX has not started yet)."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", count)
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise PreflightError(
            f"a fake-CPU compile of {count} devices needs {count} CPU devices but JAX already "
            f"started with {len(devices)}; run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count}"
        )
    return devices[:count]


def slice_devices(topology: Topology, backend: str = "auto") -> tuple[list, str, str]:
    """(devices, backend, note): libtpu's compile-only devices, or (backend "cpu") a fake-CPU fallback."""
    if backend not in ("auto", "tpu", "cpu"):
        raise PreflightError(f"backend must be auto, tpu or cpu, got {backend!r}")
    note = "forced with --backend cpu"
    if backend in ("auto", "tpu"):
        try:
            return tpu_devices(topology), "tpu", f"libtpu compile-only topology {topology.libtpu_name}"
        except Exception as e:  # noqa: BLE001 - any libtpu failure is reported, then maybe falls back
            if backend == "tpu":
                raise PreflightError(
                    f"libtpu could not describe {topology.name}: {e} "
                    "(pip install 'jaxrl[tpu]' installs libtpu)"
                ) from e
            note = f"libtpu unavailable: {str(e).splitlines()[0][:200]}"
    if topology.slices > 1:
        note += "; the CPU devices have no slices, so the mesh is not the multi-slice one"
    return cpu_devices(topology.devices), "cpu", note
