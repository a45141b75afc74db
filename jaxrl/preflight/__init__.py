"""Preflight: compile a config's real sharded programs ahead of time for a TPU slice, on this machine, and
compare their per-chip memory with the chip's HBM before any pod time is spent.

The devices come from libtpu's topology descriptions (`jax.experimental.topologies.get_topology_desc`,
compile-only: nothing runs, nothing is allocated; inputs are `jax.ShapeDtypeStruct`s). Without libtpu, the
same programs are compiled for a fake CPU mesh with the same device count, and the report says that it is
not a TPU compile (XLA:CPU makes other fusion and layout choices, so its figures are a rough guide only).

  topology   TPU generations, slice names and shapes, compile-only devices
  report     per-program memory, resident arrays, the peak and the verdict (memory model in its docstring)
  programs   what is compiled: the online-RL runner's own program list, the offline stages' train step
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from jaxrl import config as config_lib
from jaxrl import sharding
from jaxrl import validate as validate_lib
from jaxrl.config import RL_STAGES, Config, ConfigError
from jaxrl.models import init as model_init
from jaxrl.preflight.programs import (
    Builder,
    batch_spec,
    offline_programs,
    online_programs,
    source_model,
    with_architecture,
)
from jaxrl.preflight.report import Holding, PreflightReport, ProgramReport, attention_line, tree_device_bytes
from jaxrl.preflight.topology import (
    CHIPS,
    GIB,
    Chip,
    PreflightError,
    Topology,
    cpu_devices,
    parse_topology,
    slice_devices,
    torus_shape,
    tpu_devices,
)

__all__ = [
    "CHIPS",
    "GIB",
    "Chip",
    "Holding",
    "PreflightError",
    "PreflightReport",
    "ProgramReport",
    "Topology",
    "batch_spec",
    "cpu_devices",
    "load_config",
    "parse_topology",
    "run",
    "slice_devices",
    "suggestions",
    "tpu_devices",
    "tree_device_bytes",
]


def load_config(spec: str, overrides=()) -> Config:
    """A config from "experiments/<file>.py" (its get_config()) or "experiments/<file>.py:<function>", with
    dotted overrides applied and validated."""
    path, _, function = spec.partition(":") if not Path(spec).is_file() else (spec, "", "")
    module = config_lib.load_experiment(path)
    make = getattr(module, function or "get_config", None)
    if make is None:
        raise ConfigError(f"{path} defines no {function}()")
    return validate_lib.validate(config_lib.override(make(), overrides))


def run(
    cfg: Config,
    topology: str | Topology,
    *,
    backend: str = "auto",
    hbm_gib: float | None = None,
    config_label: str = "",
    log=print,
    slices: int = 1,
) -> PreflightReport:
    """Compiles the config's programs for the slice (abstract inputs only) and reports per-chip memory;
    `slices` > 1: as many identical slices joined over the data-centre network (multi-slice), the data axis
    of the mesh across them."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    if slices < 1:
        raise PreflightError(f"--slices must be at least 1, got {slices}")
    topo = dataclasses.replace(topo, slices=slices)
    devices, used_backend, note = slice_devices(topo, backend)
    model_cfg = model_init.stage_model_config(cfg)
    init_arch = source_model(cfg.train.init_from)
    model_cfg = with_architecture(model_cfg, init_arch)
    validate_lib.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    builder = Builder(cfg, mesh, log)
    if cfg.stage in RL_STAGES:
        online_programs(builder, cfg, model_cfg)
    else:
        offline_programs(builder, cfg, model_cfg)
    hbm = int(hbm_gib * GIB) if hbm_gib is not None else topo.hbm_bytes
    if hbm_gib is not None:
        builder.notes.append(f"HBM set to {hbm_gib:g} GiB per chip by --hbm-gib")
    return PreflightReport(
        config_label=config_label or cfg.name or cfg.stage,
        stage=cfg.stage,
        topology=topo,
        backend=used_backend,
        backend_note=note,
        mesh_shape=dict(mesh.shape),
        preset=cfg.mesh.preset,
        hbm_bytes=hbm,
        programs=builder.programs,
        holdings=builder.holdings,
        notes=builder.notes,
        attention=attention_line(model_cfg, devices),
    )


def suggestions(report: PreflightReport, cfg: Config) -> list[str]:
    """Changes likely to bring the peak under the HBM, most effective first."""
    out: list[str] = []
    worst = max(report.programs, key=report.peak_of)
    resident = sum(h.bytes for h in report.holdings if not h.offloaded)
    mesh, hbm, chips = report.mesh_shape, report.hbm_bytes, report.topology.chips
    need = 1 << max(0, math.ceil(math.log2(max(1.0, report.peak / hbm * chips))))
    larger = []
    if need > chips:
        bigger = Topology(report.topology.chip, torus_shape(need, report.topology.chip.dims))
        larger = [f"a larger slice: about {need} chips ({bigger.name}) at this per-chip load"]
    state = []
    if cfg.stage in RL_STAGES and not cfg.rl.offload_frozen:
        state.append(
            "keep the frozen reference and reward models in host memory between uses: "
            "--set rl.offload_frozen=true"
        )
    if cfg.model.param_dtype == "float32":
        state.append("bfloat16 master weights halve parameters and moments: --set model.param_dtype=bfloat16")
    if mesh.get("data", 1) > 1:
        out.append(
            f"shard parameters and optimizer state over every chip: --set mesh.data=1 --set mesh.fsdp=-1 "
            f"(now data={mesh['data']}: each data replica holds a full copy of the sharded state)"
        )
    if resident > 0.8 * hbm:
        out.append(
            f"the resident state alone is {resident / GIB:.1f} GiB per chip: spread it over more chips"
        )
        out += larger + state
        larger = state = []
    if worst.temporaries > 0.3 * report.peak_of(worst):
        if cfg.model.remat != "full":
            out.append(
                f"recompute activations in the backward pass: --set model.remat=full "
                f"(now {cfg.model.remat!r}; {worst.name} temporaries are "
                f"{worst.temporaries / GIB:.1f} GiB per chip)"
            )
        rows = (cfg.rl.minibatch if cfg.stage in RL_STAGES else cfg.train.batch_size) // cfg.train.grad_accum
        divisor = math.prod(v for k, v in mesh.items() if k in ("data", "fsdp"))
        if rows % (2 * divisor) == 0:
            out.append(f"smaller microbatches: --set train.grad_accum={2 * cfg.train.grad_accum}")
        if mesh.get("tensor", 1) == 1:
            out.append(
                "split heads, MLP and vocabulary over a tensor axis: --set mesh.tensor=4 "
                "--set mesh.preset=fsdp_tp"
            )
    return out + larger + state
