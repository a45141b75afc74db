"""Test setup: 8 fake CPU devices (configured before jax is imported anywhere) and a fast compiler.

The XLA CPU backend spends seconds in LLVM on even a tiny model (threefry initialisers are the worst);
tests run tiny models, so compile time is what matters: optimisation is turned down and compiled programs are
shared between tests through a per-session persistent cache. JAXRL_TEST_FULL_XLA=1 keeps XLA's defaults.
"""

import atexit
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

_FLAGS = ["--xla_force_host_platform_device_count=8"]
if os.environ.get("JAXRL_TEST_FULL_XLA") != "1":
    _FLAGS += [
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
        "--xla_cpu_use_fusion_emitters=false",
    ]
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_existing] + [f for f in _FLAGS if f.split("=")[0] not in _existing]
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

if jax.device_count() != 8:
    raise RuntimeError("tests need 8 fake CPU devices: jax was initialised before tests/conftest.py ran")

_CACHE_DIR = tempfile.mkdtemp(prefix="jaxrl-test-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _keep_the_compile_cache_on():
    """jaxrl.sweep raises the persistent cache's threshold to 0.5 s (a study's cache): after a test that runs
    a sweep in this process, programs that compile faster (most of the tests' tiny ones) would no longer be
    cached for the rest of the session. The threshold is put back after each test."""
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def shared_by_workers(tmp_path_factory, name: str, build):
    """A directory built once per test session, for expensive read-only module fixtures: `build(path)` fills
    it and returns a JSON-able value, returned with it as (path, value). Under pytest-xdist the first worker
    to ask builds it under a lock in the session's temp dir (shared by the workers) and the others wait for
    it and reuse it, rather than each worker building its own copy of the same thing."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        path = tmp_path_factory.mktemp(name)
        return path, build(path)
    root = Path(tmp_path_factory.getbasetemp()).parent
    path, done = root / name, root / f"{name}.done.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a worker dies holding it
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a build that raised in another worker: build again
            path.mkdir()
            value = build(path)
            done.write_text(json.dumps(value))
    return path, json.loads(done.read_text())


def tiny_run_config(stage: str = "sft", **overrides):
    """A seconds-long train.run config (synthetic world): 12 steps, checkpoints every 4, no sampling eval."""
    from jaxrl import config as config_lib
    from jaxrl.config import Config, DataConfig, ModelConfig, TrainConfig

    cfg = Config(
        stage=stage,
        model=ModelConfig(vocab_size=256, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32"),
        data=DataConfig(num_train=128, num_eval=32, max_len=48, max_prompt_len=24, eval_prompts_per_domain=0),
        train=TrainConfig(
            steps=12,
            batch_size=16,
            log_every=1,
            checkpoint_every=4,
            keep_checkpoints=2,
            tensorboard=False,
            progress=False,
        ),
    )
    return config_lib.override(cfg, overrides)


@pytest.fixture(scope="session")
def run_config():
    """The tiny_run_config factory, for test modules."""
    return tiny_run_config


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """A finished tiny SFT run, the init_from source of dpo tests: (config, workdir)."""
    from jaxrl import train

    cfg = tiny_run_config("sft")
    workdir = tmp_path_factory.mktemp("sft_run")
    train.run(cfg, workdir, log=lambda *_: None)
    return cfg, workdir
