"""Sweeps: run every run of a study that is not finished (a rerun answers finished ones at once, resumes
interrupted ones, and refuses run dirs made under another config), choose recipes on validation when the study
searches, evaluate the arms on benchmarks when it asks, and return the result rows (jaxrl.results writes the
table and plots).

The pieces: jaxrl.study (expansion into runs), jaxrl.search (recipe selection), jaxrl.results (rows, table,
plots, findings), jaxrl.group (runs that share shapes trained as one program). `start_workers` adds sweep
processes on the same workdir (`jaxrl sweep --workers N`)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from jaxrl import config as config_lib
from jaxrl import group as group_lib
from jaxrl import grouping
from jaxrl import workdir as workdir_lib
from jaxrl.files import replacing
from jaxrl.results import collect
from jaxrl.search import final_points, recipe_label, reward_model_recipes
from jaxrl.study import Run, check_stale, expand, grid_points, reward_model_arms


def run_sweep(
    module, workdir: str | Path, overrides=(), *, log=print, poll_s: float = 1.0, group: str = "auto"
) -> list[dict]:
    """Runs every unfinished run (finished ones are skipped, interrupted ones resume); returns result rows.

    Several sweeps may share one workdir: each run is locked by the process training it, and the others go on
    with other runs, then wait for it. A run that fails is reported and its dependents are not started.

    A study with search(arm) is run in phases: the grids of the reward models it searches
    (study.reward_model_arms), whose selected recipes reward every RL run after them; every recipe arm's grid
    on the search seed (recipe_arm: an arm, or the arm that chooses the recipe of several); then, per arm, the
    setting and checkpoint with the best validation score (`selection`, per stage) on its recipe arm rerun
    with fresh seeds; the rows returned are those of the fresh-seed runs (and their bases and reward models),
    each with its selected `recipe`. selected.json records every selection.

    `group`: runs that share shapes train as one program (jaxrl.group): "map" steps the members one after
    another inside it, each bitwise as it would alone on a CPU; "vmap" ("on") batches them, each as it would
    alone to float rounding, and over long runs rounding differences grow, so a vmapped study agrees with a
    one-at-a-time one in distribution, not number for number (bench/results/sweep_groups.md); "off" trains one
    run at a time; "auto" (jaxrl.grouping.grouping) is vmap on a GPU or TPU and map on a CPU."""
    if group not in grouping.MODES:
        raise config_lib.ConfigError(f"--group {group!r}: expected one of {', '.join(grouping.MODES)}")
    workdir = Path(workdir).absolute()
    # Every stage's runner is imported now, not at the sweep's first online run: a sweep that runs for hours
    # must not combine modules loaded at its start with ones edited in the checkout since.
    import jaxrl.rl.runner  # noqa: F401
    from jaxrl.eval import jobs as eval_jobs

    evaluation = eval_jobs.spec(module)
    if evaluation is not None:
        eval_jobs.check(evaluation)  # before hours of training, not after

    def evaluated(runs: list[Run]) -> list[Run]:
        if evaluation is not None:
            dirs = [workdir / "runs" / r.id for r in runs if evaluation.evaluates(r.cfg.stage)]
            eval_jobs.evaluate_runs([d for d in dirs if _finished(d)], evaluation, log)
        return runs

    if not hasattr(module, "search") or all(module.search(dict(arm)) is None for arm in module.sweep()):
        runs = evaluated(_run_all(expand(module, workdir, overrides), workdir, log, poll_s, group))
        return collect(runs, workdir, evaluation)
    rm_recipes = {}
    if rm_arms := reward_model_arms(module):
        log("search: the reward models' recipe grids on the search seed")
        rm_grid = expand(module, workdir, overrides, grid_points(module, rm_arms))
        _run_all(rm_grid, workdir, log, poll_s, group)
        rm_recipes = reward_model_recipes(module, workdir, overrides)
    log("search: every arm's recipe grid on the search seed")
    _run_all(expand(module, workdir, overrides, rm_recipes=rm_recipes), workdir, log, poll_s, group)
    points, chosen = final_points(module, workdir, overrides, rm_recipes)
    chosen = rm_recipes | chosen
    with replacing(workdir / "selected.json") as tmp:  # workers write it too
        tmp.write_text(json.dumps(chosen, indent=2) + "\n")
    log("selected recipes (validation) rerun with fresh seeds")
    final = expand(module, workdir, overrides, points, rm_recipes)
    runs = evaluated(_run_all(final, workdir, log, poll_s, group))
    return label_recipes(collect(runs, workdir, evaluation), runs, chosen)


def label_recipes(rows: list[dict], runs: list[Run], chosen: dict[str, dict]) -> list[dict]:
    """Gives each row of a run of a selected arm (its point is the arm, the recipe and a seed) the arm's
    `recipe` label in place of the recipe's own columns: the arm is one row whatever was selected."""
    points = {r.id: r.point for r in runs}
    for row in rows:
        point = points[row["run"]]
        for key, entry in chosen.items():
            recipe = entry["recipe"]
            if {k: v for k, v in point.items() if k != "seed" and k not in recipe} == json.loads(key):
                row["recipe"] = recipe_label(recipe)
                for k in recipe:
                    row.pop(k, None)
                break
    return rows


def start_workers(count: int, argv: list[str], workdir: str | Path) -> list[tuple[subprocess.Popen, Path]]:
    """`count` more sweep processes on the same workdir, each running `python -m jaxrl.cli <argv>` (a sweep
    command line that only trains: `jaxrl sweep ... --worker`). Every process walks the same runs and
    trains whichever unfinished one is free: a run's workdir lock decides who trains it, so none is trained
    twice, and a process waits for the runs others hold (the sweep's concurrency, tests/test_chaos.py).
    Each worker's output goes to <workdir>/logs/worker-<k>.log. Returns (process, log path) pairs for
    `join_workers`.

    On a CPU machine a second process uses the cores a small model's run leaves idle (dispatch, host-side
    evaluation); on one accelerator every worker would hold its own share of the device's memory."""
    logs = Path(workdir).absolute() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1"}  # the log keeps the "finished <run>" lines, not the bar
    procs = []
    for k in range(1, count + 1):
        path = logs / f"worker-{k}.log"
        with open(path, "w") as out:
            cmd = [sys.executable, "-m", "jaxrl.cli", *argv]
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), path))
    return procs


def join_workers(procs: list[tuple[subprocess.Popen, Path]], *, stop: bool = False) -> list[str]:
    """Waits for the workers (`stop`: terminates them first, as when this sweep itself failed or was
    interrupted; their runs resume on the next sweep). Returns a line per worker that failed, naming its
    log."""
    if stop:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
    problems = []
    for proc, path in procs:
        code = proc.wait()
        if code != 0 and not stop:
            tail = path.read_text().strip().splitlines()[-1:] if path.exists() else []
            problems.append(f"worker exited with status {code} ({path}): {' '.join(tail)}")
    return problems


def _finished(run_dir: Path) -> bool:
    summary = workdir_lib.finished_summary(run_dir)
    return summary is not None and summary.get("status", "finished") == "finished"


def _run_all(runs: list[Run], workdir: Path, log, poll_s: float, group: str = "auto") -> list[Run]:
    """Trains every unfinished run of `runs` (see run_sweep); returns `runs`. When grouping (see run_sweep),
    runs whose programs share shapes and whose dependencies are finished train together as one
    program (jaxrl.group); otherwise one run at a time."""
    from tqdm import tqdm

    from jaxrl import train

    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    check_stale(runs, workdir)
    _enable_compilation_cache(workdir / "cache" / "xla")
    by_id = {r.id: r for r in runs}
    ended: dict[str, str] = {}  # a run's final status never changes: read each summary once

    def status(r: Run) -> str:
        if r.id not in ended:
            summary = workdir_lib.finished_summary(workdir / "runs" / r.id)
            if summary is None:
                return "missing"
            ended[r.id] = summary.get("status", "finished")
        return ended[r.id]

    todo = [r for r in runs if status(r) == "missing"]
    log(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run")
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="sweep", dynamic_ncols=True)
    quiet = lambda *a, **k: None
    blocked: set[str] = set()  # runs whose dependency failed
    while todo:
        progressed = False
        for r in list(todo):
            states = [status(by_id[d]) for d in r.deps]
            if any(s == "failed" for s in states) or any(d in blocked for d in r.deps):
                blocked.add(r.id)
                todo.remove(r)
                bar.write(f"not run {r.id}: a run it depends on failed")
                bar.update(1)
                progressed = True
                continue
            if any(s != "finished" for s in states):
                continue  # its base or reward model is still being trained (here or by another sweep)
            if status(r) != "missing":  # another sweep (a worker) ended it meanwhile
                todo.remove(r)
                bar.update(1)
                progressed = True
                continue
            bar.set_postfix_str(r.id[:60])
            start = time.perf_counter()
            how = grouping.grouping(group)
            key = group_lib.group_key(r.cfg, how) if how else None
            mates = [
                o
                for o in todo
                if o is not r
                and key is not None
                and group_lib.group_key(o.cfg, how) == key
                and all(status(by_id[d]) == "finished" for d in o.deps)
            ]
            if mates:
                members = [r, *mates]
                results = group_lib.run_group(
                    [config_lib.override(m.cfg, {"train.progress": False}) for m in members],
                    [workdir / "runs" / m.id for m in members],
                    log=quiet,
                    how=how,
                )
                ran = [
                    (m, x)
                    for m, x in zip(members, results, strict=True)
                    if not isinstance(x, workdir_lib.WorkdirLocked)
                ]
                elapsed = time.perf_counter() - start
                for m, x in ran:
                    if isinstance(x, workdir_lib.RunFailed):
                        bar.write(f"FAILED {m.id}: {x.summary.get('reason')}")
                    elif isinstance(x, Exception):
                        raise x
                    else:
                        bar.write(f"finished {m.id} (a group of {len(ran)}, {elapsed:.0f}s)")
                    todo.remove(m)
                    bar.update(1)
                if ran:
                    progressed = True
                    break
                continue
            answered = []  # run_in's word that another process finished it after the check above
            try:
                train.run(
                    config_lib.override(r.cfg, {"train.progress": False}),
                    workdir / "runs" / r.id,
                    log=quiet,
                    answered=functools.partial(answered.append, True),
                )
                if not answered:
                    bar.write(f"finished {r.id} in {time.perf_counter() - start:.0f}s")
            except workdir_lib.WorkdirLocked:
                continue  # another sweep is training it; come back to it
            except workdir_lib.RunFailed as e:
                bar.write(f"FAILED {r.id}: {e.summary.get('reason')}")
            todo.remove(r)
            bar.update(1)
            progressed = True
            break  # dependencies may have finished meanwhile: scan again from the first run
        if todo and not progressed:
            time.sleep(poll_s)
    bar.close()
    return runs


def _enable_compilation_cache(path: Path) -> None:
    # Arms of a study share shapes, so most programs compile once for the whole sweep.
    import jax

    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
