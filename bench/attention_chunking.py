"""Fused attention and chunked log-probs at scale: the per-chip memory of a config's real programs (what
`jaxrl preflight` compiles: the runner's train step, DPO's reference forward, online RL's rollout scoring,
sampler and update) for a TPU slice, with `model.attention` and `model.logprob_chunk` varied. Nothing runs:
each program is compiled ahead of time from abstract shapes for libtpu's compile-only devices, on this host.

    python bench/attention_chunking.py --config experiments/scale_presets.py:llama3_8b_dpo \\
        --topology v5e-64 --set data.max_len=4096 --variants xla:0,auto:0,xla:256,auto:256

    python bench/attention_chunking.py --config experiments/scale_presets.py:tulu2_13b_ppo \\
        --topology v5p-128 --programs rollout_stats,train_step --variants xla:0,auto:0,xla:256,auto:256

A variant is ATTENTION:CHUNK (`model.attention`, `model.logprob_chunk`); --programs keeps only the named
programs (default: all of the config's). Prints one markdown row per variant and program: per-chip GiB of
arguments, temporaries and the program's peak (its own memory plus the arrays resident between programs that
it does not take; the code of programs left out is not counted), the attention line the preflight report
prints, and the compile time.
"""

from __future__ import annotations

import argparse
import json
import time

from jaxrl import preflight, sharding
from jaxrl.config import RL_STAGES
from jaxrl.models import init as model_init
from jaxrl.preflight import programs as preflight_programs
from jaxrl.preflight.report import PreflightReport, attention_line

GIB = 1 << 30


class _Only(preflight_programs.Builder):
    """A preflight Builder that compiles only the named programs (all when `only` is empty)."""

    def __init__(self, cfg, mesh, log, only: set[str]):
        super().__init__(cfg, mesh, log)
        self.only = only

    def compile(self, name, jitted, args, holdings, **static):
        if not self.only or name in self.only:
            super().compile(name, jitted, args, holdings, **static)


def measure(spec: str, overrides: list[str], topology: str, only: set[str], log) -> PreflightReport:
    """preflight.run with a program filter: the config's programs compiled for the slice."""
    cfg = preflight.load_config(spec, overrides)
    topo = preflight.parse_topology(topology)
    devices, backend, note = preflight.slice_devices(topo, "tpu")
    model_cfg = preflight_programs.with_architecture(
        model_init.stage_model_config(cfg), preflight_programs.source_model(cfg.train.init_from)
    )
    mesh = sharding.make_mesh(cfg.mesh, devices)
    builder = _Only(cfg, mesh, log, only)
    if cfg.stage in RL_STAGES:
        preflight_programs.online_programs(builder, cfg, model_cfg)
    else:
        preflight_programs.offline_programs(builder, cfg, model_cfg)
    return PreflightReport(
        config_label=spec,
        stage=cfg.stage,
        topology=topo,
        backend=backend,
        backend_note=note,
        mesh_shape=dict(mesh.shape),
        preset=cfg.mesh.preset,
        hbm_bytes=topo.hbm_bytes,
        programs=builder.programs,
        holdings=builder.holdings,
        notes=builder.notes,
        attention=attention_line(model_cfg, devices),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--topology", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--programs", default="", help="comma-separated program names (default: all)")
    p.add_argument("--variants", default="xla:0,auto:0,xla:256,auto:256", help="ATTENTION:CHUNK,...")
    p.add_argument("--json", default="", help="also append one JSON line per variant to this file")
    args = p.parse_args()
    only = {n for n in args.programs.split(",") if n}
    print(f"{args.config} on {args.topology} {' '.join('--set ' + s for s in args.set)}")
    print(
        "| attention | logprob_chunk | program | arguments GiB | temporaries GiB | program peak GiB | "
        "compile s | attention line |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for variant in args.variants.split(","):
        name, chunk = variant.split(":")
        overrides = [*args.set, f"model.attention={name}", f"model.logprob_chunk={int(chunk)}"]
        start = time.perf_counter()
        report = measure(args.config, overrides, args.topology, only, log=lambda *_: None)
        for prog in report.programs:
            refused = " (refused)" if prog.error else ""
            print(
                f"| {name} | {chunk} | {prog.name}{refused} | {prog.arguments / GIB:.2f} | "
                f"{prog.temporaries / GIB:.2f} | {report.peak_of(prog) / GIB:.2f} | {prog.compile_s:.0f} | "
                f"{report.attention} |",
                flush=True,
            )
        if args.json:
            with open(args.json, "a") as f:
                f.write(
                    json.dumps(
                        {"variant": variant, "seconds": time.perf_counter() - start, "overrides": overrides}
                        | report.to_dict()
                    )
                    + "\n"
                )


if __name__ == "__main__":
    main()
