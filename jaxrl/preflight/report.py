"""The preflight report: each compiled program's per-chip memory, the arrays resident between programs, the
peak over programs against the chip's HBM, and the compile step that fills it (a compiler's out-of-memory
refusal becomes a "does not fit" row, not a crash).

Memory model, per chip: every program's compiled memory (arguments + outputs - aliased outputs +
temporaries + generated code), plus the arrays that stay resident on the device between programs but are
not arguments of that program (e.g. the frozen reference and reward models during a PPO policy update),
plus the code of the other programs. The peak is the largest of those over the programs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from jaxrl.preflight.topology import GIB, PreflightError, Topology


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
            "programs": [dataclasses.asdict(p) | {"peak_bytes": self.peak_of(p)} for p in self.programs],
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
    """Lowers and compiles `jitted(*args, **static)` (abstract arguments) and reports its memory."""
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
