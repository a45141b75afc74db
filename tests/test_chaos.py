"""Chaos: two sweeps at once on one workdir and kill -9 at scheduled moments, then a clean rerun; the results
table equals an undisturbed sweep's and every run's metrics.jsonl holds each step once."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jaxrl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

STUDY = textwrap.dedent("""
    from jaxrl.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, override

    def get_config():
        return Config(stage="dpo",
                      model=ModelConfig(vocab_size=256, hidden=32, layers=1, heads=2, kv_heads=1, mlp=64,
                                        dtype="float32"),
                      optim=OptimConfig(lr=1e-3),
                      data=DataConfig(num_train=128, num_eval=16, max_len=48, max_prompt_len=24,
                                      eval_prompts_per_domain=2, eval_max_new=4),
                      train=TrainConfig(steps=10, batch_size=8, log_every=1, checkpoint_every=2,
                                        keep_checkpoints=2, tensorboard=False, progress=False))

    def sft_config(cfg):  # one SFT base for the three points (the loss is no SFT setting)
        return override(cfg, {"stage": "sft", "train.steps": 12, "loss.name": "dpo"})

    def sweep():
        return [{"loss.name": n} for n in ("dpo", "ipo", "simpo")]

    def metrics():
        return ["eval/loss", "eval/rewards/accuracies", "eval/gold_reward", "train/loss"]
""")


def start_sweep(study: Path, workdir: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jaxrl.cli", "sweep", str(study), "--workdir", str(workdir), *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def assert_each_step_once(workdir: Path) -> None:
    runs = sorted((workdir / "runs").iterdir())
    assert runs
    for run in runs:
        rows = read_metrics(run)
        train_steps = [r["step"] for r in rows if "train/loss" in r]
        eval_steps = [r["step"] for r in rows if any(k.startswith("eval/") for k in r)]
        assert train_steps == sorted(set(train_steps)), (run.name, train_steps)
        assert train_steps == list(range(1, train_steps[-1] + 1)), (run.name, train_steps)
        assert len(eval_steps) == len(set(eval_steps)) == 1, (run.name, eval_steps)


@pytest.mark.slow
def test_concurrent_sweeps_and_kills_end_with_the_undisturbed_table(tmp_path):
    study = tmp_path / "chaos_study.py"
    study.write_text(STUDY)
    calm, chaos = tmp_path / "calm", tmp_path / "chaos"
    finish(start_sweep(study, calm))

    # Two sweeps share the chaos workdir; one of them is killed at seeded moments and restarted each time
    # (three times: about half of the four runs are left for the two-worker sweep below).
    rng = random.Random(0)
    other = start_sweep(study, chaos)
    for _ in range(3):
        victim = start_sweep(study, chaos)
        time.sleep(rng.uniform(3.0, 12.0))
        kill(victim)
    # And the long-lived one goes down too, mid-run.
    time.sleep(rng.uniform(1.0, 4.0))
    kill(other)
    # One sweep with a second worker process finishes the work between them (each run trained by one of
    # them, once); a third sweep has nothing left to do.
    both = finish(start_sweep(study, chaos, "--workers", "2"))
    worker_log = (chaos / "logs" / "worker-1.log").read_text()
    trained = [
        line.split()[1]
        for text in (both, worker_log)
        for line in text.splitlines()
        if line.startswith("finished ")
    ]
    assert len(trained) == len(set(trained)), trained
    last = finish(start_sweep(study, chaos))
    assert "0 to run" in last

    assert (chaos / "results.md").read_text() == (calm / "results.md").read_text()
    assert_each_step_once(chaos)
    assert_each_step_once(calm)
