"""Recipes chosen on validation: every recipe arm's grid on a search seed, the setting and checkpoint with the
best validation score (never a test one), and the fresh-seed points that rerun it on every arm it serves."""

from __future__ import annotations

import json
from pathlib import Path

from jaxrl import config as config_lib
from jaxrl.study import expand, recipe_arm, selection


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


def recipe_label(recipe: dict) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(recipe.items()))
