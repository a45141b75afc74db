"""experiments/tulu25.py's metrics() names only metrics its runs produce: a tiny version of the real study
(its own configs and sweep points, shrunk to a tiny random Llama, local files in its data formats, a few
steps) runs through `jaxrl.sweep.run_sweep` as tests/test_study.py runs the synthetic study, and every name
metrics() lists is a column of a finished run's row of the stage that logs it."""

import json

import pytest

pytest.importorskip("transformers")

from tiny_hf import CORPUS, write_llama  # noqa: E402

from jaxrl import config as config_lib  # noqa: E402
from jaxrl import results as results_lib  # noqa: E402
from jaxrl import sweep  # noqa: E402

# The study's own points with sizes cut to seconds (every other setting, loss and RL recipe kept).
TINY = {
    "dpo": {"train.steps": 2},
    "rm": {"train.steps": 2, "train.batch_size": 8, "train.grad_accum": 1},
    "ppo": {
        "train.steps": 2,
        "train.batch_size": 8,
        "train.grad_accum": 1,
        "rl.rollout_batch": 8,
        "rl.minibatch": 8,
        "rl.max_new_tokens": 4,
        "rl.num_prompts": 16,
        "rl.eval_prompts": 4,
        "data.max_prompt_len": 64,
        "data.max_len": 72,
    },
}


def _turns(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def tiny_tulu25(tmp_path, monkeypatch):
    """The study module loaded with its data, prompt and checkpoint roots in tmp_path (files in the formats
    it reads: tulu25 preference pairs, prompt files, an HF checkpoint), shrunk to a tiny model."""
    data, prompts, ckpt = tmp_path / "data", tmp_path / "prompts", tmp_path / "ckpt"
    pairs = [
        {
            "chosen": _turns(CORPUS[i % 20], CORPUS[(i + 1) % 20]),
            "rejected": _turns(CORPUS[i % 20], CORPUS[(i + 5) % 20] + " " + CORPUS[(i + 7) % 20]),
            "source": "tiny",
            "id": str(i),
        }
        for i in range(48)
    ]
    for name in ("shp_2", "ultrafeedback_mean_aspects"):
        _write_jsonl(data / f"{name}.jsonl", pairs)
    _write_jsonl(prompts / "ultrafeedback_prompts.jsonl", [{"prompt": c} for c in CORPUS[:20]])
    write_llama(ckpt / "tulu-2-13b", seed=0)
    monkeypatch.setenv("TULU25_DATA", str(data))
    monkeypatch.setenv("TULU25_PROMPTS", str(prompts))
    monkeypatch.setenv("TULU25_CKPT", str(ckpt))
    study = config_lib.load_experiment("experiments/tulu25.py")

    from jaxrl.convert import with_hf_architecture

    real_config, real_reward_model = study.get_config, study.reward_model
    base = with_hf_architecture(real_config(), ckpt / "tulu-2-13b")
    base = config_lib.override(
        base,
        {
            "model.dtype": "float32",
            "train.batch_size": 8,
            "train.grad_accum": 1,
            "train.log_every": 1,
            "train.checkpoint_every": 2,
            "train.tensorboard": False,
            "train.progress": False,
            "data.num_eval": 8,
            "data.max_len": 128,
            "data.max_prompt_len": 64,
        },
    )

    def shrink(point):
        stage = point.get("stage", "dpo")
        return {**point, **TINY[stage]}

    study.get_config = lambda: base
    study.reward_model = lambda point: (lambda p: None if p is None else shrink(p))(real_reward_model(point))
    points = study.sweep()
    dpo = next(p for p in points if "stage" not in p)
    rm = next(p for p in points if p.get("stage") == "rm")
    ppo = next(
        p for p in points if p.get("stage") == "ppo" and p["rl.reward_model"].startswith(study.TRAINED)
    )
    assert "shp_2" in dpo["data.source"] and "ultrafeedback_mean_aspects" in rm["data.source"]
    study.sweep = lambda: [shrink(dpo), shrink(rm), shrink(ppo)]
    # The benchmark suite's datasets are not on this machine: the same evaluation path on two local tasks.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_jsonl(
        tasks / "mc.jsonl",
        [
            {"question": c, "choices": [CORPUS[(i + 1) % 20], CORPUS[(i + 9) % 20]], "answer": 0}
            for i, c in enumerate(CORPUS[:4])
        ],
    )
    _write_jsonl(tasks / "gen.jsonl", [{"prompt": c, "target": "no such answer"} for c in CORPUS[:3]])
    head = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: "
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{head}{tasks / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    (tasks / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{head}{tasks / 'gen.jsonl'}\noutput_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    study.evaluation = lambda: {
        "tasks": ["tiny_mc", "tiny_gen"],
        "include_path": [str(tasks)],
        "batch_size": 8,
        "model_args": {"dtype": "float32"},
    }
    return study


@pytest.mark.slow
def test_every_tulu25_metric_is_logged_by_a_tiny_run_of_its_stage(tiny_tulu25, tmp_path):
    rows = sweep.run_sweep(tiny_tulu25, tmp_path / "study", log=lambda *a: None)
    assert sorted(r["stage"] for r in rows) == ["dpo", "ppo", "rm"]
    assert all(r["status"] == "finished" for r in rows), [(r["run"], r.get("reason")) for r in rows]
    logged = {r["stage"]: {k for k, v in r.items() if "/" in k and v is not None} for r in rows}
    metrics = list(tiny_tulu25.metrics())
    assert metrics
    for name in metrics:
        assert any(name in keys for keys in logged.values()), (
            f"metrics() names {name!r}, which no run of the study logs; logged: {logged}"
        )
    # Each stage contributes a column: the table compares every arm, not only one stage's.
    for stage, keys in logged.items():
        assert any(name in keys for name in metrics), f"no metrics() column for the {stage} runs: {keys}"
    _, _, markdown = results_lib.write_results(rows, metrics, tmp_path / "study")
    assert all(name in markdown.splitlines()[0] for name in metrics)
    # The benchmark columns: every policy arm is evaluated (with a standard error), the reward model is not.
    for row in rows:
        harness = {k for k in row if k.startswith("harness/")}
        if row["stage"] == "rm":
            assert not harness
        else:
            assert {"harness/tiny_mc", "harness/tiny_mc_se", "harness/tiny_gen"} <= harness, row
            assert 0 <= row["harness/tiny_mc"] <= 1 and row["harness/tiny_gen"] == 0.0
    # A rerun finds every arm trained and evaluated: nothing is run again.
    lines = []
    again = sweep.run_sweep(tiny_tulu25, tmp_path / "study", log=lines.append)
    assert not any(line.startswith("evaluating") for line in lines), lines
    assert [r.get("harness/tiny_mc") for r in again] == [r.get("harness/tiny_mc") for r in rows]


def test_tulu25_launch_adds_an_eval_job_per_policy_arm(tiny_tulu25, tmp_path):
    import launch

    study_file = tmp_path / "tiny_tulu25.py"
    study_file.write_text(open("experiments/tulu25.py").read())
    jobs = launch.jobs(str(study_file), str(tmp_path / "w"), sweep=True)
    train = {j.name: j for j in jobs if j.args[0] == "train"}
    evals = [j for j in jobs if j.args[0] == "eval"]
    policy = [name for name, j in train.items() if not any(a == "stage=rm" for a in j.args)]
    assert sorted(j.after[0] for j in evals) == sorted(policy) and all(len(j.after) == 1 for j in evals)
    for job in evals:
        args = list(job.args)
        assert args[args.index("--model") + 1] == train[job.after[0]].workdir
        assert args[args.index("--tasks") + 1] == "tulu25" and "--judge" in args
        assert jobs.index(job) > jobs.index(train[job.after[0]])
