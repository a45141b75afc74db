"""N processes on this machine joined by jax.distributed (coordinator on localhost), one job after another.

With `cpu_devices`, each process runs on that many fake CPU devices (JAX_PLATFORMS=cpu): a multi-host
rehearsal on one machine. Without it, the processes share whatever accelerators JAX finds. Nothing is shipped:
the CLI passes `launch.local_program()` (this interpreter, `-m jaxrl.cli`, so the installed jaxrl that planned
the jobs runs them) and the jobs' --config and --workdir are absolute paths.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence

from launch import JAXRL, Job, LaunchError, Step, format_plan


def free_port() -> int:
    """A TCP port on localhost that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, cpu_devices: int | None) -> list[str]:
    """The `NAME=value` environment of one process."""
    env = [
        f"JAX_COORDINATOR_ADDRESS=localhost:{port}",
        f"JAX_NUM_PROCESSES={num_processes}",
        f"JAX_PROCESS_ID={process_id}",
    ]
    if cpu_devices:
        env += ["JAX_PLATFORMS=cpu", f"XLA_FLAGS=--xla_force_host_platform_device_count={cpu_devices}"]
    return env


def plan(
    jobs: Sequence[Job],
    *,
    num_processes: int,
    port: int,
    cpu_devices: int | None = None,
    program: Sequence[str] = JAXRL,
) -> list[Step]:
    """One group step per job: `env <vars> jaxrl train ...` for each process."""
    if num_processes < 1:
        raise LaunchError(f"--processes {num_processes}: must be >= 1")
    steps = []
    for job in jobs:
        group = tuple(
            tuple(["env", *process_env(i, num_processes, port, cpu_devices), *job.argv(program)])
            for i in range(num_processes)
        )
        steps.append(Step(argv=group[0], kind="local", group=group, note=f"job {job.name}"))
    return steps


def run_group(argvs: Sequence[Sequence[str]]) -> None:
    """Starts every process of a job, waits for all; the first failure stops the others."""
    procs = [subprocess.Popen(list(argv)) for argv in argvs]
    try:
        while procs:
            for p in list(procs):
                code = p.poll()
                if code is None:
                    continue
                procs.remove(p)
                if code:
                    raise subprocess.CalledProcessError(code, p.args)
            if procs:
                try:
                    procs[0].wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def launch(
    jobs: Sequence[Job],
    *,
    num_processes: int = 2,
    port: int = 0,
    cpu_devices: int | None = None,
    program: Sequence[str] = JAXRL,
    dry_run: bool = False,
    out=print,
) -> list[Step]:
    """Runs (or with dry_run prints) every job as `num_processes` local processes."""
    steps = plan(
        jobs, num_processes=num_processes, port=port or free_port(), cpu_devices=cpu_devices, program=program
    )
    out(format_plan(steps))
    if not dry_run:
        for step in steps:
            run_group(step.group)
    return steps
