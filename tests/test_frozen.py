"""Frozen models are freed when unneeded: the offline runner releases a cached DPO reference after its cache
pass (or keeps it in host memory for the synthetic world evaluation's KL), and builds its train state by
donating what it consumes."""

import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl import member, reference, sharding, steps, train
from jaxrl.config import MeshConfig
from jaxrl.models import frozen
from jaxrl.models import init as model_init

QUIET = lambda *_: None  # noqa: E731
# A synthetic world evaluation every 2 of 4 steps and at the end (validation and test, KL to the start).
WORLD = {
    "data.eval_prompts_per_domain": 2,
    "data.val_prompts_per_domain": 1,
    "data.eval_samples": 2,
    "data.eval_max_new": 4,
    "train.eval_every": 2,
    "train.steps": 4,
}


def rows(workdir):
    """metrics.jsonl without its wall-clock rates."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")} for line in lines]


def test_frozen_offload_round_trips_exactly():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    params = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2) / 3, spec), "b": jnp.ones(3)}
    held = frozen.Frozen(params, offload=True)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(held._params))  # host memory
    back = held.get()
    assert back["w"].sharding == spec and back["b"].sharding == params["b"].sharding
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True)
    )
    assert frozen.Frozen(params).get() is params  # on the device: the same arrays
    assert frozen.shares_buffers(params, {"x": params["b"]}) and not frozen.shares_buffers(params, back)


@pytest.mark.parametrize("init", ["init_from", "random"])
def test_world_eval_with_the_start_offloaded_matches_it_on_device(
    sft_run, run_config, tmp_path, monkeypatch, init
):
    """Cached reference + world evaluation: the reference in host memory between evaluations gives the very
    metrics of keeping it on the device (what the runner did before). With no init_from the reference is the
    policy's random initialisation itself: on the device it must not be donated to the train state."""
    _, sft_dir = sft_run
    cfg = run_config("dpo", **WORLD, **({"train.init_from": str(sft_dir)} if init == "init_from" else {}))
    train.run(cfg, tmp_path / "offloaded", log=QUIET)
    on_device = lambda params, shardings=None, offload=False: frozen.Frozen(params, shardings, offload=False)
    monkeypatch.setattr(member, "Frozen", on_device)
    train.run(cfg, tmp_path / "on_device", log=QUIET)
    offloaded = rows(tmp_path / "offloaded")
    assert offloaded == rows(tmp_path / "on_device")
    final = offloaded[-1]
    assert any("val/kl" in r for r in offloaded) and final["eval/kl"] != 0.0 and np.isfinite(final["eval/kl"])


def _setup(cfg, tmp_path):
    return member.setup(cfg, tmp_path, sharding.make_mesh(cfg.mesh), QUIET)


def _watch_reference(monkeypatch):
    """Weak references to the reference parameters of the cache pass; the policy's live bytes whenever the
    train state is traced (inside setup, right before it is built)."""
    watched, at_state = [], []
    cached = reference.cached_reference_logps
    build = steps.new_train_state

    def watch(cache_dir, graphdef, params, arrays, **kwargs):
        watched.extend(weakref.ref(x) for x in jax.tree.leaves(params))
        return cached(cache_dir, graphdef, params, arrays, **kwargs)

    def traced(*args, **kwargs):
        at_state.append(sum(x() is not None for x in watched))
        return build(*args, **kwargs)

    monkeypatch.setattr(reference, "cached_reference_logps", watch)
    monkeypatch.setattr(steps, "new_train_state", traced)
    return watched, at_state


def _extra_device_bytes(before: set[int], state) -> int:
    in_state = {id(x) for x in jax.tree.leaves(state)}
    return sum(a.nbytes for a in jax.live_arrays() if id(a) not in before | in_state)


def test_cached_reference_is_released_before_the_state_is_built(sft_run, run_config, tmp_path, monkeypatch):
    _, sft_dir = sft_run
    cfg = run_config("dpo", **{"train.init_from": str(sft_dir), "train.steps": 2})
    watched, at_state = _watch_reference(monkeypatch)
    before = {id(a) for a in jax.live_arrays()}
    m = _setup(cfg, tmp_path)
    assert watched and at_state and max(at_state) == 0  # gone by the time the state is built
    assert all(x() is None for x in watched)
    assert _extra_device_bytes(before, m.state) < 1024  # no model beside the state


def test_world_eval_keeps_the_reference_in_host_memory(sft_run, run_config, tmp_path, monkeypatch):
    _, sft_dir = sft_run
    cfg = run_config("dpo", **WORLD, **{"train.init_from": str(sft_dir)})
    watched, at_state = _watch_reference(monkeypatch)
    before = {id(a) for a in jax.live_arrays()}
    m = _setup(cfg, tmp_path)
    assert max(at_state) == 0 and all(x() is None for x in watched)
    reference_bytes = sum(x.nbytes for x in jax.tree.leaves(m.state.params))
    assert _extra_device_bytes(before, m.state) < reference_bytes // 10
    metrics, _ = m.world_eval(steps.model_params(m.state), "validation")
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is still its start


def _capture(monkeypatch, module, name):
    """Strong references to what `module.name` returns during setup."""
    out = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: out.append(fn(*a, **k)) or out[-1])
    return out


def test_the_state_is_built_by_donating_the_policy(sft_run, run_config, tmp_path, monkeypatch):
    _, sft_dir = sft_run
    merged = _capture(monkeypatch, model_init, "merge_init")  # the policy's parameters, loaded
    m = _setup(run_config("dpo", **{"train.init_from": str(sft_dir), "train.steps": 2}), tmp_path)
    assert len(merged) == 1 and all(x.is_deleted() for x in jax.tree.leaves(merged[0]))
    assert not any(x.is_deleted() for x in jax.tree.leaves(m.state))


def test_an_on_the_fly_reference_that_is_the_policy_stays_intact(run_config, tmp_path, monkeypatch):
    """No init_from, on the fly: the reference is the same arrays as the initial policy, so neither is
    donated, and the state holds two equal copies."""
    inits = _capture(monkeypatch, model_init, "init_params")
    m = _setup(run_config("dpo", **{"train.reference": "on_the_fly", "train.steps": 2}), tmp_path)
    assert len(inits) == 1 and not any(x.is_deleted() for x in jax.tree.leaves(inits[0]))
    assert m.state.ref_params is not None and not frozen.shares_buffers(m.state.params, m.state.ref_params)
    for got, want in zip(jax.tree.leaves(m.state.ref_params), jax.tree.leaves(inits[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(m.state.params)[0]), np.asarray(jax.tree.leaves(inits[0])[0])
    )
