"""The preflight report: each compiled program's per-chip memory, the arrays resident between programs, the
peak over programs against the chip's HBM, and the compile step that fills it (a compiler's out-of-memory
refusal becomes a "does not fit" row, not a crash).

Memory model, per chip: every program's compiled memory (arguments + outputs - aliased outputs +
temporaries + generated code), plus the arrays that stay resident on the device between programs but are
not arguments of that program (e.g. the frozen reference and reward models during a PPO policy update),
plus the code of the other programs. The peak is the largest of those over the programs.

Cost model, per chip: each program's FLOPs and bytes accessed from the compiler's cost analysis (`cost.py`:
per device, while loops counted by their trip counts), and an estimated step time, the roofline
max(FLOPs / the chip's peak bf16 FLOP/s, bytes / its HBM bandwidth). It is an estimate, a lower bound that
ignores communication, latency and overlap; a measured step, when a device has run the program, goes
beside it (`ProgramReport.measured_s`) so the estimate's error is known.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from jaxrl.preflight.cost import Cost, program_cost
from jaxrl.preflight.topology import GIB, Chip, PreflightError, Topology


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
    """One compiled program's per-device memory (bytes), cost and compile time."""

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
    # Per device, one call of the program (cost.py); None: unknown (no analysis, a loop not read, refused).
    flops: float | None = None
    bytes_accessed: float | None = None
    transcendentals: float | None = None
    loops: tuple[str, ...] = ()  # its while loops' executions per call, e.g. ("2", "2x32")
    cost_note: str = ""
    measured_s: float | None = None  # a measured call on a device, when one has run it; preflight never does

    @property
    def own(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def estimate_s(self, chip: Chip) -> float | None:
        """Roofline seconds per call: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth); None when unknown."""
        known = self.flops is not None and self.bytes_accessed is not None
        if not known or not chip.peak_bf16_tflops or not chip.hbm_gbps:
            return None
        return max(self.flops / (chip.peak_bf16_tflops * 1e12), self.bytes_accessed / (chip.hbm_gbps * 1e9))


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
    attention: str = ""  # `attention_line`: the attention implementation the programs were compiled with

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
            "topology": self.topology.label,
            "devices": self.topology.devices,
            "backend": self.backend,
            "backend_note": self.backend_note,
            "mesh": self.mesh_shape,
            "preset": self.preset,
            "hbm_bytes": self.hbm_bytes,
            "peak_bytes": self.peak,
            "fits": self.fits,
            "compile_s": round(self.compile_s, 2),
            "programs": [
                dataclasses.asdict(p)
                | {"peak_bytes": self.peak_of(p), "estimate_s": p.estimate_s(self.topology.chip)}
                for p in self.programs
            ],
            "roofline": {
                "chip": self.topology.chip.generation,
                "peak_bf16_flops_per_s": self.topology.chip.peak_bf16_tflops * 1e12,
                "hbm_bytes_per_s": self.topology.chip.hbm_gbps * 1e9,
                "estimate": "roofline from the compiler's cost analysis, per device, per call",
            },
            "holdings": [dataclasses.asdict(h) for h in self.holdings],
            "notes": self.notes,
            "attention": self.attention,
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
            f"preflight {self.config_label} (stage {self.stage}) on {t.label}: {t.devices} chips "
            f"({t.libtpu_name}), {t.chip.hbm_gib:g} GiB HBM per chip",
            f"compiled as: {kind} [{self.backend_note}]",
            f"mesh {self.mesh_shape} preset {self.preset}",
            *([self.attention] if self.attention else []),
            "",
            f"{'per chip, ' + unit:<26}{'compile_s':>9}  {'arguments':>9}  {'outputs':>8}  {'aliased':>8}  "
            f"{'temporaries':>11}  {'code':>6}  {'resident_other':>14}  {'peak':>8}  "
            f"{'GFLOP':>9}  {'GB':>7}  {'est_ms':>8}",
        ]
        for p in self.programs:
            resident = self.peak_of(p) - p.own - sum(q.code for q in self.programs if q is not p)
            name = f"{p.name} (refused)" if p.error else p.name
            lines.append(
                f"{name:<26}{p.compile_s:>9.1f}  {g(p.arguments):>9}  {g(p.outputs):>8}  "
                f"{g(p.aliased):>8}  {g(p.temporaries):>11}  {g(p.code):>6}  {g(resident):>14}  "
                f"{g(self.peak_of(p)):>8}  {_number(p.flops, 1e9, 1):>9}  "
                f"{_number(p.bytes_accessed, 1e9, 2):>7}  {_number(p.estimate_s(t.chip), 1e-3, 1):>8}"
            )
        lines.append("")
        lines.append(
            f"GFLOP, GB, est_ms: per chip per call, an estimate (roofline from the compiler's cost analysis, "
            f"loops counted by trip count): max(FLOPs / {t.chip.peak_bf16_tflops:g} TFLOP/s bf16, "
            f"bytes / {t.chip.hbm_gbps:g} GB/s HBM) on {t.chip.generation}; no communication, not measured"
        )
        lines += [
            f"loops (executions per call, nested as outer x inner): {p.name} {', '.join(p.loops)}"
            for p in self.programs
            if p.loops
        ]
        lines += [f"cost: {p.name}: {p.cost_note}" for p in self.programs if p.cost_note]
        lines += [
            f"host memory: {p.name} {g(p.host_temporaries)} {unit} of temporaries in pinned host memory "
            f"(not HBM: model.remat=offload's layer inputs), copied over the host link on every call"
            for p in self.programs
            if p.host_temporaries
        ]
        measured = [p for p in self.programs if p.measured_s is not None]
        lines += [
            f"measured: {p.name} {p.measured_s * 1e3:.1f} ms per call (estimate "
            f"{_number(p.estimate_s(t.chip), 1e-3, 1)} ms)"
            for p in measured
        ]
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


def _number(value: float | None, unit: float, digits: int) -> str:
    return "unknown" if value is None else f"{value / unit:.{digits}f}"


def attention_line(model_cfg, devices) -> str:
    """The attention implementation the programs compile with on `devices` (`attention.describe`, once per
    report); on the fake-CPU fallback, also what a TPU run of the config would use."""
    from jaxrl.models import attention

    platform = next(iter(devices.flat if hasattr(devices, "flat") else devices)).platform
    line = attention.describe(model_cfg, platform=platform)
    if platform != "tpu":
        line += f"; on a TPU: {attention.resolve(model_cfg, 'tpu')}"
    return line


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
    lines = [line.strip() for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line]
    if not lines:
        return None
    found = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", lines[0])
    temporaries = int(float(found.group(1)) * _SIZE_UNITS[found.group(2)]) if found else 0
    return lines[0], temporaries


def compile_program(name: str, jitted, args, holdings: tuple[str, ...], log, **static) -> ProgramReport:
    """Lowers and compiles `jitted(*args, **static)` (abstract arguments) and reports its memory and cost."""
    log(f"compiling {name} ...")
    start = time.perf_counter()
    cost = Cost(None, None, note="refused by the compiler")
    compiled = None
    try:
        compiled = jitted.lower(*args, **static).compile()
        memory = _memory(compiled)
    except Exception as e:  # noqa: BLE001 - only an out-of-memory refusal becomes a report; others propagate
        refusal = _refusal(e)
        if refusal is None:
            raise
        log(f"{name}: the compiler refused it: {refusal[0]}")
        memory = dict(arguments=0, outputs=0, aliased=0, temporaries=refusal[1], code=0, error=refusal[0])
    compile_s = time.perf_counter() - start
    if compiled is not None:
        cost = program_cost(compiled)
        log(f"read {name}'s cost in {time.perf_counter() - start - compile_s:.1f} s")
    report = ProgramReport(
        name=name,
        holdings=holdings,
        compile_s=compile_s,
        flops=cost.flops,
        bytes_accessed=cost.bytes_accessed,
        transcendentals=cost.transcendentals,
        loops=cost.loops,
        cost_note=cost.note,
        **memory,
    )
    log(f"{'refused' if report.error else 'compiled'} {name} in {report.compile_s:.1f} s")
    return report
