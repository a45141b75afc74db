"""`jaxrl eval`: lm-evaluation-harness tasks on a jaxrl run dir or HF checkpoint dir, by the "jaxrl" backend.

Each task's results go to `<out>/tasks/<task>.json` as soon as it finishes (so a killed run, rerun, does not
redo finished tasks), and `<out>/results.json` gathers them in lm-eval's results format. Process 0 writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from jaxrl import files
from jaxrl.config import ConfigError
from jaxrl.eval import model as model_lib
from jaxrl.eval import suites

RESULTS_FILE = "results.json"


# Built TaskManagers by their include paths and the state of the YAML files under them. Indexing lm-eval's
# built-in tasks reads thousands of YAML files (seconds of CPU); a process that evaluates many times (a sweep,
# a notebook, the tests) builds that index once. A manager is not changed by use (lm-eval sets its state in
# __init__ only), and an edited or added local task file changes the key, so a rebuilt index sees it.
_MANAGERS: dict[tuple, object] = {}


def _yaml_state(paths: list[str]) -> tuple:
    state = []
    for path in paths:
        root = Path(path)
        files = [root] if root.is_file() else sorted(root.rglob("*.y*ml"))
        for f in files:
            st = f.stat()
            state.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(state)


def task_manager(include_path: list[str] | None):
    """lm-eval's TaskManager over its built-in tasks plus local task YAML directories (cached per process)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path or []]
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"--include-path {path}: no such file or directory")
    key = (tuple(paths), _yaml_state(paths))
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=paths or None)
    return _MANAGERS[key]


def check_tasks(entries: list[suites.SuiteTask], manager) -> None:
    known = set(manager.all_tasks) | {"alpaca_eval_rm"}
    unknown = [e.task for e in entries if e.task not in known]
    if unknown:
        raise ConfigError(
            f"unknown task(s): {', '.join(unknown)} (not an lm-eval task, group or tag, nor a jaxrl "
            f"suite ({', '.join(suites.SUITES)}); local tasks need --include-path)"
        )


def summary_line(task: str, result: dict, metric: str = "") -> str:
    """One line: the task's metrics (the suite's first), with standard errors and the number of documents."""
    parts = []
    for key, value, stderr in suites.task_metrics(task, result, metric):
        name, _, filt = key.partition(",")
        label = name if filt in ("none", "") else f"{name}[{filt}]"
        err = f" ± {stderr:.4f}" if stderr is not None else ""
        parts.append(f"{label}={value:.4f}{err}")
    samples = result.get("n-samples", {}).get(task, {})
    n = f" (n={samples.get('effective')})" if isinstance(samples, dict) and "effective" in samples else ""
    return f"{task}: {' '.join(parts) or 'no metrics'}{n}"


def _write_json(path: Path, data: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    with files.replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")


def _merge(results: dict[str, dict], model: str) -> dict:
    merged: dict = {"model": str(model), "tasks": list(results)}
    for result in results.values():
        for key, value in result.items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            elif key not in merged:
                merged[key] = value
    return merged


def evaluate(
    model: str,
    tasks: list[str],
    out: str | Path,
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: list[str] | None = None,
    batch_size: int | None = None,
    model_args: dict | None = None,
    apply_chat_template: bool | None = None,
    with_optional: bool = False,
    judge: str | None = None,
    alpaca_file: str | None = None,
    log_samples: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs every task not finished in `out`; returns lm-eval's merged results (process 0; {} elsewhere)."""
    import lm_eval

    from jaxrl.eval.backend import JaxrlLM, allgather_objects

    if not tasks:
        raise ConfigError("--tasks names no task")
    if limit is not None and limit >= 1:
        limit = int(limit)
    model_lib.check_model_dir(model)
    from jaxrl import distributed

    distributed.initialize()  # several processes join before any JAX use (the finished-task check gathers)
    entries = suites.expand(tasks, with_optional=with_optional)
    manager = task_manager(include_path)
    check_tasks(entries, manager)
    out = Path(out)
    task_dir = out / "tasks"
    files = {e.task: task_dir / f"{suites.safe_name(e.task)}.json" for e in entries}
    # Process 0's view of what is finished decides for all (an unshared disk must not split the processes).
    done = allgather_objects(sorted(t for t, f in files.items() if f.is_file()))[0]
    results: dict[str, dict] = {}
    lm = None
    for entry in entries:
        if entry.task in done:
            results[entry.task] = json.loads(files[entry.task].read_text())
            log(summary_line(entry.task, results[entry.task], entry.metric) + "  [already done]")
            continue
        if lm is None:
            args = dict(model_args or {})
            if batch_size is not None:
                args["batch_size"] = batch_size
            lm = JaxrlLM(pretrained=str(model), **args)
        chat = entry.chat if apply_chat_template is None else apply_chat_template
        shots = num_fewshot if num_fewshot is not None else entry.num_fewshot
        task_limit = min(x for x in (limit, entry.limit) if x is not None) if (limit or entry.limit) else None
        if entry.task == "alpaca_eval_rm":
            from jaxrl.eval import alpaca_rm

            result = alpaca_rm.evaluate(
                lm,
                judge=judge,
                data_file=alpaca_file,
                limit=task_limit,
                gen_kwargs=entry.gen_kwargs,
                chat=chat,
            )
        else:
            try:
                result = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[entry.task],
                    num_fewshot=shots,
                    limit=task_limit,
                    task_manager=manager,
                    gen_kwargs=entry.gen_kwargs,
                    apply_chat_template=chat,
                    fewshot_as_multiturn=chat,
                    log_samples=log_samples,
                    bootstrap_iters=1000,
                )
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"task {entry.task}: {e}") from e
            except Exception as e:  # datasets' own errors (a missing dataset, an offline hub) name the data
                if type(e).__module__.startswith(("datasets", "huggingface_hub")):
                    raise ConfigError(f"task {entry.task}: {type(e).__name__}: {e}") from e
                raise
        if result is None:  # processes other than 0 hold no results
            continue
        samples = result.pop("samples", None)
        _write_json(files[entry.task], result)
        if samples:
            with open(task_dir / f"{suites.safe_name(entry.task)}.samples.jsonl", "w") as f:
                from lm_eval.utils import handle_non_serializable

                for task_samples in samples.values():
                    for sample in task_samples:
                        f.write(
                            json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n"
                        )
        results[entry.task] = result
        log(summary_line(entry.task, result, entry.metric))
    import jax

    if jax.process_index() != 0:
        return {}
    merged = _merge(results, model)
    _write_json(out / RESULTS_FILE, merged)
    log(f"results: {out / RESULTS_FILE}")
    return merged
