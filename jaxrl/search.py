"""Recipes chosen on validation: every recipe arm's grid on a search seed, the setting and checkpoint with the
best validation score (never a test one), and the fresh-seed points that rerun it on every arm it serves. The
reward models a study searches are chosen first (their selected recipes are the ones the policy search and the
fresh-seed runs are rewarded by)."""

from __future__ import annotations

import json
from pathlib import Path

from jaxrl import config as config_lib
from jaxrl.study import expand, grid_points, metric_for, recipe_arm, reward_model_arms, selection


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


def choose(module, workdir: Path, arms: list[dict], runs: list, settings: dict) -> dict[str, dict]:
    """What each arm's recipe arm selects, from the search runs `runs` (expand's, on the search seed):
    {arm as JSON: {"recipe", "validation"[, "selected_on"]}}, on the validation metric of the arm's stage
    (study.metric_for)."""
    by_point = {json.dumps(r.point, sort_keys=True): r for r in runs if r.kind == "point"}
    selected, chosen = {}, {}
    for arm in arms:
        searched = recipe_arm(module, arm)
        key = json.dumps(searched, sort_keys=True)
        if key not in selected:
            grid = []
            for setting in module.search(dict(searched)):
                point = {**searched, **setting, "seed": settings["search_seed"]}
                grid.append((setting, by_point[json.dumps(point, sort_keys=True)]))
            metric = metric_for(settings, grid[0][1].cfg.stage)
            setting, step, score = select_recipe([(s, workdir / "runs" / r.id) for s, r in grid], metric)
            run = next(r for s, r in grid if s is setting)
            recipe = dict(setting)
            if step != run.cfg.train.steps:
                recipe["train.steps"] = step  # the selected checkpoint: the rerun trains that long
            selected[key] = {"recipe": recipe, "validation": score}
            if metric != settings["metric"]:
                selected[key]["metric"] = metric
        entry = dict(selected[key])
        if searched != dict(arm):
            entry["selected_on"] = searched  # the validation score is the recipe arm's
        chosen[json.dumps(arm, sort_keys=True)] = entry
    return chosen


def reward_model_recipes(module, workdir: Path, overrides=()) -> dict[str, dict]:
    """The selected recipe of every reward model the study searches (study.reward_model_arms), from its
    grid's finished runs: {reward-model arm as JSON: {"recipe", "validation", ...}} (expand's rm_recipes)."""
    arms = reward_model_arms(module)
    if not arms:
        return {}
    runs = expand(module, workdir, overrides, grid_points(module, arms))
    return choose(module, workdir, arms, runs, selection(module))


def final_points(module, workdir: Path, overrides=(), rm_recipes=None) -> tuple[list[dict], dict[str, dict]]:
    """The selected recipe of every arm with the fresh seeds, and what was selected per arm (the table's).
    `rm_recipes`: the reward models' selected recipes (reward_model_recipes), which the search ran with."""
    settings = selection(module)
    arms = [dict(arm) for arm in module.sweep()]
    searched = [arm for arm in arms if module.search(dict(arm)) is not None]
    runs = expand(module, workdir, overrides, rm_recipes=rm_recipes)
    chosen = choose(module, workdir, searched, runs, settings)
    points = []
    for arm in arms:
        if module.search(dict(arm)) is None:
            points.append(arm)
            continue
        recipe = chosen[json.dumps(arm, sort_keys=True)]["recipe"]
        points += [{**arm, **recipe, "seed": seed} for seed in settings["seeds"]]
    return points, chosen


def recipe_label(recipe: dict) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(recipe.items()))
