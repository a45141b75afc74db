"""TPU slices with gcloud: bundle the installed jaxrl and launch packages and the study file (launch.bundle),
create a queued resource (or use an existing TPU VM), copy the bundle to every worker and pip-install it there
(`--worker=all`; not editable: the bundle has a pyproject.toml made from the installed metadata), run the
same `jaxrl train --config study/<file>` on all workers with the output streamed back (and kept in
~/jaxrl-logs/<job>.log on each worker), then delete the slice.

Jobs run one after another on the slice, shared base runs first. The workdir must be on storage every worker
sees at the same path (a gcsfuse or NFS mount): checkpoints are written by all hosts together.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Sequence

from launch import JAXRL, Job, LaunchError, Step, bundle, execute, format_plan

ACTIONS = ("run", "stop", "logs", "delete")
REMOTE_DIR, REMOTE_VENV, REMOTE_LOGS, REMOTE_TARBALL = "jaxrl", "jaxrl-venv", "jaxrl-logs", "jaxrl-bundle.tgz"


@dataclasses.dataclass(frozen=True)
class TpuOptions:
    name: str  # the TPU VM (node) id; also the queued resource's id
    zone: str
    project: str = ""
    topology: str = ""  # e.g. "v5p-128": create a queued resource; "" runs on the existing TPU VM `name`
    runtime_version: str = ""  # "" picks the JAX software version of the chip generation
    spot: bool = False
    reserved: bool = False
    keep: bool = False  # leave the queued resource running after the jobs
    slices: int = 1  # multi-slice: a queued resource of this many slices, nodes <name>-0, <name>-1, ...
    python: str = ""  # interpreter that builds the bundle; "" is this one (sys.executable)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def _where(options: TpuOptions) -> list[str]:
    return [f"--zone={options.zone}"] + ([f"--project={options.project}"] if options.project else [])


def nodes(options: TpuOptions) -> list[str]:
    """The TPU VMs of the job: the one node, or each slice's node of a multi-slice queued resource."""
    return [options.name] if options.slices == 1 else [f"{options.name}-{i}" for i in range(options.slices)]


def _on_every_node(commands: list[tuple[str, ...]]) -> tuple[str, ...]:
    """One command, or (multi-slice) a shell that runs one per node at once and fails if any fails: the
    slices' workers must all join one job."""
    if len(commands) == 1:
        return commands[0]
    starts = " ".join(f"{shlex.join(c)} & p{i}=$!;" for i, c in enumerate(commands))
    waits = " ".join(f"wait $p{i} || failed=1;" for i in range(len(commands)))
    return ("bash", "-c", f"failed=0; {starts} {waits} exit $failed")


def ssh(options: TpuOptions, script: str) -> tuple[str, ...]:
    """`gcloud ... tpu-vm ssh` running a bash script on every worker (of every slice)."""
    return _on_every_node(
        [
            (
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "ssh",
                node,
                *_where(options),
                "--worker=all",
                f"--command=bash -c {shlex.quote(script)}",
            )
            for node in nodes(options)
        ]
    )


def create_steps(options: TpuOptions) -> list[Step]:
    """Queued-resource request, then a poll until the slice is ACTIVE."""
    from jaxrl.preflight import parse_topology

    topology = parse_topology(options.topology)
    runtime = options.runtime_version or topology.chip.runtime_version
    create = [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        options.name,
        *(
            [f"--node-id={options.name}"]
            if options.slices == 1
            else [f"--node-count={options.slices}", f"--node-prefix={options.name}"]
        ),
        *_where(options),
        f"--accelerator-type={topology.accelerator_type}",
        f"--runtime-version={runtime}",
    ]
    create += ["--spot"] if options.spot else []
    create += ["--reserved"] if options.reserved else []
    describe = (
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        options.name,
        *_where(options),
        "--format=value(state.state)",
    )
    return [
        Step(
            tuple(create),
            note=f"request {'' if options.slices == 1 else f'{options.slices} x '}"
            f"{topology.name} ({topology.chips * options.slices} chips)",
        ),
        Step(describe, kind="poll", until="ACTIVE"),
    ]


def _configs(jobs: Sequence[Job]) -> list[str]:
    """The study files the jobs read (their --config), in order, once each."""
    out = []
    for job in jobs:
        for config in job.configs():
            if config not in out:
                out.append(config)
    return out


def install_steps(options: TpuOptions, jobs: Sequence[Job]) -> list[Step]:
    """Bundle the installed jaxrl and launch packages with the jobs' study files, copy the bundle to every
    worker, pip-install it there (not editable) in a virtualenv with the tpu extra."""
    tarball = f"/tmp/jaxrl-bundle-{_safe(options.name)}.tgz"
    configs = _configs(jobs)
    bundle.study_files(configs)  # each exists, no two ship under one name: refused before anything runs
    pack = bundle.command(configs, tarball, options.python or None)
    copy = _on_every_node(
        [
            (
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                tarball,
                f"{node}:{REMOTE_TARBALL}",
                *_where(options),
                "--worker=all",
            )
            for node in nodes(options)
        ]
    )
    extras = "tpu,eval" if any(job.args[0] == "eval" for job in jobs) else "tpu"  # eval jobs need lm-eval
    install = (
        f"set -e; rm -rf {REMOTE_DIR}; mkdir -p {REMOTE_DIR} {REMOTE_LOGS}; "
        f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}; python3 -m venv {REMOTE_VENV}; "
        f"{REMOTE_VENV}/bin/pip install -q --upgrade pip; "
        f"{REMOTE_VENV}/bin/pip install -q './{REMOTE_DIR}[{extras}]'"
    )
    return [
        Step(pack, note="bundle the installed jaxrl and launch packages with the study file"),
        Step(copy),
        Step(ssh(options, install), note="install on every worker"),
    ]


def remote_args(job: Job) -> tuple[str, ...]:
    """The job's train arguments with --config pointing at the study file in the bundle (relative to the
    unpacked bundle, ~/jaxrl, where the workers run)."""
    configs = job.configs()
    return job.with_config(bundle.study_name(configs[0])) if configs else job.args


def run_step(options: TpuOptions, job: Job, program: Sequence[str] = JAXRL) -> Step:
    """`jaxrl train` on every worker (JAXRL_DISTRIBUTED=on joins them), logged to ~/jaxrl-logs/<job>.log;
    the process id goes to ~/jaxrl-logs/<job>.pid for `stop`."""
    log = f"$HOME/{REMOTE_LOGS}/{_safe(job.name)}"
    script = (
        f"set -o pipefail; mkdir -p $HOME/{REMOTE_LOGS}; cd $HOME/{REMOTE_DIR}; "
        f"export PATH=$HOME/{REMOTE_VENV}/bin:$PATH JAXRL_DISTRIBUTED=on; "
        f"({shlex.join([*program, *remote_args(job)])} & echo $! > {log}.pid; wait $!) 2>&1 "
        f"| tee -a {log}.log"
    )
    return Step(ssh(options, script), note=f"job {job.name}")


def delete_step(options: TpuOptions) -> Step:
    return Step(
        (
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            options.name,
            *_where(options),
            "--force",
            "--quiet",
        ),
        note="delete the slice",
    )


def plan(
    jobs: Sequence[Job], options: TpuOptions, *, action: str = "run", program: Sequence[str] = JAXRL
) -> list[Step]:
    """The commands of an action: run (bundle, create, copy and install, every job, delete), stop, logs or
    delete."""
    if action not in ACTIONS:
        raise LaunchError(f"--action must be one of {ACTIONS}, got {action!r}")
    if action == "delete":
        return [delete_step(options)]
    if action in ("stop", "logs"):
        steps = []
        for job in jobs:
            path = f"$HOME/{REMOTE_LOGS}/{_safe(job.name)}"
            script = (
                f"kill $(cat {path}.pid) 2>/dev/null || true"
                if action == "stop"
                else f"tail -n 200 -f {path}.log"
            )
            steps.append(Step(ssh(options, script), note=f"{action} {job.name}"))
        return steps
    install = install_steps(options, jobs)
    steps = install[:1]  # the bundle is built before a slice is requested
    steps += create_steps(options) if options.topology else []
    steps += install[1:]
    steps += [run_step(options, job, program) for job in jobs]
    if options.topology and not options.keep:
        steps.append(delete_step(options))
    return steps


def launch(
    jobs: Sequence[Job],
    options: TpuOptions,
    *,
    action: str = "run",
    program: Sequence[str] = JAXRL,
    dry_run: bool = False,
    out=print,
) -> list[Step]:
    """Runs (or with dry_run prints) the plan; a created slice is deleted even when a job fails."""
    steps = plan(jobs, options, action=action, program=program)
    out(format_plan(steps))
    if dry_run:
        return steps
    rest = steps
    if action == "run":
        execute(steps[:1])  # the bundle, built before a slice exists (nothing to delete if it fails)
        rest = steps[1:]
    created = action == "run" and options.topology and not options.keep
    try:
        execute(rest[:-1] if created else rest)
    finally:
        if created:
            execute(steps[-1:])
    return steps
