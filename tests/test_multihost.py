"""Multi-process JAX: the process layout read from the environment, and a two-process `jaxrl train` on
localhost (jax.distributed, 4 fake CPU devices each) that matches one process with 8 devices step for step."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrl import distributed
from jaxrl.distributed import ProcessLayout

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, ProcessLayout("single")),
        ({"JAX_NUM_PROCESSES": "1"}, ProcessLayout("single")),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
            ProcessLayout("env", "h:1234", 4, 2),
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "h:1",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "1",
                "JAXRL_DISTRIBUTED": "off",
            },
            ProcessLayout("single"),
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_NNODES": "4"},
            ProcessLayout("slurm", None, 4, 3),
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_STEP_NUM_NODES": "2"},
            ProcessLayout("slurm_per_device", None, 16, 5),
        ),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, ProcessLayout("single")),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, ProcessLayout("auto")),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, ProcessLayout("single")),
        ({"JAXRL_DISTRIBUTED": "on"}, ProcessLayout("auto")),
    ],
)
def test_layout_from_environment(env, expected):
    assert distributed.detect(env) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},  # no coordinator
        {"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"},  # no process id
        {"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "2"},
        {"JAXRL_DISTRIBUTED": "maybe"},
    ],
)
def test_incomplete_layouts_are_errors(env):
    with pytest.raises(ValueError):
        distributed.detect(env)


def test_single_process_initialize_is_a_noop():
    import jax

    assert distributed.initialize({}) == ProcessLayout("single")
    assert not jax.distributed.is_initialized() and jax.process_count() == 1
    assert distributed.is_primary()


def test_joining_after_jax_started_is_refused():
    import jax

    jax.devices()
    env = {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        distributed.initialize(env)


SETS = [
    "train.steps=5",
    "data.num_train=128",
    "data.eval_prompts_per_domain=0",
    "train.progress=false",
    "model.dtype=float32",
    "train.log_every=1",
    "train.tensorboard=false",
]
# Fast XLA:CPU compilation, as tests/conftest.py sets for this process.
FAST = " ".join(
    [
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
        "--xla_cpu_use_fusion_emitters=false",
    ]
)


def _train_argv(workdir: Path, extra_sets=()) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "jaxrl.cli",
        "train",
        "--config",
        "experiments/tiny_pipeline.py",
        "--workdir",
        str(workdir),
    ]
    for s in [*SETS, *extra_sets]:
        argv += ["--set", s]
    return argv


def _env(devices: int, **extra) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "JAXRL_", "SLURM_", "TPU_"))
    }
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST}"}
    return env | extra


def _wait(procs, logs, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, (
            f"{' '.join(p.args[:6])} ... exited {p.returncode}:\n{log.read_text()[-4000:]}"
        )


def _losses(workdir: Path) -> tuple[list[float], list[float], dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    evals = [r for r in rows if "eval/loss" in r]
    return [r["train/loss"] for r in train], [r["train/grad_norm"] for r in train], evals[-1]


@pytest.mark.slow
@pytest.mark.parametrize("padding", ["max_len", "bucket"])
def test_two_processes_match_one(tmp_path, padding):
    # With buckets every process must cut the same global batch to the same width (from the global indices).
    # That case also runs on the hybrid mesh of two granules (each process one, as two TPU slices or two GPU
    # nodes are): data across the processes, fsdp within each; the single process has the same axes.
    extra = (
        ()
        if padding == "max_len"
        else (
            "data.padding=bucket",
            "data.bucket_multiple=8",
            "data.group_by_length=true",
            "mesh.granule=process",
            "mesh.data=2",
            "mesh.fsdp=4",
        )
    )
    sys.path.insert(0, str(REPO))
    from launch.local import free_port

    port = free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs, logs = [], []
    for pid in range(2):
        log = tmp_path / f"process{pid}.log"
        env = _env(
            4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)
        )
        procs.append(
            subprocess.Popen(
                _train_argv(multi, extra), cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
            )
        )
        logs.append(log)
    _wait(procs, logs, timeout_s=150)
    log = tmp_path / "single.log"
    _wait(
        [
            subprocess.Popen(
                _train_argv(single, extra),
                cwd=REPO,
                env=_env(8),
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
            )
        ],
        [log],
        timeout_s=120,
    )

    multi_loss, multi_grad, multi_eval = _losses(multi)
    single_loss, single_grad, single_eval = _losses(single)
    # Same global batches through the same sharded program; only the cross-process reduction order differs.
    np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-5)
    np.testing.assert_allclose(multi_grad, single_grad, rtol=1e-4)
    np.testing.assert_allclose(multi_eval["eval/loss"], single_eval["eval/loss"], rtol=1e-5)
    assert multi_eval["eval/examples"] == single_eval["eval/examples"]
    assert (multi / "final" / "summary.json").exists()
    assert not (multi / "tensorboard").exists()
    hybrid = "the data axis spans 2 processes over the data-centre network"
    assert (hybrid in logs[0].read_text()) == (padding == "bucket")
    assert "in 1 process(es)" in log.read_text() and hybrid not in log.read_text()


def _eval_rm_argv(rm_dir: Path, policy_dir: Path, data: Path, prompts: Path, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "jaxrl.cli", "eval-rm", "--model", str(rm_dir), "--out", str(out)]
    argv += ["--data", str(data), "--batch-size", "4", "--mesh-data", "2", "--mesh-fsdp", "4"]
    argv += ["--policy", str(policy_dir), "--prompts", str(prompts), "--best-of", "2", "--temperature", "1.0"]
    return argv + ["--max-new-tokens", "4", "--policy-arg", "dtype=float32", "--policy-arg", "bucket=8"]


@pytest.mark.slow
def test_eval_rm_two_processes_match_one(tmp_path):
    """`jaxrl eval-rm` on two processes (4 fake CPU devices each) scores every pair as one process with 8
    does, samples best-of-N across both and scores the samples as transformers does; process 0 alone writes
    files and logs."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    sys.path.insert(0, str(REPO))
    from test_rm_eval import PREFS, reference_scores, write_jsonl, write_models

    from jaxrl.eval import rm_eval
    from launch.local import free_port

    policy_dir, rm_dir = tmp_path / "policy", tmp_path / "rm"
    rm, tok = write_models(policy_dir, rm_dir)
    rows = [{**r, "id": str(i)} for i, r in enumerate((PREFS + PREFS)[:16])]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    prompt_texts = ["the cat sat on", "one two three", "how many apples"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompt_texts])
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    port = free_port()
    procs, logs = [], []
    for pid in range(2):  # each its own --out, so a file written by process 1 would show
        log = tmp_path / f"process{pid}.log"
        env = _env(
            4,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            **offline,
        )
        argv = _eval_rm_argv(rm_dir, policy_dir, data, prompts, tmp_path / f"multi{pid}")
        procs.append(
            subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        )
        logs.append(log)
    _wait(procs, logs, timeout_s=240)
    log = tmp_path / "single.log"
    argv = _eval_rm_argv(rm_dir, policy_dir, data, prompts, tmp_path / "single")
    single_proc = subprocess.Popen(
        argv, cwd=REPO, env=_env(8, **offline), stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    _wait([single_proc], [log], timeout_s=180)

    multi, single = tmp_path / "multi0", tmp_path / "single"
    assert not (tmp_path / "multi1").exists() or not any((tmp_path / "multi1").iterdir())
    assert "Score: " in logs[0].read_text() and "Score: " not in logs[1].read_text()
    results = {d: json.loads((d / rm_eval.RESULTS_FILE).read_text()) for d in (multi, single)}
    accuracy = {
        d: {k: v["accuracy"] for k, v in r["preferences"]["subsets"].items()} for d, r in results.items()
    }
    assert accuracy[multi] == accuracy[single]
    assert results[multi]["preferences"]["sections"] == pytest.approx(
        results[single]["preferences"]["sections"]
    )
    per_row = {
        d: [json.loads(line) for line in (d / rm_eval.SCORES_FILE).read_text().splitlines()] for d in results
    }
    assert [r["id"] for r in per_row[multi]] == [r["id"] for r in per_row[single]] == [r["id"] for r in rows]
    for field in ("chosen_score", "rejected_score"):
        np.testing.assert_allclose(
            [r[field] for r in per_row[multi]], [r[field] for r in per_row[single]], atol=1e-5, rtol=0
        )
    # Best-of-N: samples from both processes' shares, each scored as transformers scores it.
    samples = [json.loads(line) for line in (multi / rm_eval.BEST_OF_N_FILE).read_text().splitlines()]
    assert [len(s["samples"]) for s in samples] == [2, 2, 2]
    pairs = [
        {"prompt": p, "text": t} for p, s in zip(prompt_texts, samples, strict=True) for t in s["samples"]
    ]
    reference = reference_scores(rm, tok, pairs, "text").reshape(3, 2)
    np.testing.assert_allclose([s["scores"] for s in samples], reference, atol=1e-4, rtol=0)
    assert results[multi]["best_of_n"]["best"] == pytest.approx(reference.max(axis=1).mean(), abs=1e-4)


def _alpaca_argv(policy_dir: Path, rm_dir: Path, data: Path, out: Path) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "jaxrl.cli",
        "eval",
        "--model",
        str(policy_dir),
        "--tasks",
        "alpaca_eval_rm",
    ]
    argv += ["--out", str(out), "--judge", str(rm_dir), "--alpaca-file", str(data), "--log-samples"]
    return argv + ["--model-arg", "dtype=float32", "--model-arg", "max_gen_toks=6"]


@pytest.mark.slow
def test_alpaca_eval_rm_two_processes_match_one(tmp_path):
    """The reward-model-judged win rate on two processes: each answers its share of the instructions, the
    judge scores all of them; the same answers, rewards and win rate as one process, written once."""
    pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    sys.path.insert(0, str(REPO))
    from test_rm_eval import write_jsonl, write_models

    from launch.local import free_port

    policy_dir, rm_dir = tmp_path / "policy", tmp_path / "rm"
    write_models(policy_dir, rm_dir)
    instructions = ["the cat sat on", "one two three", "how many apples", "1 + 2 =", "the red house"]
    data = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [{"instruction": i, "output": "the dog ran to the red house"} for i in instructions],
    )
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    port = free_port()
    procs, logs = [], []
    for pid in range(2):
        log = tmp_path / f"process{pid}.log"
        env = _env(
            4,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            **offline,
        )
        argv = _alpaca_argv(policy_dir, rm_dir, data, tmp_path / f"multi{pid}")
        procs.append(
            subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        )
        logs.append(log)
    _wait(procs, logs, timeout_s=240)
    log = tmp_path / "single.log"
    argv = _alpaca_argv(policy_dir, rm_dir, data, tmp_path / "single")
    single = subprocess.Popen(
        argv, cwd=REPO, env=_env(8, **offline), stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    _wait([single], [log], timeout_s=180)

    assert not (tmp_path / "multi1" / "results.json").exists()
    samples = {
        name: [
            json.loads(line)
            for line in (tmp_path / name / "tasks" / "alpaca_eval_rm.samples.jsonl").read_text().splitlines()
        ]
        for name in ("multi0", "single")
    }
    assert [s["instruction"] for s in samples["multi0"]] == instructions
    assert [s["output"] for s in samples["multi0"]] == [s["output"] for s in samples["single"]]
    np.testing.assert_allclose(
        [s["reward"] for s in samples["multi0"]], [s["reward"] for s in samples["single"]], atol=1e-5, rtol=0
    )
    rates = [
        json.loads((tmp_path / name / "results.json").read_text())["results"]["alpaca_eval_rm"][
            "win_rate,none"
        ]
        for name in ("multi0", "single")
    ]
    assert rates[0] == rates[1]
