"""A study file's runs: its sweep() points expanded into runs (ids from their overrides, shared SFT bases by
content hash, reward-model runs shared between the RL points that use them), its full variant, and the check
that a run dir still holds its point's config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from jaxrl import config as config_lib
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


def expand(
    module, workdir: str | Path, overrides=(), points: list[dict] | None = None, rm_recipes=None
) -> list[Run]:
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

    `rm_recipes` ({reward-model arm as JSON: {"recipe": ...}}, jaxrl.search.reward_model_recipes): the
    selected recipes of searched reward models, applied to the reward-model points of RL points (without it a
    reward model runs as reward_model(point) gives it).
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
                rm_point |= (rm_recipes or {}).get(arm_key(rm_point), {}).get("recipe", {})
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
    settings = {"search_seed": 0, "seeds": [1, 2, 3], "metric": "val/gold_reward", "metrics": {}}
    settings |= dict(module.selection()) if hasattr(module, "selection") else {}
    for metric in (settings["metric"], *dict(settings["metrics"]).values()):
        if not str(metric).startswith("val/"):
            raise config_lib.ConfigError(
                f"selection metric {metric!r}: recipes are selected on the validation split only "
                "(a val/ metric)"
            )
    return settings


def metric_for(settings: dict, stage: str) -> str:
    """The validation metric that selects a stage's recipes: selection()'s "metrics" ({stage: metric}, e.g. a
    reward model's) or its "metric"."""
    return dict(settings["metrics"]).get(stage, settings["metric"])


def recipe_arm(module, arm: dict) -> dict:
    """The arm whose recipe search selects `arm`'s recipe: the study's recipe_arm(arm), or the arm itself."""
    chosen = dict(module.recipe_arm(dict(arm))) if hasattr(module, "recipe_arm") else dict(arm)
    if module.search(dict(chosen)) is None:
        raise config_lib.ConfigError(f"recipe_arm({arm}) is {chosen}, which has no search grid")
    return chosen


def search_points(module) -> list[dict]:
    """Every recipe arm (see recipe_arm) with every setting of its search grid, on the search seed, each once;
    an arm whose grid is None is a plain point, run as it is."""
    points, seen = [], set()
    for arm in module.sweep():
        searched = module.search(dict(arm)) is not None
        points += grid_points(module, [arm], seen) if searched else [dict(arm)]
    return points


def grid_points(module, arms: list[dict], seen: set | None = None) -> list[dict]:
    """The recipe arm of each of `arms` with every setting of its grid, on the search seed, each once (and
    none whose recipe arm is in `seen`, which is updated)."""
    seed = selection(module)["search_seed"]
    points, seen = [], set() if seen is None else seen
    for arm in arms:
        searched = recipe_arm(module, arm)
        key = json.dumps(searched, sort_keys=True)
        if key not in seen:
            seen.add(key)
            points += [{**searched, **setting, "seed": seed} for setting in module.search(dict(searched))]
    return points


def reward_model_arms(module) -> list[dict]:
    """The reward models whose recipes a search study searches: the reward model (reward_model(arm), without
    its seed) of each searched RL arm, where search() gives it a grid of its own; each once. They are searched
    before the policies (jaxrl.sweep.run_sweep), whose runs are rewarded by the selected recipes."""
    if not hasattr(module, "reward_model"):
        return []
    stage = module.get_config().stage
    arms, seen = [], set()
    for arm in module.sweep():
        if arm.get("stage", stage) not in config_lib.RL_STAGES or module.search(dict(arm)) is None:
            continue
        rm = module.reward_model(dict(arm))
        if rm is None or arm_key(rm) in seen:
            continue
        rm_arm = {k: v for k, v in rm.items() if k != "seed"}
        if module.search(dict(rm_arm)) is not None:
            seen.add(arm_key(rm))
            arms.append(rm_arm)
    return arms


def arm_key(point: dict) -> str:
    """The arm a point belongs to, as the JSON key of selections (the point without its seed)."""
    return json.dumps({k: v for k, v in point.items() if k != "seed"}, sort_keys=True)


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
