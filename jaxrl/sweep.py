"""Sweeps: expand an experiment's sweep() into runs with ids from their overrides, run what is not finished,
share base runs (SFT) by content hash and reward-model runs between the RL points that use them, and write the
results table (Markdown, CSV) and plots."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxrl import config as config_lib
from jaxrl import group as group_lib
from jaxrl.config import Config


@dataclasses.dataclass(frozen=True)
class Run:
    id: str
    cfg: Config
    point: dict[str, Any]  # the sweep point's overrides ({} for shared base runs)
    kind: str  # "point" or "base"
    deps: tuple[str, ...] = ()  # ids of the runs this one reads (its SFT base, its reward model)


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(value))


def run_id(cfg: Config, point: dict[str, Any]) -> str:
    """A readable id from the stage and the point's overrides (hashed when very long)."""
    parts = [cfg.stage] + [f"{k.replace('__', '.')}={_slug(v)}" for k, v in sorted(point.items())]
    rid = ",".join(parts)
    if len(rid) > 120:
        rid = f"{cfg.stage},{hashlib.sha256(rid.encode()).hexdigest()[:16]}"
    return rid


def config_hash(cfg: Config) -> str:
    """A content hash of a resolved config; settings that only change how a run is shown
    (workdir.PRESENTATION_KEYS) are hashed at their defaults, so they never split a shared base."""
    from jaxrl.workdir import PRESENTATION_KEYS

    defaults = config_lib.flat_dict(config_lib.Config(stage=cfg.stage))
    cfg = config_lib.override(cfg, {key: defaults[key] for key in PRESENTATION_KEYS})
    return hashlib.sha256(json.dumps(config_lib.to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def expand(module, workdir: str | Path, overrides=(), points: list[dict] | None = None) -> list[Run]:
    """All runs of a study, each after the runs it depends on.

    A study module defines get_config() and sweep() (a list of override dicts, one per point) and optionally:
      stage_defaults(stage) -> dict   settings of a stage, applied before a point's own overrides (so they
                                      are not part of its id; a point may still override them);
      sft_config(cfg) -> Config       the SFT base a non-SFT point starts from (shared by content hash), given
                                      the point's config without its stage defaults (the rl section of the
                                      result is reset to the study's, as an SFT run does not read it);
      reward_model(point) -> dict     for an RL point, the sweep point of the reward-model run that gives its
                                      reward (None: no reward model); rl.reward_model becomes that run's dir;
      search(point) -> list[dict]     a recipe grid per arm (see run_sweep): sweep() then lists arms, and the
                                      runs expanded here are the grid's, on the search seed (None: the arm is
                                      a plain point);
      recipe_arm(arm) -> dict         the arm whose search selects this arm's recipe (default: the arm
                                      itself), so that arms of one algorithm share one recipe: only recipe
                                      arms are searched.
    """
    from jaxrl.validate import validate

    workdir = Path(workdir).absolute()
    base = config_lib.override(module.get_config(), overrides)
    if points is None:
        points = (
            search_points(module)
            if hasattr(module, "search")
            else list(module.sweep())
            if hasattr(module, "sweep")
            else [{}]
        )
    shared = {"train.cache_dir": str(workdir / "cache")}
    runs: dict[str, Run] = {}

    def run_dir(rid: str) -> str:
        return str(workdir / "runs" / rid)

    def add_point(point: dict[str, Any]) -> str:
        stage = str(point.get("stage", base.stage))
        defaults = dict(module.stage_defaults(stage)) if hasattr(module, "stage_defaults") else {}
        plain = config_lib.override(config_lib.override(base, point), shared)
        cfg = config_lib.override(config_lib.override(config_lib.override(base, defaults), point), shared)
        deps = []
        if cfg.stage != "sft" and hasattr(module, "sft_config"):
            # The base follows the point's own overrides (model, seed), not its stage's defaults; an SFT run
            # never reads the rl section, so the point's rl settings do not split the base either.
            sft = config_lib.override(module.sft_config(plain), shared)
            if sft.stage not in config_lib.RL_STAGES:
                sft = dataclasses.replace(sft, rl=base.rl)
            sft = validate(sft)
            sft_id = f"sft,{config_hash(sft)}"
            runs.setdefault(sft_id, Run(sft_id, sft, {}, "base"))
            cfg = config_lib.override(cfg, {"train.init_from": run_dir(sft_id)})
            deps.append(sft_id)
        if cfg.stage in config_lib.RL_STAGES and hasattr(module, "reward_model"):
            rm_point = module.reward_model(dict(point))
            if rm_point is not None:
                rm_id = add_point(dict(rm_point))
                if runs[rm_id].cfg.stage != "rm":
                    raise config_lib.ConfigError(
                        f"reward_model({point}) names run {rm_id}, which is not an rm run"
                    )
                cfg = config_lib.override(cfg, {"rl.reward_model": run_dir(rm_id)})
                deps.append(rm_id)
        cfg = validate(cfg)
        rid = run_id(cfg, point)
        if rid in runs and runs[rid].cfg != cfg:
            raise config_lib.ConfigError(f"two sweep points map to run id {rid!r} with different configs")
        runs.setdefault(rid, Run(rid, cfg, dict(point), "point", tuple(deps)))
        return rid

    for point in points:
        add_point(dict(point))
    return list(runs.values())  # insertion order: every run comes after the runs it depends on


def has_full(module) -> bool:
    """Whether a study has a full variant: its sweep() takes `full` (sweep(full=True) is the full grid)."""
    import inspect

    return hasattr(module, "sweep") and "full" in inspect.signature(module.sweep).parameters


def variant(module, *, full: bool, label: str = "the study"):
    """The study with sweep() giving its full grid when `full` (the one place a variant is chosen); the module
    itself otherwise. A study without a full variant refuses `full`."""
    if not full:
        return module
    if not has_full(module):
        raise config_lib.ConfigError(
            f"{label}: sweep() takes no `full` argument (the study has no full grid)"
        )
    import types

    view = types.ModuleType(module.__name__, module.__doc__)
    view.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    view.sweep = lambda: module.sweep(full=True)
    return view


def selection(module) -> dict:
    """A search study's selection settings: the seed the grid is searched on, the fresh seeds the selected
    recipe is rerun with, and the validation metric that selects (higher is better)."""
    settings = {"search_seed": 0, "seeds": [1, 2, 3], "metric": "val/gold_reward"}
    settings |= dict(module.selection()) if hasattr(module, "selection") else {}
    if not str(settings["metric"]).startswith("val/"):
        raise config_lib.ConfigError(
            f"selection metric {settings['metric']!r}: recipes are selected on the "
            f"validation split only (a val/ metric)"
        )
    return settings


def recipe_arm(module, arm: dict) -> dict:
    """The arm whose recipe search selects `arm`'s recipe: the study's recipe_arm(arm), or the arm itself."""
    chosen = dict(module.recipe_arm(dict(arm))) if hasattr(module, "recipe_arm") else dict(arm)
    if module.search(dict(chosen)) is None:
        raise config_lib.ConfigError(f"recipe_arm({arm}) is {chosen}, which has no search grid")
    return chosen


def search_points(module) -> list[dict]:
    """Every recipe arm (see recipe_arm) with every setting of its search grid, on the search seed, each once;
    an arm whose grid is None is a plain point, run as it is."""
    seed = selection(module)["search_seed"]
    points, seen = [], set()
    for arm in module.sweep():
        if module.search(dict(arm)) is None:
            points.append(dict(arm))
            continue
        searched = recipe_arm(module, arm)
        key = json.dumps(searched, sort_keys=True)
        if key not in seen:
            seen.add(key)
            points += [{**searched, **setting, "seed": seed} for setting in module.search(dict(searched))]
    return points


def validation_scores(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, score) of a run's validation evaluations. Only val/ rows are read: selection never sees a test
    metric."""
    from jaxrl.metrics import read_metrics

    rows = [
        {k: v for k, v in row.items() if k == "step" or k.startswith("val/")} for row in read_metrics(run_dir)
    ]
    return [
        (int(row["step"]), float(row[metric])) for row in rows if isinstance(row.get(metric), (int, float))
    ]


def select_recipe(candidates: list[tuple[dict, Path]], metric: str) -> tuple[dict, int, float]:
    """(setting, step, score): the recipe and training length whose validation score is the highest over every
    candidate run's validation curve (ties: the first candidate, the earlier step)."""
    best = None
    for setting, run_dir in candidates:
        for step, score in validation_scores(run_dir, metric):
            if best is None or score > best[2]:
                best = (setting, step, score)
    if best is None:
        raise config_lib.ConfigError(f"no validation scores ({metric}) in {[str(d) for _, d in candidates]}")
    return best


def final_points(module, workdir: Path, overrides=()) -> tuple[list[dict], dict[str, dict]]:
    """The selected recipe of every arm with the fresh seeds, and what was selected per arm (the table's)."""
    settings = selection(module)
    search = {r.id: r for r in expand(module, workdir, overrides) if r.kind == "point"}
    by_point = {json.dumps(r.point, sort_keys=True): r.id for r in search.values()}
    points, chosen, selected = [], {}, {}
    for arm in module.sweep():
        if module.search(dict(arm)) is None:
            points.append(dict(arm))
            continue
        searched = recipe_arm(module, arm)
        key = json.dumps(searched, sort_keys=True)
        if key not in selected:
            candidates = []
            for setting in module.search(dict(searched)):
                point = {**searched, **setting, "seed": settings["search_seed"]}
                rid = by_point[json.dumps(point, sort_keys=True)]
                candidates.append((setting, workdir / "runs" / rid))
            setting, step, score = select_recipe(candidates, settings["metric"])
            run = search[
                by_point[json.dumps({**searched, **setting, "seed": settings["search_seed"]}, sort_keys=True)]
            ]
            recipe = dict(setting)
            if step != run.cfg.train.steps:
                recipe["train.steps"] = step  # the selected checkpoint: the rerun trains that long
            selected[key] = {"recipe": recipe, "validation": score}
        entry = dict(selected[key])
        if searched != dict(arm):
            entry["selected_on"] = searched  # the validation score is the recipe arm's
        chosen[json.dumps(arm, sort_keys=True)] = entry
        points += [{**arm, **entry["recipe"], "seed": seed} for seed in settings["seeds"]]
    return points, chosen


def check_stale(runs: list[Run], workdir: Path) -> None:
    """Refuses, before anything runs, a run dir whose saved config is not its point's config (a study file or
    an override changed since it ran), naming the keys that differ."""
    from jaxrl import train
    from jaxrl import workdir as workdir_lib

    problems = []
    for r in runs:
        run_dir = workdir / "runs" / r.id
        if (run_dir / workdir_lib.CONFIG_FILE).exists():
            try:
                workdir_lib.check_config(run_dir, train.resolve(r.cfg))
            except config_lib.ConfigError as e:
                problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 1} more run(s))" if len(problems) > 1 else ""
        raise config_lib.ConfigError(problems[0] + more)


def run_sweep(
    module, workdir: str | Path, overrides=(), *, log=print, poll_s: float = 1.0, group: str = "auto"
) -> list[dict]:
    """Runs every unfinished run (finished ones are skipped, interrupted ones resume); returns result rows.

    Several sweeps may share one workdir: each run is locked by the process training it, and the others go on
    with other runs, then wait for it. A run that fails is reported and its dependents are not started.

    A study with search(arm) is run in two phases: every recipe arm's grid on the search seed (recipe_arm: an
    arm, or the arm that chooses the recipe of several), then, per arm, the setting and checkpoint with the
    best validation score (`selection`) on its recipe arm rerun with fresh seeds; the rows returned are those
    of the fresh-seed runs (and their bases), each with its selected `recipe`.

    `group`: "on" trains runs that share shapes as one vmapped program (jaxrl.group), "off" one at a time,
    "auto" groups where that is faster (jaxrl.group.grouping); the results are the same either way (each
    member is a run of its own)."""
    if group not in group_lib.MODES:
        raise config_lib.ConfigError(f"--group {group!r}: expected one of {', '.join(group_lib.MODES)}")
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
    log("search: every arm's recipe grid on the search seed")
    _run_all(expand(module, workdir, overrides), workdir, log, poll_s, group)
    points, chosen = final_points(module, workdir, overrides)
    (workdir / "selected.json").write_text(json.dumps(chosen, indent=2) + "\n")
    log("selected recipes (validation) rerun with fresh seeds")
    runs = evaluated(_run_all(expand(module, workdir, overrides, points), workdir, log, poll_s, group))
    rows = collect(runs, workdir, evaluation)
    for row in rows:
        run = next(r for r in runs if r.id == row["run"])
        for key in chosen:
            arm = json.loads(key)
            if all(run.point.get(k) == v for k, v in arm.items()):
                row["recipe"] = _recipe_label(chosen[key]["recipe"])
                for k in chosen[key]["recipe"]:
                    row.pop(k, None)  # the arm is one row whatever was selected; the recipe column says what
                break
    return rows


def _finished(run_dir: Path) -> bool:
    from jaxrl import workdir as workdir_lib

    summary = workdir_lib.finished_summary(run_dir)
    return summary is not None and summary.get("status", "finished") == "finished"


def _recipe_label(recipe: dict) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(recipe.items()))


def _run_all(runs: list[Run], workdir: Path, log, poll_s: float, group: str = "auto") -> list[Run]:
    """Trains every unfinished run of `runs` (see run_sweep); returns `runs`. When grouping (see run_sweep),
    runs whose programs share shapes and whose dependencies are finished train together as one vmapped
    program (jaxrl.group); otherwise one run at a time."""
    from tqdm import tqdm

    from jaxrl import train
    from jaxrl import workdir as workdir_lib

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
            bar.set_postfix_str(r.id[:60])
            start = time.perf_counter()
            key = group_lib.group_key(r.cfg) if group_lib.grouping(group) else None
            mates = [
                o
                for o in todo
                if o is not r
                and key is not None
                and group_lib.group_key(o.cfg) == key
                and all(status(by_id[d]) == "finished" for d in o.deps)
            ]
            if mates:
                members = [r, *mates]
                results = group_lib.run_group(
                    [config_lib.override(m.cfg, {"train.progress": False}) for m in members],
                    [workdir / "runs" / m.id for m in members],
                    log=quiet,
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
            try:
                train.run(
                    config_lib.override(r.cfg, {"train.progress": False}), workdir / "runs" / r.id, log=quiet
                )
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


def base_labels(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """For shared base runs (which have no overrides of their own), the settings that tell them apart: the
    config keys whose values differ between base runs of one stage (seed and paths aside)."""
    bases = [r for r in runs if r.kind == "base"]
    flat = {r.id: config_lib.flat_dict(r.cfg) for r in bases}
    labels: dict[str, dict[str, Any]] = {r.id: {} for r in bases}
    for stage in {r.cfg.stage for r in bases}:
        group = [r.id for r in bases if r.cfg.stage == stage]
        keys = {k for rid in group for k in flat[rid]}
        for key in sorted(keys - {"seed", "train.init_from", "train.cache_dir"}):
            if len({json.dumps(flat[rid].get(key), sort_keys=True) for rid in group}) > 1:
                for rid in group:
                    labels[rid][key] = flat[rid].get(key)
    return labels


def collect(runs: list[Run], workdir: Path, evaluation=None) -> list[dict]:
    """One row per finished run: its overrides (for a shared base, what tells it apart from the other bases),
    base/point kind, train/eval metrics, and the benchmark scores of the study's `evaluation` (an
    `jaxrl.eval.jobs.EvalSpec`: harness/<task> columns)."""
    from jaxrl import workdir as workdir_lib
    from jaxrl.eval import jobs as eval_jobs

    rows = []
    labels = base_labels(runs)
    summaries = {r.id: workdir_lib.finished_summary(workdir / "runs" / r.id) for r in runs}
    failed = {rid for rid, s in summaries.items() if s is not None and s.get("status") == "failed"}
    for r in runs:
        summary = summaries[r.id]
        if summary is None and any(d in failed for d in r.deps):
            failed.add(r.id)  # in dependency order, so a failure propagates down the chain
            summary = {"status": "not run", "reason": "a run it depends on failed"}
        if summary is None:
            continue
        row = {"run": r.id, "kind": r.kind, "stage": r.cfg.stage, **labels.get(r.id, {}), **r.point}
        if r.kind == "base":
            row["seed"] = r.cfg.seed
        row["status"] = summary.get("status", "finished")
        row["skipped_steps"] = summary.get("skipped_steps", 0)
        if row["status"] != "finished":
            row["reason"] = summary.get("reason", "")
        row |= {f"train/{k}": v for k, v in summary.get("train", {}).items()}
        row |= {f"eval/{k}": v for k, v in summary.get("eval", {}).items()}
        row |= {f"val/{k}": v for k, v in summary.get("val", {}).items()}
        row |= _against_base(r, summary, runs, summaries)
        if evaluation is not None and evaluation.evaluates(r.cfg.stage):
            row |= eval_jobs.scores(workdir / "runs" / r.id, evaluation)
        rows.append(row)
    return rows


def _against_base(r: Run, summary: dict, runs: list[Run], summaries: dict) -> dict:
    """The paired gold difference of a policy run against its own SFT base (same seed, same prompts and
    sampling keys), prompt by prompt: eval/gold_reward_delta and its standard error."""
    from jaxrl.evaluate import paired_difference

    stages = {x.id: x.cfg.stage for x in runs}
    bases = [d for d in r.deps if stages.get(d) == "sft"]
    base = summaries.get(bases[0]) if bases else None
    mine = summary.get("eval_per_prompt")
    if not base or not mine or not base.get("eval_per_prompt"):
        return {}
    try:
        delta, se = paired_difference(mine, base["eval_per_prompt"])
    except ValueError:
        return {}  # scored on other prompts: no pairing
    return {"eval/gold_reward_delta": delta, "eval/gold_reward_delta_se": se}


# Two-sided 95% quantiles of Student's t by degrees of freedom (normal beyond the table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float], standard_errors: list[float]) -> float | None:
    """Half-width of a 95% interval for the mean of an arm: over seeds (Student's t) when there are several,
    over prompts and samples (the run's own standard error) when there is one seed."""
    if len(values) > 1:
        return _T95.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / np.sqrt(len(values))
    if len(standard_errors) == 1:
        return 1.96 * standard_errors[0]
    return None


def aggregate(rows: list[dict], metrics: list[str], group_keys: list[str]) -> list[dict]:
    """Mean, spread (sample std) and count over seeds for each group of runs with the same other overrides."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k, "")) for k in group_keys), []).append(row)
    out = []
    for key, members in groups.items():
        agg = dict(zip(group_keys, key, strict=True))
        agg["seeds"] = len(members)
        agg["skipped"] = sum(int(r.get("skipped_steps") or 0) for r in members)
        agg["failed"] = sum(r.get("status", "finished") != "finished" for r in members)
        for m in metrics:
            values = [
                r[m]
                for r in members
                if r.get("status", "finished") == "finished" and isinstance(r.get(m), (int, float))
            ]
            agg[m] = float(np.mean(values)) if values else None
            agg[f"{m} std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            errors = [
                r[f"{m}_se"]
                for r in members
                if r.get("status", "finished") == "finished" and isinstance(r.get(f"{m}_se"), (int, float))
            ]
            if errors:  # the metric has its own standard error: 95% intervals, over seeds and per seed
                agg[f"{m} ci95"] = interval(values, errors)
                agg[f"{m} seed_ci95"] = 1.96 * max(errors)
        out.append(agg)
    return out


RUN_FACTS = ("status", "skipped_steps", "reason")  # per-run facts of a row, not settings that define an arm


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_results(rows: list[dict], metrics: list[str], workdir: Path) -> tuple[Path, Path, str]:
    """results.md and results.csv (mean ± std over seeds per arm); returns their paths and the Markdown."""
    point_keys = sorted(
        {k for r in rows for k in r if "/" not in k and k not in ("run", "kind", "stage", "seed") + RUN_FACTS}
    )
    group_keys = ["stage"] + point_keys
    table = aggregate(rows, metrics, group_keys)
    table.sort(key=lambda r: tuple(str(r.get(k, "")) for k in group_keys))
    # Skipped updates and failed runs are shown whenever any arm has them: a degenerate arm never passes for
    # an ordinary row.
    facts = [k for k in ("skipped", "failed") if any(r[k] for r in table)]
    header = group_keys + ["seeds"] + facts + metrics
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cells = [_fmt(r.get(k)) for k in group_keys + ["seeds"]]
        cells += [
            ("FAILED " if k == "failed" else "") + f"{r[k]} of {r['seeds']}" if r[k] else "" for k in facts
        ]
        for m in metrics:
            mean, std, ci = r.get(m), r.get(f"{m} std"), r.get(f"{m} ci95")
            spread = ci if ci is not None else std
            cells.append(
                ""
                if mean is None
                else (f"{mean:.3f} ± {spread:.3f}" if spread is not None else f"{mean:.3f}")
            )
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    md_path, csv_path = workdir / "results.md", workdir / "results.csv"
    md_path.write_text(markdown)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(
            f,
            fieldnames=group_keys
            + ["seeds", "skipped", "failed"]
            + [x for m in metrics for x in (m, f"{m} std", f"{m} ci95", f"{m} seed_ci95")],
        )
        writer.writeheader()
        for r in table:
            writer.writerow({k: r.get(k) for k in writer.fieldnames})
    return md_path, csv_path, markdown


def _arm_label(row: dict) -> str:
    keys = [k for k in row if "/" not in k and k not in ("run", "kind", "seed") + RUN_FACTS]
    return " ".join(f"{row[k]}" for k in keys if row[k] not in ("", None))


def _algorithm(row: dict) -> str:
    """The algorithm of a row, for colours: the stage, with the loss for the DPO family and the reward source
    for online stages rewarded by a verifiable reward alone."""
    stage = row.get("stage", "")
    if stage == "dpo" and row.get("loss.name"):
        return f"dpo:{row['loss.name']}"
    if row.get("rl.verifiable") and not row.get("rl.reward_model"):
        return f"{stage} ({row['rl.verifiable']} reward)"
    return stage


def write_plots(rows: list[dict], workdir: Path) -> list[Path]:
    """Two PNGs: test gold reward per arm (bars: mean over seeds with its 95% interval; dots: each domain),
    arms sorted by gold reward; and validation curves of gold reward against KL to the reference over
    training, one line per arm, with the best-of-N frontier of the SFT base (as in Gao et al., 2022)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policy_rows = [r for r in rows if "eval/gold_reward" in r]
    if not policy_rows:
        return []
    domains = sorted({k.split("/")[-1] for r in policy_rows for k in r if k.startswith("eval/gold_reward/")})
    arms: dict[str, list[dict]] = {}
    for r in policy_rows:
        arms.setdefault(_arm_label(r), []).append(r)

    def mean(arm: str, key: str) -> float:
        values = [r[key] for r in arms[arm] if isinstance(r.get(key), (int, float))]
        return float(np.mean(values)) if values else float("nan")

    labels = sorted(arms, key=lambda a: mean(a, "eval/gold_reward"))
    paths = []

    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.28 * len(labels) + 1.2)))
    y = np.arange(len(labels))
    spread = [
        interval(
            [r["eval/gold_reward"] for r in arms[a]],
            [r["eval/gold_reward_se"] for r in arms[a] if "eval/gold_reward_se" in r],
        )
        or 0.0
        for a in labels
    ]
    ax.barh(y, [mean(a, "eval/gold_reward") for a in labels], xerr=spread, color="0.8", label="all domains")
    markers = "os^Dv<>p"
    for i, d in enumerate(domains):
        ax.scatter(
            [mean(a, f"eval/gold_reward/{d}") for a in labels],
            y,
            s=14,
            marker=markers[i % len(markers)],
            label=d,
            zorder=3,
        )
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("gold reward (sampled, test prompts); bar: mean over seeds with its 95% interval")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths.append(workdir / "gold_reward_by_domain.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    paths.append(_curves_plot(plt, arms, labels, workdir))
    plt.close("all")
    return paths


def validation_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, KL, gold) of a run's validation evaluations over training, from its metrics.jsonl."""
    from jaxrl.metrics import read_metrics

    return [
        (int(r["step"]), float(r["val/kl"]), float(r["val/gold_reward"]))
        for r in read_metrics(run_dir)
        if isinstance(r.get("val/kl"), (int, float)) and isinstance(r.get("val/gold_reward"), (int, float))
    ]


def _curves_plot(plt, arms: dict[str, list[dict]], labels: list[str], workdir: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    algorithms = sorted({_algorithm(arms[a][0]) for a in labels})
    colours = plt.get_cmap("tab10" if len(algorithms) <= 10 else "tab20")
    bases = [
        arms[a][0] for a in labels if arms[a][0].get("kind") == "base" and arms[a][0].get("stage") == "sft"
    ]
    start = (
        [(0, 0.0, bases[0]["val/gold_reward"])]
        if bases and isinstance(bases[0].get("val/gold_reward"), float)
        else []
    )
    for arm in labels:
        first = arms[arm][0]
        if first.get("kind") == "base":
            continue
        curve = validation_curve(workdir / "runs" / first["run"])  # the arm's first seed
        if curve:
            curve = start + curve  # every arm starts at its SFT base (the first base: seeds share a grid)
            ax.plot(
                [kl for _, kl, _ in curve],
                [g for _, _, g in curve],
                "-o",
                markersize=2.5,
                linewidth=1,
                color=colours(algorithms.index(_algorithm(first))),
                alpha=0.8,
            )
            ax.annotate(arm, (curve[-1][1], curve[-1][2]), fontsize=5, alpha=0.8)
    for alg in algorithms:
        if alg != "sft":
            ax.plot([], [], color=colours(algorithms.index(alg)), label=alg)
    for base in bases[:1]:
        frontier = []
        for prefix in ("val/", "eval/"):  # the validation split's frontier, else the test split's
            frontier = frontier or sorted(
                (base[f"{k}_kl_bound"], base[k])
                for k in base
                if re.fullmatch(rf"{prefix}best_of_\d+", k) and f"{k}_kl_bound" in base
            )
        if frontier:
            ax.plot(
                [kl for kl, _ in frontier],
                [g for _, g in frontier],
                "k--",
                linewidth=1.2,
                label="best-of-N on gold from the SFT base",
            )
        if isinstance(base.get("val/gold_reward"), float):
            ax.scatter([0.0], [base["val/gold_reward"]], color="black", zorder=4, s=18, label="SFT base")
    ax.set_xlabel("KL(policy || SFT base), nats per response (validation samples)")
    ax.set_ylabel("gold reward of sampled responses (validation prompts)")
    ax.set_title("validation curves over training, one line per arm (first seed)", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = workdir / "gold_reward_vs_kl.png"
    fig.savefig(path, dpi=120)
    return path


def compare(rows: list[dict], a: dict, b: dict, metric: str = "eval/gold_reward") -> dict | None:
    """The difference a - b of a metric between two arms (rows whose settings include `a`, resp. `b`), with a
    95% interval: paired by seed over the seeds both arms ran (Student's t) when there are several, else from
    the two runs' own standard errors. None when either arm has no finished run."""

    def pick(match: dict) -> dict[int, dict]:
        return {
            int(r.get("seed", 0)): r
            for r in rows
            if r.get("status", "finished") == "finished"
            and isinstance(r.get(metric), (int, float))
            and all(r.get(k) == v for k, v in match.items())
        }

    runs_a, runs_b = pick(a), pick(b)
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    diffs = [runs_a[s][metric] - runs_b[s][metric] for s in seeds]
    if len(seeds) > 1:
        hw = interval(diffs, [])
    else:
        errors = [runs[seeds[0]].get(f"{metric}_se") for runs in (runs_a, runs_b)]
        hw = 1.96 * float(np.hypot(*errors)) if all(isinstance(e, (int, float)) for e in errors) else None
    return {"difference": float(np.mean(diffs)), "ci95": hw, "seeds": len(seeds)}


def verdict(result: dict | None, expected_sign: int = 1) -> str:
    """ "agrees" when the 95% interval excludes zero on the expected side, "disagrees" on the other side, else
    "cannot tell" (also without a measurement)."""
    if result is None or result["ci95"] is None:
        return "cannot tell"
    low, high = result["difference"] - result["ci95"], result["difference"] + result["ci95"]
    if low > 0 or high < 0:
        return "agrees" if (low > 0) == (expected_sign > 0) else "disagrees"
    return "cannot tell"


def write_findings(findings: list[dict], workdir: Path) -> str:
    """findings.md: one row per claim (the paper's claim, what was measured with its interval, a verdict)."""
    lines = [
        "| claim (Ivison et al., 2024) | measured | 95% interval | seeds | verdict |",
        "|---|---|---|---|---|",
    ]
    for f in findings:
        r = f.get("result")
        measured = "" if r is None else f"{r['difference']:+.3f}"
        ci = "" if r is None or r["ci95"] is None else f"± {r['ci95']:.3f}"
        lines.append(
            f"| {f['claim']} | {f.get('what', '')} {measured} | {ci} | {'' if r is None else r['seeds']} "
            f"| {f['verdict']} |"
        )
    markdown = "\n".join(lines) + "\n"
    (workdir / "findings.md").write_text(markdown)
    return markdown
