"""Nothing stale, nothing silent: one process per workdir, finished results that match their configs,
degenerate runs that fail loudly, a failed start that leaves its workdir free, one-line errors, strict
JSON."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from chat_fixtures import word_tokenizer

from jaxrl import checkpoint, sweep, train
from jaxrl import config as config_lib
from jaxrl import results as results_lib
from jaxrl import workdir as workdir_lib
from jaxrl.config import ConfigError
from jaxrl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
QUIET = lambda *a, **k: None  # noqa: E731


def strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl parsed by a strict JSON parser (bare NaN / Infinity are errors)."""

    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def cli(*args, cwd=REPO, env=None, timeout=300):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "jaxrl.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# 1. Stale results.


STUDY = textwrap.dedent("""
    from jaxrl.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, override

    def get_config():
        return Config(stage="dpo",
                      model=ModelConfig(vocab_size=256, hidden=32, layers=1, heads=2, kv_heads=1, mlp=64,
                                        dtype="float32"),
                      optim=OptimConfig(lr=1e-3),
                      data=DataConfig(num_train=64, num_eval=16, max_len=48, max_prompt_len=24,
                                      eval_prompts_per_domain=0),
                      train=TrainConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=2,
                                        tensorboard=False, progress=False))

    def sft_config(cfg):
        return override(cfg, {"stage": "sft", "train.steps": 4})

    def sweep():
        return [{"loss.name": n} for n in ("dpo", "ipo")]

    def metrics():
        return ["eval/loss", "eval/rewards/accuracies", "train/loss"]
""")


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "study.py"
    path.write_text(STUDY)
    return config_lib.load_experiment(path)


@pytest.mark.slow
def test_sweep_refuses_results_made_under_another_config(study, tmp_path):
    workdir = tmp_path / "w"
    sweep.run_sweep(study, workdir, log=QUIET)
    # The study's defaults change (as an edit of get_config would): the finished runs are not reused.
    with pytest.raises(ConfigError, match=r"optim\.lr \(0\.001 -> 0\.002\)") as e:
        sweep.run_sweep(study, workdir, ["optim.lr=0.002"], log=QUIET)
    assert "delete" in str(e.value)
    # A presentation-only setting does not make a finished run stale.
    lines = []
    assert len(sweep.run_sweep(study, workdir, ["train.progress=true"], log=lines.append)) == 4
    assert "4 already finished, 0 to run" in lines[0]


@pytest.mark.slow
def test_a_finished_rl_run_is_not_reused_for_another_config(sft_run, tmp_path, run_config):
    _, sft_dir = sft_run
    rl = {
        "rl.verifiable": "gold",
        "rl.value_init": "policy",
        "rl.num_prompts": 32,
        "rl.rollout_batch": 16,
        "rl.minibatch": 16,
        "train.steps": 2,
        "train.init_from": str(sft_dir),
    }
    train.run(run_config("ppo", **rl), tmp_path / "ppo", log=QUIET)
    with pytest.raises(ConfigError, match=r"rl\.kl_coef"):
        train.run(run_config("ppo", **rl, **{"rl.kl_coef": 0.5}), tmp_path / "ppo", log=QUIET)


# 2. One process per workdir.


def test_a_held_workdir_refuses_a_second_run(tmp_path, run_config):
    with workdir_lib.hold(tmp_path / "run"):
        with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {os.getpid()}"):
            train.run(run_config("sft"), tmp_path / "run", log=QUIET)
    assert not (tmp_path / "run" / "config.json").exists()


def lock_holder(workdir: Path) -> subprocess.Popen:
    """Another process that holds `workdir`'s lock (until killed); returns once it holds it."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time
        from jaxrl import workdir
        with workdir.hold({str(workdir)!r}):
            print("held", flush=True)
            time.sleep(600)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    holder = lock_holder(tmp_path / "run")
    try:
        with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {holder.pid}"):
            with workdir_lib.hold(tmp_path / "run"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir_lib.hold(tmp_path / "run") as path:  # the kernel released the dead holder's lock
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_second_train_command_exits_with_one_line(tmp_path):
    holder = lock_holder(tmp_path / "run")
    try:
        result = cli("train", "--config", "experiments/tiny_pipeline.py", "--workdir", str(tmp_path / "run"))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in use by pid" in lines[0] and "Traceback" not in result.stderr


# 3. Degenerate runs fail loudly.


def test_an_exploding_learning_rate_stops_at_the_first_update(tmp_path, run_config):
    cfg = run_config("sft", **{"optim.lr": 1e30, "optim.warmup_ratio": 0.0, "train.checkpoint_every": 1})
    with pytest.raises(workdir_lib.RunFailed, match=r"the first \d update\(s\) had a non-finite"):
        train.run(cfg, tmp_path / "run", log=QUIET)
    summary = json.loads((tmp_path / "run" / train.DONE_FILE).read_text())
    assert summary["status"] == "failed" and summary["skipped_steps"] >= 1
    assert not checkpoint.final_params_dir(tmp_path / "run").exists()
    # No checkpoint holds an update: the only one saved before the stop is of step 1, whose update was
    # refused.
    assert all(int(p.name) <= 1 for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    strict_rows(tmp_path / "run" / "metrics.jsonl")
    # Running it again answers with the failure again, not with an ordinary finished run.
    with pytest.raises(workdir_lib.RunFailed):
        train.run(cfg, tmp_path / "run", log=QUIET)


def test_skip_verdict_rules():
    assert workdir_lib.skip_verdict(0, 10, 100, 0.02) is None
    assert "first 1" in workdir_lib.skip_verdict(1, 1, 100, 0.02)
    assert workdir_lib.skip_verdict(2, 50, 100, 0.02) is None  # 2 of 100 allowed
    assert "max_skipped_fraction" in workdir_lib.skip_verdict(3, 50, 100, 0.02)


def test_non_finite_final_evaluation_fails_the_run(tmp_path, run_config, monkeypatch):
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: real(*a, **k) | {"loss": float("nan")})
    with pytest.raises(workdir_lib.RunFailed, match="evaluation is not finite: loss"):
        train.run(run_config("sft", **{"train.steps": 2}), tmp_path / "run", log=QUIET)
    summary_text = (tmp_path / "run" / train.DONE_FILE).read_text()
    assert json.loads(summary_text)["eval"]["loss"] is None  # strict JSON: NaN written as null
    assert "NaN" not in summary_text
    strict_rows(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.slow
def test_sweep_marks_failed_arms_and_does_not_start_their_dependents(study, tmp_path):
    study.sweep = lambda: [{"loss.name": "dpo"}, {"loss.name": "ipo", "optim.lr": 1e30}]
    study.sft_config = lambda cfg: config_lib.override(
        cfg, {"stage": "sft", "train.steps": 4, "optim.lr": 1e-3}
    )
    rows = sweep.run_sweep(study, tmp_path / "w", log=QUIET)
    by_loss = {r.get("loss.name"): r for r in rows}
    assert by_loss["ipo"]["status"] == "failed" and by_loss["dpo"]["status"] == "finished"
    _, _, markdown = results_lib.write_results(rows, ["eval/loss"], tmp_path / "w")
    assert "FAILED 1 of 1" in markdown and "skipped" in markdown
    # A failed base takes its dependents down with it, and they are marked, not dropped.
    study.sft_config = lambda cfg: config_lib.override(
        cfg, {"stage": "sft", "train.steps": 4, "optim.lr": 1e30}
    )
    rows = sweep.run_sweep(study, tmp_path / "w2", log=QUIET)
    assert {r["status"] for r in rows} == {"failed", "not run"}


# 4/5. Ranges before anything runs; a failed start leaves the workdir free.


def test_a_failed_start_does_not_block_its_workdir(tmp_path, run_config):
    bad = run_config("sft", **{"data.source": str(tmp_path / "missing.jsonl"), "data.format": "sft"})
    with pytest.raises((FileNotFoundError, ConfigError)):
        train.run(bad, tmp_path / "run", log=QUIET)
    assert not (tmp_path / "run" / "config.json").exists()
    summary = train.run(run_config("sft", **{"train.steps": 2}), tmp_path / "run", log=QUIET)
    assert summary["status"] == "finished"


def test_validate_catches_ranges_before_anything_runs(tmp_path):
    for setting in ("train.batch_size=0", "train.grad_accum=0", "train.steps=-5", "loss.beta=0"):
        result = cli(
            "validate", "--config", "experiments/tiny_pipeline.py", "--set", setting, "--set", "stage=dpo"
        )
        assert result.returncode == 2, (setting, result.stdout, result.stderr)
        assert setting.split("=")[0] in result.stderr and len(result.stderr.strip().splitlines()) == 1


# 6. Checkpoints fall back (end to end; the damage modes are in test_checkpoint_fallback.py).


def test_a_damaged_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path, run_config):
    cfg = run_config("sft", **{"train.checkpoint_every": 2, "train.keep_checkpoints": 3})
    train.run(cfg, tmp_path / "full", log=QUIET)
    assert train.run(cfg, tmp_path / "run", log=QUIET, stop_after=6) == {"stopped_at": 6}
    for f in (tmp_path / "run" / "checkpoints" / "6").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    lines = []
    train.run(cfg, tmp_path / "run", log=lines.append)
    assert any("checkpoint step 6 is damaged" in line for line in lines), lines
    assert any("at step 4" in line for line in lines), lines
    rows = lambda d: {r["step"]: r["train/loss"] for r in read_metrics(d) if "train/loss" in r}
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 13))  # each step once after the resume
    assert rows(tmp_path / "run") == rows(tmp_path / "full")


# 7. One-line errors.


def test_user_errors_are_one_line_with_exit_2_and_debug_shows_the_traceback(tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tok", ["hi", "a", "b"])
    data = tmp_path / "pairs.jsonl"
    chosen = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]
    data.write_text(json.dumps({"prompt": "hi", "chosen": chosen}) + "\n")  # no "rejected"
    args = [
        "train",
        "--config",
        "experiments/tiny_pipeline.py",
        "--workdir",
        str(tmp_path / "run"),
        "--set",
        "stage=rm",
        "--set",
        f"data.source={data}",
        "--set",
        "data.format=ultrafeedback_binarized",
        "--set",
        f"data.tokenizer={tokenizer}",
    ]
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "pairs.jsonl" in result.stderr
    debug = cli("--debug", *args)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
