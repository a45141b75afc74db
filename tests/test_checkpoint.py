"""Checkpoints and resume: an interrupted and resumed run logs the same losses and ends with the same
params as an uninterrupted one; old checkpoints are pruned; finished runs are not redone; a changed config
is refused."""

import json

import jax
import numpy as np
import pytest

from jaxrl import checkpoint, steps, train
from jaxrl import config as config_lib
from jaxrl.config import ConfigError
from jaxrl.metrics import read_metrics
from jaxrl.models import init as model_init

TIMING = ("train/tokens_per_s", "train/tflops_per_s")


def train_rows(workdir) -> dict[int, dict]:
    """Per-step train rows of metrics.jsonl minus the wall-clock metrics; a step logged twice is an error."""
    rows = {}
    for row in read_metrics(workdir):
        if "train/loss" in row:
            assert row["step"] not in rows, f"step {row['step']} logged twice"
            rows[row["step"]] = {k: v for k, v in row.items() if k not in TIMING}
    return rows


def final_params(cfg, workdir):
    _, abstract = model_init.abstract_model(model_init.stage_model_config(cfg))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = checkpoint.abstract_with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
    return jax.device_get(checkpoint.load_params(checkpoint.final_params_dir(workdir), target))


def step_dirs(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def interrupted_run(cfg, workdir, *, stop_after=6):
    """run(stop_after) then run() again in the same workdir; returns the second invocation's log lines."""
    assert train.run(cfg, workdir, log=lambda *_: None, stop_after=stop_after) == {"stopped_at": stop_after}
    assert not (workdir / train.DONE_FILE).exists()
    assert max(train_rows(workdir)) == stop_after
    assert stop_after in step_dirs(workdir)
    lines = []
    train.run(cfg, workdir, log=lines.append)
    return lines


def assert_same_run(cfg, full_dir, resumed_dir, stop_after=6):
    full, resumed = train_rows(full_dir), train_rows(resumed_dir)
    steps = cfg.train.steps
    assert sorted(full) == sorted(resumed) == list(range(1, steps + 1))
    for step in range(stop_after + 1, steps + 1):
        assert resumed[step] == full[step], f"step {step}: {resumed[step]} != {full[step]}"
    losses = [full[s]["train/loss"] for s in range(1, steps + 1)]
    assert len(set(losses)) > 1  # the rows compared really change from step to step
    for a, b in zip(
        jax.tree.leaves(final_params(cfg, full_dir)),
        jax.tree.leaves(final_params(cfg, resumed_dir)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    summary_full = json.loads((full_dir / train.DONE_FILE).read_text())
    summary_resumed = json.loads((resumed_dir / train.DONE_FILE).read_text())
    assert summary_full["eval"] == summary_resumed["eval"] and summary_full["eval"]
    assert summary_full["skipped_steps"] == summary_resumed["skipped_steps"] == 0


def guard_steps(monkeypatch):
    """Makes every call of the runner's jitted train step fail on a hidden host/device copy."""
    make_step = steps.make_step

    def guarded_make_step(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def guarded(*step_args):
            with jax.transfer_guard("disallow"):
                return step(*step_args)

        return guarded

    monkeypatch.setattr(steps, "make_step", guarded_make_step)


def test_sft_resume_matches_an_uninterrupted_run(sft_run, tmp_path, monkeypatch):
    cfg, full_dir = sft_run
    guard_steps(monkeypatch)  # the loop feeds the step device-resident batches and state only
    resumed_dir = tmp_path / "resumed"
    assert train.run(cfg, resumed_dir, log=lambda *_: None, stop_after=6) == {"stopped_at": 6}
    # The half-done workdir refuses a different config instead of mixing two runs.
    with pytest.raises(ConfigError, match="different config"):
        train.run(config_lib.override(cfg, {"optim.lr": 5e-3}), resumed_dir, log=lambda *_: None)
    lines = []
    train.run(cfg, resumed_dir, log=lines.append)
    assert any("resumed" in line and "step 6" in line for line in lines), lines
    assert_same_run(cfg, full_dir, resumed_dir)


@pytest.mark.parametrize("reference", ["cache", "on_the_fly"])
def test_dpo_resume_matches_an_uninterrupted_run(sft_run, tmp_path, run_config, reference):
    _, sft_dir = sft_run
    cfg = run_config(
        "dpo", **{"train.init_from": str(sft_dir), "train.reference": reference, "loss.beta": 0.3}
    )
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train.run(cfg, full_dir, log=lambda *_: None)
    lines = interrupted_run(cfg, resumed_dir)
    if reference == "cache":
        # The resumed invocation reuses the reference log-probs its first invocation stored.
        assert sum("cache hit" in line for line in lines) == 2, lines
    assert_same_run(cfg, full_dir, resumed_dir)
    first = train_rows(full_dir)[1]
    assert first["train/loss"] == pytest.approx(np.log(2.0), abs=1e-4)  # policy == reference at step 1


def test_old_checkpoints_are_pruned(sft_run):
    cfg, workdir = sft_run
    assert cfg.train.keep_checkpoints == 2 and cfg.train.checkpoint_every == 4
    assert step_dirs(workdir) == [8, 12]


def test_a_finished_run_returns_at_once(sft_run, monkeypatch):
    cfg, workdir = sft_run
    metrics_before = (workdir / "metrics.jsonl").read_text()

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must not rebuild data or train")

    monkeypatch.setattr(train.pipeline, "build_stage_data", fail)
    monkeypatch.setattr(model_init, "init_params", fail)
    answered = []
    summary = train.run(cfg, workdir, log=lambda *_: None, answered=lambda: answered.append(True))
    assert summary == json.loads((workdir / train.DONE_FILE).read_text()) and answered == [True]
    assert summary["stage"] == "sft" and summary["steps"] == cfg.train.steps
    assert (workdir / "metrics.jsonl").read_text() == metrics_before


def test_a_run_trained_now_is_not_answered_from_disk(tmp_path, run_config):
    answered = []
    cfg = run_config("sft", **{"train.steps": 2})
    summary = train.run(cfg, tmp_path / "run", log=lambda *_: None, answered=lambda: answered.append(True))
    assert summary["status"] == "finished" and answered == []


def test_a_workdir_with_a_different_config_is_refused(tmp_path, run_config):
    cfg = run_config("sft")
    workdir = tmp_path / "run"
    workdir.mkdir()
    config_lib.save(cfg, workdir / "config.json")
    with pytest.raises(ConfigError, match="different config"):
        train.run(config_lib.override(cfg, {"seed": 1}), workdir, log=lambda *_: None)
