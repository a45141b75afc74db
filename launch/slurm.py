"""GPU clusters: one SLURM batch script per job (launch/templates/slurm.sbatch): one task per node, the first
node's hostname as the jax.distributed coordinator, `srun` starting `jaxrl train` on every node with its
JAX_PROCESS_ID. Jobs of a sweep are submitted with `--dependency=afterok:` on the shared base runs they need.

The code a job runs is shipped with it: next to its script, `bundle-<digest>/` (launch.bundle: the installed
jaxrl and launch packages and the study file) goes first on PYTHONPATH and `--config` points at the study file
in it, so a job queued for days runs the code and study that planned it; `--setup` provides the environment
(JAX etc.). Every #SBATCH value is checked (one word, no control characters; a bad one is a LaunchError naming
its flag); every argument of the command is shell-quoted and free of control characters.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from launch import JAXRL, Job, LaunchError, Step, bundle, format_plan

TEMPLATE = Path(__file__).parent / "templates" / "slurm.sbatch"


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 32
    time: str = "24:00:00"
    port: int = 29500
    partition: str = ""
    account: str = ""
    setup: str = ""  # shell lines run before srun (modules, virtualenv activation)
    script_dir: str = ""  # where scripts are written; "" means <job workdir>/launch


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WORD = re.compile(r"[A-Za-z0-9_.,:@+=%-]+")
_TIME = re.compile(r"(\d+(-\d+)?(:\d+){0,2}|unlimited|infinite)", re.IGNORECASE)


def _refuse(flag: str, value: str, why: str):
    raise LaunchError(f"{flag} {value!r}: {why}")


def check_directive(flag: str, value: str, pattern: re.Pattern = _WORD) -> str:
    """A value for an #SBATCH line: refused (LaunchError naming `flag`) unless it is one line, one word."""
    if _CONTROL.search(value):
        _refuse(flag, value, "control characters (a newline adds a line to the batch script) are refused")
    if not pattern.fullmatch(value):
        if pattern is _TIME:
            _refuse(flag, value, "must be a SLURM time (minutes, [D-]HH:MM:SS, UNLIMITED)")
        _refuse(flag, value, "must be one word of letters, digits and _.,:@+=%-")
    return value


def check_options(options: SlurmOptions) -> None:
    """The flags of SlurmOptions that go into the script, checked before anything is written."""
    for flag, value in (("--partition", options.partition), ("--account", options.account)):
        if value:
            check_directive(flag, value)
    check_directive("--time", options.time, _TIME)
    for flag, value in (
        ("--nodes", options.nodes),
        ("--gpus-per-node", options.gpus_per_node),
        ("--cpus-per-task", options.cpus_per_task),
    ):
        if not isinstance(value, int) or value < 1:
            _refuse(flag, str(value), "must be a positive integer")
    if not isinstance(options.port, int) or not 0 < options.port < 65536:
        _refuse("--port", str(options.port), "must be a TCP port (1-65535)")
    if _CONTROL.search(re.sub(r"[\n\t]", "", options.setup)):  # shell lines, by design
        _refuse("--setup", options.setup, "control characters other than newlines and tabs are refused")
    if _CONTROL.search(options.script_dir):
        _refuse("--script-dir", options.script_dir, "control characters are refused")


def _log_dir(job: Job) -> str:
    path = str(Path(job.workdir) / "logs")
    if _CONTROL.search(path) or re.search(r"[\s\"'\\]", path):
        _refuse(
            "--workdir", job.workdir, "#SBATCH --output needs a path free of spaces, quotes, control chars"
        )
    return path


def script_dir(job: Job, options: SlurmOptions) -> Path:
    return Path(options.script_dir).absolute() if options.script_dir else Path(job.workdir) / "launch"


def bundle_dir(job: Job, options: SlurmOptions) -> Path:
    """Where the job's code is shipped: <script dir>/bundle-<digest of its content>, so that a later launch
    never changes the code of a queued or running job."""
    return script_dir(job, options) / f"bundle-{bundle.digest(job.configs())}"


def job_command(job: Job, options: SlurmOptions, program: Sequence[str] = JAXRL) -> list[str]:
    """The job's argv with --config pointing at the study file in its bundle."""
    configs = job.configs()
    args = list(
        job.with_config(str(bundle_dir(job, options) / bundle.study_name(configs[0])))
        if configs
        else job.args
    )
    for flag, value in zip(["", *args[:-1]], args, strict=True):
        if _CONTROL.search(value):
            _refuse(flag if flag.startswith("--") else "argument", value, "control characters are refused")
    return [*program, *args]


def render(job: Job, options: SlurmOptions, *, program: Sequence[str] = JAXRL) -> str:
    """The batch script of one job."""
    check_options(options)
    extra = [f"#SBATCH --partition={options.partition}"] if options.partition else []
    extra += [f"#SBATCH --account={options.account}"] if options.account else []
    setup = [options.setup] if options.setup else []
    code = shlex.quote(str(bundle_dir(job, options)))
    setup.append(f'export PYTHONPATH={code}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    values = {
        "job_name": check_directive("job name", f"jaxrl-{re.sub(r'[^A-Za-z0-9_.=+-]', '_', job.name)}"[:120]),
        "nodes": str(options.nodes),
        "gpus_per_node": str(options.gpus_per_node),
        "cpus_per_task": str(options.cpus_per_task),
        "time": options.time,
        "log_dir": _log_dir(job),
        "extra_sbatch": "\n".join(extra),
        "port": str(options.port),
        "setup": "\n".join(setup),
        "command": shlex.join(job_command(job, options, program)),
    }
    # One pass: a value is never searched for further {{fields}}.
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values.get(m.group(1), m.group(0)), TEMPLATE.read_text())
    leftover = [f for f in re.findall(r"\{\{(\w+)\}\}", TEMPLATE.read_text()) if f not in values]
    if leftover:
        raise ValueError(f"unfilled template fields {leftover}")
    return re.sub(r"\n{3,}", "\n\n", text)


def script_path(job: Job, options: SlurmOptions) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", job.name)
    return script_dir(job, options) / f"{safe}.sbatch"


def dependency_placeholder(name: str) -> str:
    """Stands for the SLURM job id of job `name` until it is submitted."""
    return "{job:" + name + "}"


def plan(jobs: Sequence[Job], options: SlurmOptions, *, program: Sequence[str] = JAXRL) -> list[Step]:
    """One `sbatch --parsable [--dependency=afterok:...] <script>` per job."""
    steps = []
    for job in jobs:
        argv = ["sbatch", "--parsable"]
        if job.after:
            argv.append("--dependency=afterok:" + ":".join(dependency_placeholder(a) for a in job.after))
        argv.append(str(script_path(job, options)))
        steps.append(Step(argv=tuple(argv), note=f"job {job.name}"))
    return steps


def launch(
    jobs: Sequence[Job],
    options: SlurmOptions,
    *,
    program: Sequence[str] = JAXRL,
    dry_run: bool = False,
    out=print,
) -> list[Step]:
    """Writes each job's bundle and script and submits it (dry_run: prints, per job, the command that writes
    its bundle and its script, then the sbatch commands; writes nothing)."""
    steps = plan(jobs, options, program=program)
    scripts = [render(job, options, program=program) for job in jobs]  # every flag checked before writing
    if dry_run:
        for job, script in zip(jobs, scripts, strict=True):
            make = bundle.command(job.configs(), str(bundle_dir(job, options)))
            out(f"# bundle (written unless it exists): {shlex.join(make)}")
            out(f"# {script_path(job, options)}\n{script}")
        out(format_plan(steps))
        return steps
    ids: dict[str, str] = {}
    for job, step, script in zip(jobs, steps, scripts, strict=True):
        path = script_path(job, options)
        path.parent.mkdir(parents=True, exist_ok=True)
        (Path(job.workdir) / "logs").mkdir(parents=True, exist_ok=True)
        bundle.ensure_tree(job.configs(), bundle_dir(job, options))
        path.write_text(script)
        argv = [re.sub(r"\{job:([^}]*)\}", lambda m: ids[m.group(1)], a) for a in step.argv]
        out("+ " + shlex.join(argv))
        result = subprocess.run(argv, check=True, capture_output=True, text=True)
        ids[job.name] = result.stdout.strip().split(";")[0]
        out(f"submitted {job.name}: SLURM job {ids[job.name]}")
    return steps
