"""A study's evaluation() settings: checked when read, the same job whether the sweep runs it or a launcher
runs `jaxrl eval`, and its scores read back as table columns."""

import json
import types

import pytest

from jaxrl import cli
from jaxrl.config import ConfigError
from jaxrl.eval import jobs


def study(settings):
    return types.SimpleNamespace(evaluation=lambda: settings)


def test_a_study_without_evaluation_has_no_spec():
    assert jobs.spec(types.SimpleNamespace()) is None
    assert jobs.spec(study(None)) is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tasks": ["mmlu"], "limt": 10}, "unknown key.*limt"),
        ({"tasks": []}, "at least one task"),
        ({"limit": 3}, "at least one task"),
        ({"tasks": ["mmlu"], "include_path": "/tasks"}, "must be a list"),
        (["mmlu"], "expected a dict"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        jobs.spec(study(settings))


def test_which_stages_are_evaluated():
    default = jobs.spec(study({"tasks": "mmlu, gsm8k"}))
    assert default.tasks == ("mmlu", "gsm8k")
    assert default.evaluates("dpo") and default.evaluates("ppo") and default.evaluates("sft")
    assert not default.evaluates("rm")
    only = jobs.spec(study({"tasks": ["mmlu"], "stages": ["ppo"]}))
    assert only.evaluates("ppo") and not only.evaluates("dpo")


def test_the_launched_command_runs_the_job_the_sweep_runs(monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    from jaxrl.eval import harness

    spec = jobs.spec(
        study(
            {
                "tasks": ["tiny_mc", "tiny_gen"],
                "limit": 5,
                "num_fewshot": 0,
                "include_path": ["/a", "/b"],
                "batch_size": 8,
                "model_args": {"dtype": "float32", "bucket": 8},
                "apply_chat_template": False,
                "judge": "/rm",
                "alpaca_file": "/alpaca.json",
            }
        )
    )
    seen = {}
    monkeypatch.setattr(
        harness, "evaluate", lambda model, tasks, out, **kw: seen.update(kw, a=(model, tasks, out))
    )
    assert cli.main(list(spec.cli_args("/runs/x", "/runs/x/harness"))) == 0
    assert seen.pop("a") == ("/runs/x", ["tiny_mc", "tiny_gen"], "/runs/x/harness")
    expected = spec.harness_kwargs()
    assert {k: seen[k] for k in expected} == expected


def test_scores_are_each_tasks_headline_metric_with_its_standard_error(tmp_path):
    spec = jobs.spec(study({"tasks": ["tulu25", "tiny_mc"]}))
    tasks = jobs.out_dir(tmp_path) / "tasks"
    tasks.mkdir(parents=True)
    # mmlu (a group) reports acc; gsm8k_cot's suite metric is flexible-extract exact match, not the first key.
    (tasks / "mmlu.json").write_text(
        json.dumps({"groups": {"mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.01, "alias": "mmlu"}}})
    )
    gsm = {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.3}
    gsm |= {"exact_match_stderr,flexible-extract": 0.02}
    (tasks / "gsm8k_cot.json").write_text(json.dumps({"results": {"gsm8k_cot": gsm}}))
    (tasks / "tiny_mc.json").write_text(json.dumps({"results": {"tiny_mc": {"acc,none": 0.25}}}))
    assert jobs.scores(tmp_path, spec) == {
        "harness/gsm8k_cot": 0.3,
        "harness/gsm8k_cot_se": 0.02,
        "harness/mmlu": 0.5,
        "harness/mmlu_se": 0.01,
        "harness/tiny_mc": 0.25,
    }
    assert not jobs.finished(tmp_path, spec)  # the suite's other tasks are not done
    assert jobs.finished(tmp_path, jobs.spec(study({"tasks": ["mmlu", "tiny_mc"]})))
