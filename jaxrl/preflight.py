"""Preflight: compile a config's real sharded programs ahead of time for a TPU slice, on this machine, and
compare their per-chip memory with the chip's HBM before any pod time is spent.

The devices come from libtpu's topology descriptions (`jax.experimental.topologies.get_topology_desc`,
compile-only: nothing runs, nothing is allocated; inputs are `jax.ShapeDtypeStruct`s). Without libtpu, the
same programs are compiled for a fake CPU mesh with the same device count, and the report says that it is
not a TPU compile (XLA:CPU makes other fusion and layout choices, so its figures are a rough guide only).

Memory model, per chip: every program's compiled memory (arguments + outputs - aliased outputs +
temporaries + generated code), plus the arrays that stay resident on the device between programs but are
not arguments of that program (e.g. the frozen reference and reward models during a PPO policy update),
plus the code of the other programs. The peak is the largest of those over the programs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl import config as config_lib
from jaxrl import losses, sharding, steps
from jaxrl import validate as validate_lib
from jaxrl.config import RL_STAGES, Config, ConfigError
from jaxrl.models import init as model_init

GIB = 1 << 30


class PreflightError(RuntimeError):
    """Preflight could not compile (a bad topology, no libtpu where one was required, ...)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip, and how its slices are named by gcloud and by libtpu."""

    generation: str
    hbm_gib: float
    cores_in_name: int  # "v4-8" and "v5p-8" count TensorCores (2 per chip); v5e and v6e count chips
    dims: int  # torus dimensions
    libtpu_prefix: str
    gcloud_prefix: str
    runtime_version: str  # TPU VM software version for JAX


CHIPS = {
    "v4": Chip("v4", 32, 2, 3, "v4", "v4", "tpu-ubuntu2204-base"),
    "v5e": Chip("v5e", 16, 1, 2, "v5e", "v5litepod", "v2-alpha-tpuv5-lite"),
    "v5p": Chip("v5p", 95, 2, 3, "v5", "v5p", "v2-alpha-tpuv5"),
    "v6e": Chip("v6e", 32, 1, 2, "v6e", "v6e", "v2-alpha-tpuv6e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its chip, chip count and torus shape."""

    chip: Chip
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

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


def _torus(chips: int, dims: int) -> tuple[int, ...]:
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
            shape = _torus(count // chip.cores_in_name, chip.dims)
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
    described = topologies.get_topology_desc(topology.libtpu_name, "tpu", **kwargs)
    devices = list(described.devices)
    if len(devices) != topology.chips:
        raise PreflightError(
            f"libtpu described {len(devices)} devices for {topology.name}, expected {topology.chips}"
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
    return cpu_devices(topology.chips), "cpu", note


def tree_device_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a pytree placed by `shardings` (its largest shard per leaf)."""
    total = 0
    for leaf, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True):
        shape = s.shard_shape(leaf.shape) if leaf.shape else ()
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class Holding:
    """Arrays that stay on the device across programs (a train state, a frozen model's parameters)."""

    name: str
    bytes: int
    offloaded: bool = False  # kept in host memory between uses (rl.offload_frozen)


@dataclasses.dataclass
class ProgramReport:
    """One compiled program's per-device memory (bytes) and compile time."""

    name: str
    holdings: tuple[str, ...]  # the resident arrays it takes as arguments
    compile_s: float
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    host_temporaries: int = 0
    error: str = ""  # the compiler's refusal (e.g. RESOURCE_EXHAUSTED: its temporaries exceed the HBM)

    @property
    def own(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass
class PreflightReport:
    """Everything a preflight found; `fits` says whether the peak is within the chip's HBM."""

    config_label: str
    stage: str
    topology: Topology
    backend: str
    backend_note: str
    mesh_shape: dict[str, int]
    preset: str
    hbm_bytes: int
    programs: list[ProgramReport]
    holdings: list[Holding]
    notes: list[str]

    def peak_of(self, program: ProgramReport) -> int:
        others_resident = sum(
            h.bytes for h in self.holdings if h.name not in program.holdings and not h.offloaded
        )
        other_code = sum(p.code for p in self.programs if p is not program)
        return program.own + others_resident + other_code

    @property
    def peak(self) -> int:
        return max(self.peak_of(p) for p in self.programs)

    @property
    def fits(self) -> bool:
        return self.peak <= self.hbm_bytes and not any(p.error for p in self.programs)

    @property
    def compile_s(self) -> float:
        return sum(p.compile_s for p in self.programs)

    def to_dict(self) -> dict:
        return {
            "config": self.config_label,
            "stage": self.stage,
            "topology": self.topology.name,
            "devices": self.topology.chips,
            "backend": self.backend,
            "backend_note": self.backend_note,
            "mesh": self.mesh_shape,
            "preset": self.preset,
            "hbm_bytes": self.hbm_bytes,
            "peak_bytes": self.peak,
            "fits": self.fits,
            "compile_s": round(self.compile_s, 2),
            "programs": [dataclasses.asdict(p) | {"peak_bytes": self.peak_of(p)} for p in self.programs],
            "holdings": [dataclasses.asdict(h) for h in self.holdings],
            "notes": self.notes,
        }

    def format(self) -> str:
        """The human-readable report: one row per program, then the verdict."""
        unit, scale = ("GiB", GIB) if self.peak >= GIB // 10 else ("MiB", 1 << 20)
        g = lambda b: f"{b / scale:.2f}"
        t = self.topology
        kind = (
            "TPU compile (libtpu)"
            if self.backend == "tpu"
            else "NOT A TPU COMPILE: fake-CPU mesh of the same device count, XLA:CPU memory figures"
        )
        lines = [
            f"preflight {self.config_label} (stage {self.stage}) on {t.name}: {t.chips} chips "
            f"({t.libtpu_name}), {t.chip.hbm_gib:g} GiB HBM per chip",
            f"compiled as: {kind} [{self.backend_note}]",
            f"mesh {self.mesh_shape} preset {self.preset}",
            "",
            f"{'per chip, ' + unit:<26}{'compile_s':>9}  {'arguments':>9}  {'outputs':>8}  {'aliased':>8}  "
            f"{'temporaries':>11}  {'code':>6}  {'resident_other':>14}  {'peak':>8}",
        ]
        for p in self.programs:
            resident = self.peak_of(p) - p.own - sum(q.code for q in self.programs if q is not p)
            name = f"{p.name} (refused)" if p.error else p.name
            lines.append(
                f"{name:<26}{p.compile_s:>9.1f}  {g(p.arguments):>9}  {g(p.outputs):>8}  "
                f"{g(p.aliased):>8}  {g(p.temporaries):>11}  {g(p.code):>6}  {g(resident):>14}  "
                f"{g(self.peak_of(p)):>8}"
            )
        lines.append("")
        lines.append(
            "resident arrays: "
            + ", ".join(
                f"{h.name} {g(h.bytes)}" + (" (host between uses)" if h.offloaded else "")
                for h in self.holdings
            )
            + f" {unit}"
        )
        lines += [f"note: {n}" for n in self.notes]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(
            f"peak per chip {g(self.peak)} {unit} of {g(self.hbm_bytes)} {unit} HBM "
            f"({100 * self.peak / self.hbm_bytes:.0f}%): {verdict}; compile {self.compile_s:.1f} s"
        )
        return "\n".join(lines)


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:
        raise PreflightError("the compiled program reports no memory analysis on this backend")
    return {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "code": stats.generated_code_size_in_bytes,
        "host_temporaries": stats.host_temp_size_in_bytes,
    }


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _refusal(error: Exception) -> tuple[str, int] | None:
    """(message, temporaries in bytes) when the compiler refused a program for want of memory, else None."""
    import re

    lines = [line.strip() for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line]
    if not lines:
        return None
    found = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", lines[0])
    temporaries = int(float(found.group(1)) * _SIZE_UNITS[found.group(2)]) if found else 0
    return lines[0], temporaries


def _compile(name: str, jitted, args, holdings: tuple[str, ...], log, **static) -> ProgramReport:
    log(f"compiling {name} ...")
    start = time.perf_counter()
    try:
        memory = _memory(jitted.lower(*args, **static).compile())
    except Exception as e:  # noqa: BLE001 - only an out-of-memory refusal becomes a report; others propagate
        refusal = _refusal(e)
        if refusal is None:
            raise
        log(f"{name}: the compiler refused it: {refusal[0]}")
        memory = dict(arguments=0, outputs=0, aliased=0, temporaries=refusal[1], code=0, error=refusal[0])
    report = ProgramReport(name=name, holdings=holdings, compile_s=time.perf_counter() - start, **memory)
    log(f"{'refused' if report.error else 'compiled'} {name} in {report.compile_s:.1f} s")
    return report


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def batch_spec(cfg: Config, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract batch of an offline stage as the runner builds it (token ids int32, loss masks int8)."""
    T = cfg.data.max_len
    if cfg.stage == "sft":
        return {"tokens": _spec((rows, T), np.int32), "loss_mask": _spec((rows, T), np.int8)}
    batch = {"tokens": _spec((rows, 2, T), np.int32), "loss_mask": _spec((rows, 2, T), np.int8)}
    if cfg.stage == "dpo" and not losses.get_preference_loss(cfg.loss.name).paired:
        batch["desirable"] = _spec((rows,), np.float32)
    else:
        batch["margin"] = _spec((rows,), np.float32)
    return batch


def _source_model(path: str):
    """The model config of a local run directory or HF checkpoint, or None when it is not here."""
    if not path or not (Path(path) / "config.json").is_file():
        return None
    from jaxrl.models import hf

    if hf.is_hf_dir(path):
        return hf.config_from_hf(hf.read_hf_config(path))
    source = config_lib.from_dict(json.loads((Path(path) / "config.json").read_text()))
    return model_init.stage_model_config(source)


def _with_architecture(model_cfg, source_model):
    from jaxrl.convert import ARCHITECTURE_KEYS

    if source_model is None:
        return model_cfg
    return dataclasses.replace(model_cfg, **{k: getattr(source_model, k) for k in ARCHITECTURE_KEYS})


class _Builder:
    """Compiles a stage's programs on one mesh and collects their memory and the resident arrays."""

    def __init__(self, cfg: Config, mesh, log):
        self.cfg, self.mesh, self.preset, self.log = cfg, mesh, cfg.mesh.preset, log
        self.programs: list[ProgramReport] = []
        self.holdings: list[Holding] = []
        self.notes: list[str] = []

    def hold(self, name: str, abstract_tree, *, offloaded: bool = False) -> None:
        shardings = sharding.tree_shardings(abstract_tree, self.preset, self.mesh)
        self.holdings.append(Holding(name, tree_device_bytes(abstract_tree, shardings), offloaded))

    def hold_state(self, role: str, state: steps.TrainState) -> tuple[str, str]:
        """Holds a train state as its parameters and the rest (optimizer moments, counters)."""
        self.hold(f"{role} params", state.params)
        self.hold(f"{role} optimizer state", state.replace(params=None, ref_params=None))
        return f"{role} params", f"{role} optimizer state"

    def placed(self, abstract_tree):
        """The tree's ShapeDtypeStructs carrying their rule-table shardings."""
        shardings = sharding.tree_shardings(abstract_tree, self.preset, self.mesh)
        return jax.tree.map(lambda a, s: a.update(sharding=s), abstract_tree, shardings)

    def batch_placed(self, tree):
        batch_sharding = sharding.batch_sharding(self.mesh, self.preset)
        return jax.tree.map(lambda a: a.update(sharding=batch_sharding), tree)

    def check_rows(self, rows: int, what: str) -> None:
        divisor = sharding.batch_divisor(self.mesh, self.preset)
        if rows % divisor:
            raise ConfigError(
                f"{what}: {rows} rows do not divide over the {divisor} batch shards of mesh "
                f"{dict(self.mesh.shape)}"
            )

    def compile(self, name: str, jitted, args, holdings: tuple[str, ...], **static) -> None:
        report = _compile(name, jitted, args, holdings, self.log, **static)
        if report.error:  # no memory analysis: count at least the resident arrays it takes
            report.arguments = sum(h.bytes for h in self.holdings if h.name in holdings)
            self.notes.append(f"{name} was refused by the compiler: {report.error}")
        self.programs.append(report)


def _offline_programs(b: _Builder, cfg: Config, model_cfg) -> None:
    """SFT, RM, DPO: the runner's train step; DPO also its reference (a cached forward, or in the state)."""
    t = cfg.train
    b.check_rows(t.batch_size // t.grad_accum, "train.batch_size / train.grad_accum")
    batch = batch_spec(cfg, t.batch_size)
    needs_ref = cfg.stage == "dpo" and losses.get_preference_loss(cfg.loss.name).needs_reference
    on_the_fly = needs_ref and t.reference == "on_the_fly"
    ref_cfg = _with_architecture(model_cfg, _source_model(t.reference_from or t.init_from))
    if needs_ref and not on_the_fly:
        batch["ref_logps"] = _spec((t.batch_size, 2), np.float32)
    graphdef, params = model_init.abstract_model(model_cfg)
    ref = model_init.abstract_model(ref_cfg)[1] if on_the_fly else None
    tx, schedule = steps.make_optimizer(cfg.optim, t.steps)
    state = jax.eval_shape(lambda p, r: steps.new_train_state(p, tx, cfg.seed, r), params, ref)
    holdings = b.hold_state("train", state)
    if on_the_fly:
        b.hold("reference params", state.ref_params)
        holdings += ("reference params",)
    objective, totals_fn = steps.stage_objective(cfg, graphdef)
    step_fn = steps.bind_step(objective, totals_fn, (tx, schedule), t.grad_accum)
    hp = jax.eval_shape(lambda: steps.loss_hparams(cfg))
    b.compile(
        "train_step", steps.make_step(step_fn, state, batch, b.mesh, b.preset), (state, batch, hp), holdings
    )
    if needs_ref and not on_the_fly:
        # As jaxrl.reference.compute_reference_logps: microbatches of pairs, summed completion log-probs.
        micro = t.batch_size // t.grad_accum
        ref_batch = {k: batch[k].update(shape=(micro,) + batch[k].shape[1:]) for k in ("tokens", "loss_mask")}
        ref_graphdef, ref_params = model_init.abstract_model(ref_cfg)
        b.hold("reference params", ref_params)
        forward = lambda p, batch, hp: steps.policy_seq_logps(nnx.merge(ref_graphdef, p), batch)[0]
        jitted = steps.make_eval_step(forward, ref_params, ref_batch, b.mesh, b.preset)
        b.compile("reference_logps", jitted, (ref_params, ref_batch, None), ("reference params",))
        b.notes.append(
            "reference log-probs are computed once and cached; the runner keeps the reference "
            "parameters on the device for the final evaluation"
        )


def _rl_programs(b: _Builder, cfg: Config, model_cfg) -> None:
    """Online RL as jaxrl.rl.runner runs it: generation, rollout statistics (policy, reference and value
    forwards), reward-model scores, and the minibatch update of the policy and (PPO) the value model."""
    from jaxrl import rewards, sampling
    from jaxrl.rl import runner
    from jaxrl.rl.losses import RLHParams

    r, t, mesh, preset = cfg.rl, cfg.train, b.mesh, b.preset
    dpo = cfg.stage == "online_dpo"
    rows, P, N = r.rollout_batch * r.samples_per_prompt, cfg.data.max_prompt_len, r.max_new_tokens
    mb_units = r.minibatch // 2 if dpo else r.minibatch
    b.check_rows(rows, "the rollout batch (rl.rollout_batch x rl.samples_per_prompt)")
    b.check_rows(mb_units // t.grad_accum, "each microbatch (rl.minibatch / train.grad_accum)")
    updates = r.epochs * ((r.rollout_batch if dpo else rows) // mb_units)
    graphdef, params = model_init.abstract_model(model_cfg)
    reward_paths = config_lib.reward_model_sources(r.reward_model)
    reward_cfgs = []
    for path in reward_paths:
        found = _source_model(path)
        if found is None:
            b.notes.append(f"reward model {path} is not here: assumed to have the policy's architecture")
        reward_cfgs.append(dataclasses.replace(_with_architecture(model_cfg, found), head="scalar"))

    tx, schedule = steps.make_optimizer(cfg.optim, t.steps * updates)
    value_cfg = value_params = value_tx = value_schedule = None
    if cfg.stage == "ppo":
        value_cfg = (
            reward_cfgs[0]
            if r.value_init == "reward_model"
            else dataclasses.replace(model_cfg, head="scalar")
        )
        value_params = model_init.abstract_model(value_cfg)[1]
        value_optim = dataclasses.replace(cfg.optim, lr=r.value_lr or cfg.optim.lr)
        value_tx, value_schedule = steps.make_optimizer(value_optim, t.steps * updates)

    def build(p, v):
        value = None if v is None else steps.new_train_state(v, value_tx, cfg.seed)
        return runner.RLState(policy=steps.new_train_state(p, tx, cfg.seed), value=value)

    state = jax.eval_shape(build, params, value_params)
    train_holdings = b.hold_state("policy", state.policy)
    if state.value is not None:
        train_holdings += b.hold_state("value", state.value)
    b.hold("reference params", params, offloaded=r.offload_frozen)

    # Generation: the KV-cache sampler over one rollout batch, with the policy's parameters.
    prompt = b.batch_placed({"ids": _spec((rows, P), np.int32), "mask": _spec((rows, P), np.int32)})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0)).update(sharding=replicated)
    temperature = _spec((), np.float32).update(sharding=replicated)
    sample = getattr(sampling.sample, "__wrapped__", sampling.sample)  # the jitted function under the wrapper
    b.compile(
        "generate",
        sample,
        (graphdef, b.placed(params), prompt["ids"], prompt["mask"], key, temperature),
        ("policy params",),
        max_new=N,
        eos_id=1,
        pad_id=0,
        top_p=float(r.top_p),
        top_k=int(r.top_k),
        active_mesh=(mesh, preset),
    )

    # Rollout statistics: old and reference log-probs (and old values) of the whole rollout batch at once.
    rollout = {
        "prompt": _spec((rows, P), np.int32),
        "prompt_mask": _spec((rows, P), np.int32),
        "response": _spec((rows, N), np.int32),
        "response_mask": _spec((rows, N), np.bool_),
    }
    stats_params = {"policy": params, "ref": params}
    stats_holdings = ("policy params", "reference params")
    if state.value is not None:
        stats_params["value"] = state.value.params
        stats_holdings += ("value params",)
    stats_fn = functools.partial(
        runner.rollout_stats,
        graphdef=graphdef,
        value_graphdef=None if value_cfg is None else model_init.abstract_model(value_cfg)[0],
        top_k=r.top_k,
        top_p=r.top_p,
        sequence_logps=dpo,
    )
    rl_hp = jax.eval_shape(lambda: RLHParams.create())
    b.compile(
        "rollout_stats",
        steps.make_eval_step(stats_fn, stats_params, rollout, mesh, preset),
        (stats_params, rollout, rl_hp),
        stats_holdings,
    )

    # Reward-model scores of the rollout batch (each model of an ensemble in turn).
    scored = b.batch_placed({k: rollout[k] for k in ("prompt", "prompt_mask", "response", "response_mask")})
    for i, reward_cfg in enumerate(reward_cfgs):
        name = "reward params" + (f" {i}" if len(reward_cfgs) > 1 else "")
        reward_graphdef, reward_params = model_init.abstract_model(reward_cfg)
        b.hold(name, reward_params, offloaded=r.offload_frozen)
        b.compile(
            "reward_scores" + (f"_{i}" if len(reward_cfgs) > 1 else ""),
            rewards.score_responses,
            (reward_graphdef, b.placed(reward_params), *scored.values()),
            (name,),
        )

    # The minibatch update: one program for the policy step and (PPO) the value step.
    if dpo:
        example = {
            "prompt": _spec((mb_units, P), np.int32),
            "prompt_mask": _spec((mb_units, P), np.int32),
            "response": _spec((mb_units, 2, N), np.int32),
            "response_mask": _spec((mb_units, 2, N), np.bool_),
            "ref_logps": _spec((mb_units, 2), np.float32),
            "weight": _spec((mb_units,), np.float32),
        }
        hp = jax.eval_shape(lambda: steps.loss_hparams(cfg))
    else:
        example = {k: v.update(shape=(mb_units,) + v.shape[1:]) for k, v in rollout.items()}
        example |= {
            k: _spec((mb_units, N), np.float32)
            for k in ("old_logps", "ref_logps", "old_values", "advantages", "returns")
        }
        hp = rl_hp
    optimizers = {"policy": (tx, schedule), "value": (value_tx, value_schedule)}
    value_graphdef = None if value_cfg is None else model_init.abstract_model(value_cfg)[0]
    step_fn = runner.update_fn(cfg, graphdef, value_graphdef, optimizers)
    b.compile(
        "train_step",
        steps.make_step(step_fn, state, example, mesh, preset),
        (state, example, hp),
        train_holdings,
    )


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
) -> PreflightReport:
    """Compiles the config's programs for the slice (abstract inputs only) and reports per-chip memory."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices, used_backend, note = slice_devices(topo, backend)
    model_cfg = model_init.stage_model_config(cfg)
    init_arch = _source_model(cfg.train.init_from)
    model_cfg = _with_architecture(model_cfg, init_arch)
    validate_lib.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    builder = _Builder(cfg, mesh, log)
    if cfg.stage in RL_STAGES:
        _rl_programs(builder, cfg, model_cfg)
    else:
        _offline_programs(builder, cfg, model_cfg)
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
        bigger = Topology(report.topology.chip, _torus(need, report.topology.chip.dims))
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
