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
    extra = (
        ()
        if padding == "max_len"
        else ("data.padding=bucket", "data.bucket_multiple=8", "data.group_by_length=true")
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
