"""`jaxrl preflight` (compile for a TPU slice here, memory per chip) and `jaxrl launch` (TPU slices, SLURM,
local processes): their flags and what they run."""

from __future__ import annotations

import json
import sys


def add_preflight(sub) -> None:
    """The `preflight` subcommand and its flags."""
    p = sub.add_parser("preflight", help="compile a config for a TPU slice here; per-chip memory vs HBM")
    p.add_argument("--config", required=True, help="experiments/<file>.py or <file>.py:<function>")
    p.add_argument("--topology", required=True, help="TPU slice: v5p-128, v5e-64, v4-8, v5p:4x4x12, ...")
    p.add_argument(
        "--slices",
        type=int,
        default=1,
        help="multi-slice: this many slices of --topology, the data axis across them (over DCN)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument(
        "--backend",
        choices=("auto", "tpu", "cpu"),
        default="auto",
        help="tpu: libtpu's topology (required); cpu: fake-CPU mesh; auto: tpu if libtpu works",
    )
    p.add_argument("--hbm-gib", type=float, default=None, help="override the chip's HBM per chip (GiB)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.set_defaults(fn=cmd_preflight)


def cmd_preflight(args) -> int:
    from jaxrl import preflight

    try:
        cfg = preflight.load_config(args.config, args.set or [])
        report = preflight.run(
            cfg,
            args.topology,
            backend=args.backend,
            hbm_gib=args.hbm_gib,
            slices=args.slices,
            config_label=args.config,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except preflight.PreflightError as e:
        print(f"jaxrl preflight: error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if report.fits:
        return 0
    print(f"jaxrl preflight: {args.config} does not fit {report.topology.name}; try:", file=sys.stderr)
    for line in preflight.suggestions(report, cfg):
        print(f"  - {line}", file=sys.stderr)
    return 1


def add_launch(sub) -> None:
    """The `launch` subcommand: one parser per target, each with its flags."""
    p = sub.add_parser("launch", help="run jaxrl train on a TPU slice, a SLURM cluster or local processes")
    targets = p.add_subparsers(dest="target", required=True)
    for target, help_text in (
        ("tpu", "a TPU slice via gcloud (queued resource or existing TPU VM)"),
        ("slurm", "a SLURM batch job per run: one task per node, srun"),
        ("local", "N processes on this machine joined by jax.distributed"),
    ):
        t = targets.add_parser(target, help=help_text)
        t.add_argument("--config", required=True, help="experiments/<file>.py")
        t.add_argument("--workdir", required=True, help="run directory (with --sweep: the study directory)")
        t.add_argument("--set", action="append", metavar="KEY=VALUE")
        t.add_argument("--sweep", action="store_true", help="one job per run of the experiment's sweep()")
        t.add_argument("--dry-run", action="store_true", help="print the exact commands, run nothing")
        t.set_defaults(fn=cmd_launch)
        if target == "tpu":
            t.add_argument("--name", required=True, help="TPU VM name (and queued-resource id)")
            t.add_argument("--zone", required=True)
            t.add_argument("--project", default="")
            t.add_argument(
                "--topology",
                default="",
                help="create a queued resource of this slice, e.g. v5p-128 (omit: existing VM)",
            )
            t.add_argument("--runtime-version", default="")
            t.add_argument("--spot", action="store_true")
            t.add_argument("--reserved", action="store_true")
            t.add_argument("--keep", action="store_true", help="do not delete a created slice afterwards")
            t.add_argument(
                "--slices",
                type=int,
                default=1,
                help="multi-slice: a queued resource of this many --topology slices (nodes "
                "<name>-0, <name>-1, ...), the jobs' data axis across them",
            )
            t.add_argument("--action", choices=("run", "stop", "logs", "delete"), default="run")
        elif target == "slurm":
            t.add_argument("--nodes", type=int, default=1)
            t.add_argument("--gpus-per-node", type=int, default=8)
            t.add_argument("--cpus-per-task", type=int, default=32)
            t.add_argument("--time", default="24:00:00")
            t.add_argument("--port", type=int, default=29500, help="coordinator port on the first node")
            t.add_argument("--partition", default="")
            t.add_argument("--account", default="")
            t.add_argument("--setup", default="", help="shell lines run before srun (modules, venv)")
            t.add_argument("--script-dir", default="", help="script directory (default <workdir>/launch)")
        else:
            t.add_argument("--processes", type=int, default=2)
            t.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
            t.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices per process")


def _launch_package():
    # launch/ is a top-level package of the distribution, beside jaxrl (installed with it, or in a checkout).
    import launch

    return launch


def cmd_launch(args) -> int:
    launch = _launch_package()
    jobs = launch.jobs(args.config, args.workdir, args.set or [], sweep=args.sweep)
    if args.target == "local":
        from launch import local

        local.launch(
            jobs,
            num_processes=args.processes,
            port=args.port,
            cpu_devices=args.cpu_devices,
            program=launch.local_program(),
            dry_run=args.dry_run,
        )
    elif args.target == "slurm":
        from launch import slurm

        options = slurm.SlurmOptions(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task,
            time=args.time,
            port=args.port,
            partition=args.partition,
            account=args.account,
            setup=args.setup,
            script_dir=args.script_dir,
        )
        slurm.launch(jobs, options, dry_run=args.dry_run)
    else:
        from launch import tpu

        options = tpu.TpuOptions(
            name=args.name,
            zone=args.zone,
            project=args.project,
            topology=args.topology,
            runtime_version=args.runtime_version,
            spot=args.spot,
            reserved=args.reserved,
            keep=args.keep,
            slices=args.slices,
        )
        tpu.launch(jobs, options, action=args.action, dry_run=args.dry_run)
    return 0
