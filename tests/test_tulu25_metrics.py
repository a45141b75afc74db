"""experiments/tulu25.py's metrics() names only metrics its runs produce: a tiny version of the real study
(its own configs and sweep points, shrunk to a tiny random Llama, local files in its data formats, a few
steps) runs through `jaxrl.sweep.run_sweep` as tests/test_study.py runs the synthetic study, and every name
metrics() lists is a column of a finished run's row of the stage that logs it."""

import json

import pytest

pytest.importorskip("transformers")

from tiny_hf import CORPUS, write_llama  # noqa: E402

from jaxrl import config as config_lib  # noqa: E402
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
    _, _, markdown = sweep.write_results(rows, metrics, tmp_path / "study")
    assert all(name in markdown.splitlines()[0] for name in metrics)
