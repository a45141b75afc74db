"""Sharding: golden specs per preset, rule-table errors, mesh and batch checks, sharded == unsharded steps."""

import functools
import json
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl import config as config_lib
from jaxrl import sharding, steps, train
from jaxrl.config import Config, ConfigError, MeshConfig, ModelConfig, OptimConfig
from jaxrl.models import init as model_init

GOLDEN = Path(__file__).parent / "golden" / "sharding_specs.json"
PRESETS = ("dp", "fsdp", "fsdp_tp")  # the golden tables' (fsdp_tp_sp shards parameters as fsdp_tp)
# A fixed small model with every optional parameter kind the rule table knows (biases, QK-norm scales).
GOLDEN_MODELS = {
    "lm": ModelConfig(
        vocab_size=128, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, qkv_bias=True, qk_norm="head"
    ),
    "rm": ModelConfig(vocab_size=128, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, head="scalar"),
}
TINY = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32")


def mesh_222(preset="fsdp"):
    return sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, preset=preset))


def single_device_mesh(preset="fsdp"):
    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, preset=preset), devices=jax.devices()[:1])


def abstract_state(model_cfg, steps_total=10):
    _, abstract_params = model_init.abstract_model(model_cfg)
    tx, _ = steps.make_optimizer(OptimConfig(), steps_total)
    return jax.eval_shape(lambda: steps.new_train_state(abstract_params, tx, 0, None))


def spec_table(tree, preset, mesh) -> dict[str, str]:
    specs = sharding.tree_specs(tree, preset, mesh)
    flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    return {sharding.path_str(path): spec_str(spec) for path, spec in flat}


def spec_str(spec: P) -> str:
    """A PartitionSpec as the string of its tuple, e.g. "(None, 'fsdp')" (stable across jax reprs)."""
    return str(tuple(tuple(a) if isinstance(a, list) else a for a in spec))


def current_golden() -> dict:
    return {
        model: {preset: spec_table(abstract_state(cfg), preset, mesh_222(preset)) for preset in PRESETS}
        for model, cfg in GOLDEN_MODELS.items()
    }


def test_golden_sharding_specs():
    current = current_golden()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for model in GOLDEN_MODELS:
        for preset in PRESETS:
            want, got = golden[model][preset], current[model][preset]
            assert set(got) == set(want), f"{model}/{preset}: leaves differ: {set(got) ^ set(want)}"
            diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
            assert not diff, f"{model}/{preset}: specs changed (golden, now): {diff}"


def test_golden_specs_are_sensible():
    table = json.loads(GOLDEN.read_text())["lm"]
    tp = table["fsdp_tp"]
    assert tp["params/layers/attn/q/kernel"] == spec_str(P(None, "fsdp", "tensor", None))
    assert tp["params/layers/attn/k/kernel"] == spec_str(P(None, "fsdp", "tensor", None))
    assert tp["params/layers/attn/o/kernel"] == spec_str(P(None, "tensor", None, "fsdp"))
    assert tp["params/layers/mlp/gate/kernel"] == spec_str(P(None, "fsdp", "tensor"))
    assert tp["params/layers/mlp/down/kernel"] == spec_str(P(None, "tensor", "fsdp"))
    assert tp["params/embed/embedding"] == spec_str(P("tensor", "fsdp"))
    assert tp["params/lm_head/kernel"] == spec_str(P("fsdp", "tensor"))
    assert table["fsdp"]["params/layers/attn/q/kernel"] == spec_str(P(None, "fsdp", None, None))
    for preset in PRESETS:
        specs = table[preset]
        # Norm scales, step counters and the RNG key are replicated.
        for path, spec in specs.items():
            if "norm" in path or not path.startswith(("params", "opt_state")):
                assert spec in (spec_str(P(None)), spec_str(P(None, None)), spec_str(P())), (
                    preset,
                    path,
                    spec,
                )
        # Every Adam moment has exactly the layout of its parameter.
        params = {k[len("params/") :]: v for k, v in specs.items() if k.startswith("params/")}
        moments = [k for k in specs if k.startswith("opt_state/") and ("/mu/" in k or "/nu/" in k)]
        assert len(moments) == 2 * len(params)
        for path in moments:
            param_path = path.split("/mu/" if "/mu/" in path else "/nu/", 1)[1]
            assert specs[path] == params[param_path], (preset, path)
    # dp replicates every parameter.
    assert all(v in (spec_str(P(*([None] * n))) for n in range(5)) for k, v in table["dp"].items())
    rm = json.loads(GOLDEN.read_text())["rm"]["fsdp_tp"]
    assert rm["params/score/kernel"] == spec_str(P("fsdp", None))


def test_unmatched_large_parameter_is_an_error_and_small_leaves_are_replicated():
    mesh = mesh_222()
    with pytest.raises(ValueError, match="no sharding rule matches parameter params/adapter/kernel"):
        sharding.tree_specs(
            {"params": {"adapter": {"kernel": jax.ShapeDtypeStruct((512, 256), jnp.float32)}}}, "fsdp", mesh
        )
    specs = sharding.tree_specs(
        {"counter": jax.ShapeDtypeStruct((), jnp.int32), "tiny": jax.ShapeDtypeStruct((4, 4), jnp.float32)},
        "fsdp_tp",
        mesh,
    )
    assert specs == {"counter": P(), "tiny": P(None, None)}


def test_rule_with_the_wrong_rank_is_an_error():
    with pytest.raises(ValueError, match="axes"):
        sharding.tree_specs(
            {"mlp": {"down": {"kernel": jax.ShapeDtypeStruct((2, 3, 4, 5, 6), jnp.float32)}}},
            "fsdp",
            mesh_222(),
        )


def test_non_dividing_dimensions_are_replicated_with_a_warning():
    mesh = mesh_222("fsdp_tp")
    with pytest.warns(UserWarning, match="does not divide"):
        spec = sharding.spec_for(("layers", "embed", "mlp"), (2, 63, 128), "fsdp_tp", mesh)
    assert spec == P(None, None, "tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sharding.spec_for(("layers", "embed", "mlp"), (2, 64, 128), "fsdp_tp", mesh) == P(
            None, "fsdp", "tensor"
        )


def test_the_residual_stream_is_sequence_parallel_over_the_tensor_axis():
    # fsdp_tp_sp: between blocks (what full remat saves per layer) the activations' sequence is split over
    # "tensor"; one decode position or an odd width stays whole, without a warning; fsdp_tp keeps it whole.
    mesh = mesh_222("fsdp_tp_sp")
    axes = ("batch", "seq", "embed")
    assert sharding.spec_for(axes, (4, 8, 16), "fsdp_tp_sp", mesh) == P(("data", "fsdp"), "tensor", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sharding.spec_for(axes, (4, 1, 16), "fsdp_tp_sp", mesh) == P(("data", "fsdp"), None, None)
        assert sharding.spec_for(axes, (4, 7, 16), "fsdp_tp_sp", mesh) == P(("data", "fsdp"), None, None)
    assert sharding.spec_for(axes, (4, 8, 16), "fsdp_tp", mesh) == P(("data", "fsdp"), None, None)


def test_a_mesh_axis_is_used_once_per_array():
    # vocab and embed would both like "tensor"/"fsdp"; a second use of the same mesh axis is skipped.
    mesh = mesh_222("fsdp_tp")
    assert sharding.spec_for(("embed", "embed"), (64, 64), "fsdp_tp", mesh) == P("fsdp", None)


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(MeshConfig()).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    bad = [
        MeshConfig(data=3),
        MeshConfig(data=-1, fsdp=3),
        MeshConfig(data=-1, fsdp=-1),
        MeshConfig(data=2, fsdp=2, tensor=1),
        MeshConfig(data=4, fsdp=4),
        MeshConfig(preset="zero3"),
        MeshConfig(granule="node"),
    ]
    for cfg in bad:
        with pytest.raises(ConfigError):
            sharding.make_mesh(cfg)
    # One process is one granule: the plain mesh (two processes: tests/test_multihost.py).
    by_process = sharding.make_mesh(MeshConfig(data=2, fsdp=4, granule="process"))
    assert by_process.devices.tolist() == sharding.make_mesh(MeshConfig(data=2, fsdp=4)).devices.tolist()
    assert sharding.describe(by_process, MeshConfig(data=2, fsdp=4, granule="process")) == (
        "mesh: data=2 x fsdp=4 x tensor=1 (preset fsdp) over 8 devices in 1 process(es)"
    )


def test_check_batch():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, preset="fsdp_tp"))  # batch over 4 shards
    sharding.check_batch(8, 1, mesh, "fsdp_tp")
    sharding.check_batch(16, 4, mesh, "fsdp_tp")
    for batch_size, grad_accum in [(6, 1), (8, 4), (10, 2), (16, 3)]:
        with pytest.raises(ConfigError, match="batch"):
            sharding.check_batch(batch_size, grad_accum, mesh, "fsdp_tp")
    assert sharding.batch_divisor(mesh, "dp") == 4 and sharding.batch_divisor(mesh, "fsdp") == 4


def test_run_rejects_an_indivisible_batch_before_reading_data_or_compiling(tmp_path, monkeypatch, run_config):
    def fail(*args, **kwargs):
        raise AssertionError("the batch check must come before data and compilation")

    monkeypatch.setattr(train.pipeline, "build_stage_data", fail)
    monkeypatch.setattr(model_init, "init_params", fail)
    monkeypatch.setattr(steps, "make_step", fail)
    cfg = run_config("sft", **{"train.batch_size": 12})  # 8 data shards
    with pytest.raises(ConfigError, match="batch_size=12"):
        train.run(cfg, tmp_path / "run", log=lambda *_: None)


def _batch(stage: str, n=8, length=24, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, length) if stage == "sft" else (n, 2, length)
    tokens = rng.integers(3, TINY.vocab_size, shape).astype(np.int32)
    starts = rng.integers(4, 10, shape[:-1])
    ends = rng.integers(length - 8, length + 1, shape[:-1])
    position = np.arange(length)
    mask = ((position >= starts[..., None]) & (position < ends[..., None])).astype(np.int8)
    batch = {"tokens": tokens, "loss_mask": mask}
    if stage != "sft":
        batch["margin"] = rng.normal(size=n).astype(np.float32)
        batch["ref_logps"] = (-60.0 + 3.0 * rng.normal(size=(n, 2))).astype(np.float32)
    return batch


def _one_step(stage, mesh, preset, params, batch):
    """One train_step jitted by make_step for `mesh`: (new state, metrics) fetched to the host."""
    cfg = config_lib.override(Config(stage=stage), {"loss.beta": 0.1})
    graphdef, abstract_params = model_init.abstract_model(TINY)
    objective, totals_fn = steps.stage_objective(cfg, graphdef)
    tx, schedule = steps.make_optimizer(OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant"), 10)
    step_fn = functools.partial(
        steps.train_step, objective=objective, totals_fn=totals_fn, tx=tx, schedule=schedule
    )
    abstract = jax.eval_shape(lambda: steps.new_train_state(abstract_params, tx, 0, None))
    state_shardings = sharding.tree_shardings(abstract, preset, mesh)
    params = jax.device_put(params, sharding.tree_shardings(abstract_params, preset, mesh))
    state = jax.jit(lambda p: steps.new_train_state(p, tx, 0, None), out_shardings=state_shardings)(params)
    example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step = steps.make_step(step_fn, abstract, example, mesh, preset)
    state, metrics = step(
        state, jax.device_put(batch, sharding.batch_sharding(mesh, preset)), steps.loss_hparams(cfg)
    )
    if mesh.size > 1 and preset != "dp":
        # The layout really is sharded (not silently replicated).
        q = state.params["layers"]["attn"]["q"]["kernel"]
        assert q.sharding.spec == state_shardings.params["layers"]["attn"]["q"]["kernel"].spec
        assert q.addressable_shards[0].data.shape != q.shape
    return jax.device_get((state.params, state.opt_state, state.step)), jax.device_get(metrics)


@pytest.fixture(scope="module")
def tiny_params():
    return jax.device_get(model_init.init_params(TINY, 0, single_device_mesh(), "fsdp"))


@pytest.fixture(scope="module")
def unsharded_results(tiny_params):
    return {
        stage: _one_step(stage, single_device_mesh(), "fsdp", tiny_params, _batch(stage))
        for stage in ("sft", "dpo")
    }


@pytest.mark.parametrize("preset", (*PRESETS, "fsdp_tp_sp"))
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sharded_step_equals_unsharded(stage, preset, tiny_params, unsharded_results):
    mesh = mesh_222(preset)
    (params, opt_state, step), metrics = _one_step(stage, mesh, preset, tiny_params, _batch(stage))
    (ref_params, ref_opt_state, ref_step), ref_metrics = unsharded_results[stage]
    assert int(step) == int(ref_step) == 1
    assert set(metrics) == set(ref_metrics)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-5, err_msg=name)
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(tiny_params), strict=True)
    moved = max(float(np.max(np.abs(a - b))) for a, b in leaves)
    assert moved > 1e-4  # the step really updated the parameters
    ref_leaves = jax.tree.leaves((ref_params, ref_opt_state))
    for a, b in zip(jax.tree.leaves((params, opt_state)), ref_leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
