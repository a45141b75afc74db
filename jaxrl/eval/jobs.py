"""A study's benchmark evaluation: the `jaxrl eval` job each finished arm gets, its scores as table columns.

A study file may define `evaluation()`, returning the `jaxrl eval` settings of its arms:

    def evaluation():
        return {"tasks": ["tulu25"], "limit": None, "include_path": ["/data/tasks"]}

Keys: tasks (required: lm-eval task names or jaxrl suites), limit, num_fewshot, include_path, batch_size,
model_args, apply_chat_template, with_optional, judge, alpaca_file, and stages (the stages whose runs are
evaluated; by default every stage but "rm": a reward model is not a policy). `jaxrl sweep` runs the job on
every finished run of those stages (results in `<run dir>/harness/`, one file per task, so a rerun redoes
nothing) and `jaxrl launch ... --sweep` adds one job per run that waits for it. Each task's headline metric
(the suite's, or the task's first) becomes the column `harness/<task>` with its standard error in
`harness/<task>_se`, so `metrics()` may name them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxrl.config import ConfigError

OUT_DIR = "harness"  # inside the run dir
PREFIX = "harness/"


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...]
    limit: float | None = None
    num_fewshot: int | None = None
    include_path: tuple[str, ...] = ()
    batch_size: int | None = None
    model_args: tuple[tuple[str, Any], ...] = ()
    apply_chat_template: bool | None = None
    with_optional: bool = False
    judge: str | None = None
    alpaca_file: str | None = None
    stages: tuple[str, ...] | None = None  # None: every stage but rm

    def evaluates(self, stage: str) -> bool:
        return stage != "rm" if self.stages is None else stage in self.stages

    def harness_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `jaxrl.eval.harness.evaluate` (tasks, model and out aside)."""
        return {
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "include_path": list(self.include_path) or None,
            "batch_size": self.batch_size,
            "model_args": dict(self.model_args),
            "apply_chat_template": self.apply_chat_template,
            "with_optional": self.with_optional,
            "judge": self.judge,
            "alpaca_file": self.alpaca_file,
        }

    def cli_args(self, model: str, out: str) -> tuple[str, ...]:
        """The `jaxrl eval` arguments of the same job (what a launcher runs)."""
        args = ["eval", "--model", model, "--tasks", ",".join(self.tasks), "--out", out]
        for flag, value in (
            ("--limit", self.limit),
            ("--num-fewshot", self.num_fewshot),
            ("--batch-size", self.batch_size),
            ("--judge", self.judge),
            ("--alpaca-file", self.alpaca_file),
        ):
            if value is not None:
                args += [flag, str(value)]
        for path in self.include_path:
            args += ["--include-path", path]
        for key, value in self.model_args:
            args += ["--model-arg", f"{key}={value}"]
        if self.apply_chat_template is not None:
            args.append("--apply-chat-template" if self.apply_chat_template else "--no-apply-chat-template")
        if self.with_optional:
            args.append("--with-optional")
        return tuple(args)


_FIELDS = {f.name for f in dataclasses.fields(EvalSpec)}


def spec(module) -> EvalSpec | None:
    """The study's evaluation() as an EvalSpec (None: the study runs no benchmark evaluation)."""
    if not hasattr(module, "evaluation"):
        return None
    settings = module.evaluation()
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ConfigError(
            f"evaluation() returned {type(settings).__name__}: expected a dict of jaxrl eval settings"
        )
    unknown = sorted(set(settings) - _FIELDS)
    if unknown:
        raise ConfigError(
            f"evaluation(): unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})"
        )
    tasks = settings.get("tasks")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError("evaluation(): 'tasks' must name at least one task or suite")
    values = dict(settings, tasks=tuple(tasks))
    for key in ("include_path", "stages"):
        if values.get(key) is not None:
            if isinstance(values[key], str):
                raise ConfigError(f"evaluation(): {key!r} must be a list, not the string {values[key]!r}")
            values[key] = tuple(values[key])
    if values.get("model_args") is not None:
        values["model_args"] = tuple(sorted(dict(values["model_args"]).items()))
    values = {k: v for k, v in values.items() if v is not None or k in ("limit", "num_fewshot")}
    return EvalSpec(**values)


def require_lm_eval() -> None:
    """A one-line error, before any run starts, when the study evaluates but lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(f'the study\'s evaluation() needs lm-eval: pip install -e ".[eval]" ({e})') from e


def out_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / OUT_DIR


def headline(task: str, result: dict, metric: str = "") -> tuple[str, float, float | None] | None:
    """(metric key, value, standard error) of a task's results: the suite's metric, else the first one."""
    from jaxrl.eval import suites

    found = suites.task_metrics(task, result, metric)
    return found[0] if found else None


def scores(run_dir: str | Path, evaluation: EvalSpec) -> dict[str, float]:
    """`harness/<task>` (and `_se`) for every task of the spec whose results the run dir holds."""
    from jaxrl.eval import suites

    task_dir = out_dir(run_dir) / "tasks"
    out: dict[str, float] = {}
    for entry in suites.expand(list(evaluation.tasks), with_optional=evaluation.with_optional):
        path = task_dir / f"{suites.safe_name(entry.task)}.json"
        if not path.is_file():
            continue
        found = headline(entry.task, json.loads(path.read_text()), entry.metric)
        if found is not None:
            _, value, stderr = found
            out[f"{PREFIX}{entry.task}"] = value
            if stderr is not None:
                out[f"{PREFIX}{entry.task}_se"] = stderr
    return out


def finished(run_dir: str | Path, evaluation: EvalSpec) -> bool:
    """Whether every task of the spec has its results file in the run's harness dir."""
    from jaxrl.eval import suites

    task_dir = out_dir(run_dir) / "tasks"
    entries = suites.expand(list(evaluation.tasks), with_optional=evaluation.with_optional)
    return all((task_dir / f"{suites.safe_name(e.task)}.json").is_file() for e in entries)


def check(evaluation: EvalSpec) -> None:
    """Refuses, before any run trains, a spec whose tasks lm-eval does not know or whose paths are missing."""
    require_lm_eval()
    from jaxrl.eval import harness, suites

    for path in (evaluation.judge, evaluation.alpaca_file):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"evaluation(): {path}: no such file or directory")
    entries = suites.expand(list(evaluation.tasks), with_optional=evaluation.with_optional)
    harness.check_tasks(entries, harness.task_manager(list(evaluation.include_path) or None))


def evaluate_runs(run_dirs: list[Path], evaluation: EvalSpec, log) -> dict[Path, str]:
    """`jaxrl eval` on each run dir whose tasks are not all done; returns {run dir: reason} of those that
    failed (each is logged; the others go on)."""
    from jaxrl.eval import harness

    failed = {}
    for run_dir in run_dirs:
        if finished(run_dir, evaluation):
            continue
        log(f"evaluating {run_dir.name}: {', '.join(evaluation.tasks)}")
        try:
            harness.evaluate(
                str(run_dir),
                list(evaluation.tasks),
                out_dir(run_dir),
                log=lambda line, name=run_dir.name: log(f"  {name}: {line}"),
                **evaluation.harness_kwargs(),
            )
        except (ConfigError, FileNotFoundError) as e:
            failed[run_dir] = str(e)
            log(f"EVAL FAILED {run_dir.name}: {e}")
    return failed
