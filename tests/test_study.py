"""The study's measurement: sampled gold with standard errors, best-of-N ceilings, paired differences,
intervals in the table, and recipes selected on validation only."""

import itertools
import json
import math

import numpy as np
import pytest

from jaxrl import evaluate, sweep
from jaxrl import results as results_lib
from jaxrl import search as search_lib
from jaxrl import study as study_lib
from jaxrl.config import ConfigError


def test_domain_mean_weights_domains_equally_and_its_standard_error():
    values = np.array([1.0, 0.0, 0.5, 0.5, 0.5, 0.25])
    domains = ["a", "a", "b", "b", "b", "b"]
    mean, se = evaluate.domain_mean(values, domains)
    assert mean == pytest.approx((0.5 + 0.4375) / 2)
    var_a, var_b = np.var([1.0, 0.0], ddof=1), np.var([0.5, 0.5, 0.5, 0.25], ddof=1)
    assert se == pytest.approx(math.sqrt(var_a / 2 + var_b / 4) / 2)


def test_expected_best_of_matches_brute_force_over_subsets():
    rng = np.random.default_rng(0)
    gold = rng.random((3, 6)).round(2)
    for n in (1, 2, 4, 6):
        brute = [np.mean([max(row[list(c)]) for c in itertools.combinations(range(6), n)]) for row in gold]
        np.testing.assert_allclose(evaluate.expected_best_of(gold, n), brute)
    np.testing.assert_allclose(evaluate.expected_best_of(gold, 1), gold.mean(axis=1))


def test_summarize_reports_best_of_n_with_its_kl_bound_and_only_up_to_the_samples():
    gold = np.array([[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    scores = {
        "gold": gold,
        "kl": np.zeros_like(gold),
        "length": np.ones_like(gold),
        "eos": np.ones_like(gold),
    }
    metrics = evaluate.summarize(scores, ["a", "b"], best_of=(1, 4, 16))
    assert metrics["best_of_4"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["best_of_4_kl_bound"] == pytest.approx(math.log(4) - 3 / 4)
    assert "best_of_16" not in metrics
    assert metrics["gold_reward"] == pytest.approx((0.25 + 0.5) / 2)


def test_paired_difference_cancels_what_two_runs_share():
    base = {"domain": ["a"] * 4 + ["b"] * 4, "gold": [0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]}
    arm = {"domain": base["domain"], "gold": [g + 0.05 for g in base["gold"]]}
    delta, se = evaluate.paired_difference(arm, base)
    assert delta == pytest.approx(0.05) and se == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        evaluate.paired_difference({"domain": ["a"], "gold": [0.0]}, base)


def test_intervals_over_seeds_and_over_prompts():
    assert results_lib.interval([0.5], [0.01]) == pytest.approx(0.0196)
    values = [0.5, 0.6, 0.7]
    assert results_lib.interval(values, [0.01] * 3) == pytest.approx(
        4.303 * np.std(values, ddof=1) / math.sqrt(3)
    )
    rows = [
        {"stage": "dpo", "seed": s, "status": "finished", "eval/gold_reward": v, "eval/gold_reward_se": 0.01}
        for s, v in enumerate(values)
    ]
    table = results_lib.aggregate(rows, ["eval/gold_reward"], ["stage"])
    assert table[0]["eval/gold_reward ci95"] == pytest.approx(results_lib.interval(values, []))
    assert table[0]["eval/gold_reward seed_ci95"] == pytest.approx(0.0196)


def write_scores(run_dir, rows):
    """A fake run's metrics.jsonl holding `rows`."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def write_curve(run_dir, val, test):
    """A fake run's metrics.jsonl: validation and test scores at steps 10, 20, 30."""
    rows = [
        {"step": 10 * (i + 1), "val/gold_reward": v, "eval/gold_reward": t}
        for i, (v, t) in enumerate(zip(val, test, strict=True))
    ]
    return write_scores(run_dir, rows)


def load_study(tmp_path, text: str):
    """A study module written from `text` and loaded as `jaxrl sweep` loads one."""
    from jaxrl import config as config_lib

    path = tmp_path / "study.py"
    path.write_text(text)
    return config_lib.load_experiment(path)


def test_selection_reads_validation_only_and_picks_setting_and_checkpoint(tmp_path):
    # Test scores rank the recipes the other way round: a selection that looked at them would pick "b".
    a = write_curve(tmp_path / "a", val=[0.40, 0.55, 0.50], test=[0.10, 0.10, 0.10])
    b = write_curve(tmp_path / "b", val=[0.30, 0.35, 0.45], test=[0.90, 0.95, 0.99])
    setting, step, score = search_lib.select_recipe(
        [({"loss.beta": 1.0}, a), ({"loss.beta": 0.1}, b)], "val/gold_reward"
    )
    assert (setting, step, score) == ({"loss.beta": 1.0}, 20, 0.55)
    assert search_lib.validation_scores(b, "eval/gold_reward") == []  # test rows are invisible to selection


def test_selection_refuses_a_test_metric():
    class Study:
        @staticmethod
        def selection():
            return {"metric": "eval/gold_reward"}

    with pytest.raises(ConfigError, match="validation split only"):
        study_lib.selection(Study)


SEARCH_STUDY = """
from jaxrl.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, override

def get_config():
    return Config(stage="dpo",
                  model=ModelConfig(vocab_size=256, hidden=32, layers=1, heads=2, kv_heads=1, mlp=64,
                                    dtype="float32"),
                  optim=OptimConfig(lr=1e-3),
                  data=DataConfig(num_train=64, num_eval=16, max_len=48, max_prompt_len=24,
                                  eval_prompts_per_domain=4, val_prompts_per_domain=4, eval_samples=2,
                                  eval_max_new=4, eval_best_of=4),
                  train=TrainConfig(steps=4, batch_size=8, log_every=1, eval_every=2, checkpoint_every=2,
                                    tensorboard=False, progress=False))

def sft_config(cfg):
    return override(cfg, {"stage": "sft", "train.steps": 4, "loss.beta": 0.1, "optim.lr": 1e-3})

def sweep():
    return [{"loss.name": "dpo"}]

def search(arm):
    return [{"loss.beta": 0.1}, {"loss.beta": 1.0}]

def selection():
    return {"search_seed": 0, "seeds": [1], "metric": "val/gold_reward"}

def metrics():
    return ["eval/gold_reward", "eval/gold_reward_delta", "eval/kl"]
"""


@pytest.mark.slow
def test_a_search_study_selects_on_validation_and_reruns_with_fresh_seeds(tmp_path):
    from jaxrl import config as config_lib
    from jaxrl.metrics import read_metrics

    path = tmp_path / "search_study.py"
    path.write_text(SEARCH_STUDY)
    study = config_lib.load_experiment(path)
    workdir = tmp_path / "w"
    rows = sweep.run_sweep(study, workdir, log=lambda *a: None)
    chosen = json.loads((workdir / "selected.json").read_text())
    (recipe,) = [c["recipe"] for c in chosen.values()]
    assert recipe["loss.beta"] in (0.1, 1.0)
    # The selection is the argmax of the search runs' validation curves.
    scores = {}
    for beta in (0.1, 1.0):
        run_dir = (
            workdir
            / "runs"
            / study_lib.run_id(
                config_lib.Config(stage="dpo"), {"loss.name": "dpo", "loss.beta": beta, "seed": 0}
            )
        )
        scores[beta] = max(r["val/gold_reward"] for r in read_metrics(run_dir) if "val/gold_reward" in r)
    assert scores[recipe["loss.beta"]] == max(scores.values())
    (arm,) = [r for r in rows if r["kind"] == "point"]
    assert arm["seed"] == 1 and arm["recipe"].startswith("beta=")
    assert "eval/gold_reward_delta" in arm and "eval/gold_reward_se" in arm
    (base,) = [r for r in rows if r["kind"] == "base"]
    assert base["seed"] == 1 and "eval/best_of_4" in base and "val/best_of_4" in base
    _, _, markdown = results_lib.write_results(rows, study.metrics(), workdir)
    assert "recipe" in markdown.splitlines()[0] and " ± " in markdown
    assert len(results_lib.write_plots(rows, workdir)) == 2


RECIPE_ARM_STUDY = SEARCH_STUDY.replace(
    """def sweep():
    return [{"loss.name": "dpo"}]""",
    """def sweep():
    return [{"data.synthetic_kind": kind} for kind in ("clean", "noisy", "length_biased")]

def recipe_arm(arm):
    return {**arm, "data.synthetic_kind": "clean"}""",
)


def test_arms_of_one_algorithm_share_the_recipe_their_recipe_arm_selects(tmp_path):
    study = load_study(tmp_path, RECIPE_ARM_STUDY)
    workdir = tmp_path / "w"
    # Only the recipe arm (clean) is searched: two settings, not six.
    points = study_lib.search_points(study)
    assert points == [{"data.synthetic_kind": "clean", "loss.beta": beta, "seed": 0} for beta in (0.1, 1.0)]
    runs = {r.point["loss.beta"]: r for r in study_lib.expand(study, workdir) if r.kind == "point"}
    # beta 1.0 is best on validation at step 20 (its test score is the worst: selection must not see it).
    write_curve(workdir / "runs" / runs[0.1].id, val=[0.30, 0.35, 0.45], test=[0.9, 0.9, 0.9])
    write_curve(workdir / "runs" / runs[1.0].id, val=[0.40, 0.55, 0.50], test=[0.1, 0.1, 0.1])
    final, chosen = search_lib.final_points(study, workdir)
    assert final == [
        {"data.synthetic_kind": kind, "loss.beta": 1.0, "train.steps": 20, "seed": 1}
        for kind in ("clean", "noisy", "length_biased")
    ]
    noisy = chosen[json.dumps({"data.synthetic_kind": "noisy"}, sort_keys=True)]
    assert noisy["selected_on"] == {"data.synthetic_kind": "clean"} and noisy["validation"] == 0.55
    assert "selected_on" not in chosen[json.dumps({"data.synthetic_kind": "clean"}, sort_keys=True)]


def test_a_recipe_arm_without_a_grid_is_refused():
    class Study:
        @staticmethod
        def sweep():
            return [{"loss.name": "dpo"}]

        @staticmethod
        def search(arm):
            return None if arm.get("loss.name") == "ipo" else [{"loss.beta": 0.1}]

        @staticmethod
        def recipe_arm(arm):
            return {"loss.name": "ipo"}

    with pytest.raises(ConfigError, match="has no search grid"):
        study_lib.search_points(Study)


def test_compare_pairs_arms_by_seed_and_verdicts_follow_the_interval():
    rows = []
    for seed, (a, b) in enumerate([(0.60, 0.50), (0.62, 0.51), (0.61, 0.49)]):
        rows.append({"stage": "ppo", "seed": seed, "eval/gold_reward": a})
        rows.append({"stage": "dpo", "seed": seed, "eval/gold_reward": b})
    result = results_lib.compare(rows, {"stage": "ppo"}, {"stage": "dpo"})
    diffs = [0.10, 0.11, 0.12]
    assert result["difference"] == pytest.approx(0.11) and result["seeds"] == 3
    assert result["ci95"] == pytest.approx(results_lib.interval(diffs, []))
    assert (
        results_lib.verdict(result) == "agrees"
        and results_lib.verdict(result, expected_sign=-1) == "disagrees"
    )
    one_seed = [
        {"stage": "ppo", "seed": 0, "eval/gold_reward": 0.52, "eval/gold_reward_se": 0.02},
        {"stage": "dpo", "seed": 0, "eval/gold_reward": 0.50, "eval/gold_reward_se": 0.02},
    ]
    result = results_lib.compare(one_seed, {"stage": "ppo"}, {"stage": "dpo"})
    assert result["ci95"] == pytest.approx(1.96 * math.hypot(0.02, 0.02))
    assert results_lib.verdict(result) == "cannot tell"
    assert results_lib.compare(one_seed, {"stage": "grpo"}, {"stage": "dpo"}) is None
    assert results_lib.verdict(None) == "cannot tell"


RM_SEARCH_STUDY = SEARCH_STUDY.replace(
    """def sweep():
    return [{"loss.name": "dpo"}]

def search(arm):
    return [{"loss.beta": 0.1}, {"loss.beta": 1.0}]

def selection():
    return {"search_seed": 0, "seeds": [1], "metric": "val/gold_reward"}""",
    """def sweep():
    return [{"stage": "ppo", "rl.reward_model": data} for data in ("clean", "noisy")]

def reward_model(point):
    data = point.get("rl.reward_model")
    return {"stage": "rm", "data.synthetic_kind": data, "seed": point.get("seed", 0)} if data else None

def search(arm):
    if "seed" in arm:
        return None
    if arm["stage"] == "rm":
        return [{"optim.lr": 1e-4}, {"optim.lr": 1e-3}]
    return [{"rl.kl_coef": 0.05}, {"rl.kl_coef": 0.1}]

def recipe_arm(arm):
    key = "data.synthetic_kind" if arm["stage"] == "rm" else "rl.reward_model"
    return {**arm, key: "clean"}

def selection():
    return {"search_seed": 0, "seeds": [1], "metric": "val/gold_reward",
            "metrics": {"rm": "val/proxy_best_of_4"}}""",
)


def test_reward_model_recipes_are_searched_first_on_their_own_metric_and_reward_every_rl_run(tmp_path):
    study = load_study(tmp_path, RM_SEARCH_STUDY)
    workdir = tmp_path / "w"
    rm_arms = study_lib.reward_model_arms(study)
    assert rm_arms == [{"stage": "rm", "data.synthetic_kind": d} for d in ("clean", "noisy")]
    # Only the recipe arm (the clean reward model) is searched.
    grid = study_lib.expand(study, workdir, (), study_lib.grid_points(study, rm_arms))
    rms = {r.point["optim.lr"]: r for r in grid if r.kind == "point"}
    assert sorted(rms) == [1e-4, 1e-3] and all(
        r.point["data.synthetic_kind"] == "clean" for r in rms.values()
    )
    # lr 1e-3 is best by the reward models' metric; by the policies' metric (and on test) 1e-4 would be.
    write_scores(
        workdir / "runs" / rms[1e-3].id,
        [{"step": 4, "val/proxy_best_of_4": 0.6, "val/gold_reward": 0.1, "eval/proxy_best_of_4": 0.1}],
    )
    write_scores(
        workdir / "runs" / rms[1e-4].id,
        [{"step": 4, "val/proxy_best_of_4": 0.5, "val/gold_reward": 0.9, "eval/proxy_best_of_4": 0.9}],
    )
    rm_recipes = search_lib.reward_model_recipes(study, workdir)
    clean, noisy = (rm_recipes[json.dumps(a, sort_keys=True)] for a in rm_arms)
    assert clean == {"recipe": {"optim.lr": 1e-3}, "validation": 0.6, "metric": "val/proxy_best_of_4"}
    assert noisy["recipe"] == {"optim.lr": 1e-3} and noisy["selected_on"] == rm_arms[0]

    # The policy search is rewarded by the selected reward model: the very run of its grid.
    search = study_lib.expand(study, workdir, rm_recipes=rm_recipes)
    ppo = {r.point["rl.kl_coef"]: r for r in search if r.cfg.stage == "ppo"}
    assert {r.cfg.rl.reward_model for r in ppo.values()} == {str(workdir.absolute() / "runs" / rms[1e-3].id)}
    write_scores(workdir / "runs" / ppo[0.1].id, [{"step": 4, "val/gold_reward": 0.7}])
    write_scores(workdir / "runs" / ppo[0.05].id, [{"step": 4, "val/gold_reward": 0.2}])
    points, chosen = search_lib.final_points(study, workdir, (), rm_recipes)
    assert points == [
        {"stage": "ppo", "rl.reward_model": d, "rl.kl_coef": 0.1, "seed": 1} for d in ("clean", "noisy")
    ]
    # Every fresh-seed reward model, the noisy one included, trains with the selected recipe.
    final = study_lib.expand(study, workdir, (), points, rm_recipes)
    final_rms = [r for r in final if r.cfg.stage == "rm"]
    assert [r.point["data.synthetic_kind"] for r in final_rms] == ["clean", "noisy"]
    assert all(r.cfg.optim.lr == 1e-3 and r.point["seed"] == 1 for r in final_rms)
    # Each row is labelled with its own arm's recipe (the reward models' too), and the recipe's columns go.
    rows = [{"run": r.id, **r.point} for r in final if r.kind == "point"]
    labelled = sweep.label_recipes(rows, final, rm_recipes | chosen)
    assert {(r["stage"], r["recipe"]) for r in labelled} == {("rm", "lr=0.001"), ("ppo", "kl_coef=0.1")}
    assert not any("optim.lr" in r or "rl.kl_coef" in r for r in labelled)
