"""Launchers: the same `jaxrl train` command on every host of a TPU slice (launch.tpu), on every node of a
SLURM allocation (launch.slurm) or in N local processes (launch.local); a sweep becomes one job per run.

Each launcher first builds its plan, a list of `Step`s whose `argv` is the exact command; `--dry-run` prints
the plan and runs nothing. `jobs()` turns an experiment file (and, with `sweep=True`, its sweep()) into the
`jaxrl train --config <file> --workdir <dir>/runs/<id> --set k=v ...` commands, in dependency order (both
paths absolute). Remote workers get a launch.bundle: the installed jaxrl and launch packages and the study
file, so a regular (non-editable) install launches as well as a checkout. User errors raise `LaunchError`.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

JAXRL = ("jaxrl",)


class LaunchError(ValueError):
    """A launch request that cannot be carried out as given (a bad flag value, a missing study file); its
    message is one line naming the flag."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One job: its name (the run id; "eval,<run id>" for a run's benchmark evaluation), workdir, `jaxrl
    train` or `jaxrl eval` arguments and the jobs it waits for."""

    name: str
    workdir: str
    args: tuple[str, ...]  # "train ..." or "eval ...": the program prefix is the launcher's
    after: tuple[str, ...] = ()

    def argv(self, program: Sequence[str] = JAXRL) -> list[str]:
        return [*program, *self.args]

    def configs(self) -> list[str]:
        """The study file the job reads ([] for an eval job, which reads a run dir)."""
        return [self.args[self.args.index("--config") + 1]] if "--config" in self.args else []

    def with_config(self, path: str) -> tuple[str, ...]:
        """The arguments with --config pointing at `path` (unchanged without --config)."""
        args = list(self.args)
        if "--config" in args:
            args[args.index("--config") + 1] = path
        return tuple(args)


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a plan. kind "run" runs argv; "poll" reruns argv until it prints `until`; "local" is a
    launcher-specific action (e.g. N processes at once) whose argv lists are in `group`."""

    argv: tuple[str, ...]
    kind: str = "run"
    until: str = ""
    group: tuple[tuple[str, ...], ...] = ()
    note: str = ""

    def commands(self) -> list[list[str]]:
        return [list(a) for a in self.group] if self.group else [list(self.argv)]


def local_program() -> tuple[str, ...]:
    """This interpreter running the CLI module: the jaxrl that plans the jobs is the one that runs them (a
    `jaxrl` found on PATH may belong to another environment)."""
    return (sys.executable, "-m", "jaxrl.cli")


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_diff(base, target) -> list[str]:
    """`key=value` overrides that turn config `base` into `target` (sorted by key)."""
    from jaxrl.config import flat_dict

    a, b = flat_dict(base), flat_dict(target)
    return [f"{k}={_value_text(b[k])}" for k in sorted(b) if a.get(k) != b[k]]


def train_args(config: str, workdir: str, sets: Sequence[str] = ()) -> tuple[str, ...]:
    """("train", "--config", config, "--workdir", workdir, "--set", k=v, ...)."""
    args = ["train", "--config", config, "--workdir", workdir]
    for item in sets:
        args += ["--set", item]
    return tuple(args)


def jobs(config: str, workdir: str, overrides: Sequence[str] = (), *, sweep: bool = False) -> list[Job]:
    """The runs to launch: one job for the config, or (sweep) one per run of `jaxrl.study.expand`, shared
    base runs first, then (a study with evaluation()) one `jaxrl eval` job per evaluated run, after it. Each
    training job's overrides are the given ones, then the sweep point's, then what the sweep adds (shared
    cache, init_from of a base run; all of a base run's own settings); checked to rebuild the run's exact
    config."""
    from jaxrl import config as config_lib
    from jaxrl import study as study_lib
    from jaxrl.eval import jobs as eval_jobs
    from jaxrl.validate import validate

    workdir = str(Path(workdir).absolute())
    config = str(Path(config).expanduser().absolute())
    overrides = list(overrides)
    module = config_lib.load_experiment(config)
    if not sweep:
        validate(config_lib.override(module.get_config(), overrides))
        return [Job("train", workdir, train_args(config, workdir, overrides))]
    base = config_lib.override(module.get_config(), overrides)
    out = []
    runs = study_lib.expand(module, workdir, overrides)
    for run in runs:
        point = [f"{k.replace('__', '.')}={_value_text(v)}" for k, v in run.point.items()]
        sets = overrides + point + config_diff(config_lib.override(base, run.point), run.cfg)
        rebuilt = config_lib.override(module.get_config(), sets)
        if rebuilt != run.cfg:
            raise config_lib.ConfigError(f"sweep run {run.id}: its overrides do not rebuild its config")
        after = run.deps  # its SFT base and reward model, launched before it
        run_dir = str(Path(workdir) / "runs" / run.id)
        out.append(Job(run.id, run_dir, train_args(config, run_dir, sets), after))
    evaluation = eval_jobs.spec(module)
    if evaluation is not None:  # one benchmark job per evaluated run, waiting for it
        for run in runs:
            if evaluation.evaluates(run.cfg.stage):
                run_dir = str(Path(workdir) / "runs" / run.id)
                out_dir = str(eval_jobs.out_dir(run_dir))
                out.append(Job(f"eval,{run.id}", out_dir, evaluation.cli_args(run_dir, out_dir), (run.id,)))
    return out


def format_plan(steps: Sequence[Step]) -> str:
    """The plan as shell lines (argv joined with shell quoting), poll and group steps annotated."""
    lines = []
    for step in steps:
        if step.note:
            lines.append(f"# {step.note}")
        if step.kind == "poll":
            lines.append(f"# repeated until it prints {step.until}")
        if step.group:
            lines.append(f"# {len(step.group)} processes at once")
        lines += [shlex.join(argv) for argv in step.commands()]
    return "\n".join(lines)


def run_command(argv: Sequence[str]) -> None:
    """Runs one command, its output streamed; a non-zero exit raises."""
    print("+ " + shlex.join(argv), flush=True)
    subprocess.run(list(argv), check=True)


def poll(
    argv: Sequence[str],
    until: str,
    *,
    interval_s: float = 30.0,
    timeout_s: float = 24 * 3600.0,
    failed: Sequence[str] = ("FAILED", "SUSPENDED"),
) -> None:
    """Reruns argv until its output is `until`; a state in `failed` or the timeout raises."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        state = subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout.strip()
        print(f"state: {state}", flush=True)
        if state == until:
            return
        if state in failed:
            raise RuntimeError(f"{shlex.join(argv)} reports {state}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{shlex.join(argv)} did not reach {until} in {timeout_s:.0f} s")
        time.sleep(interval_s)


def execute(steps: Sequence[Step]) -> None:
    """Runs a plan's plain and poll steps in order (launchers run their own group steps)."""
    for step in steps:
        if step.kind == "poll":
            poll(step.argv, step.until)
        elif step.kind == "run":
            run_command(step.argv)
        else:
            raise ValueError(f"step kind {step.kind!r} needs its launcher")
