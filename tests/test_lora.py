"""LoRA: a fresh adapter is an exact no-op, the adapted forward equals the merged one, adapters are sharded by
their kernel's rule, only the adapters train, DPO's reference is the base with the adapters off, a LoRA DPO
run equals its merged weights evaluated as a full-weight model, and LoRA runs resume exactly."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl import checkpoint, evaluate, sharding, steps, train
from jaxrl import config as config_lib
from jaxrl import member as member_lib
from jaxrl.config import ConfigError, MeshConfig, ModelConfig
from jaxrl.data import pipeline
from jaxrl.metrics import read_metrics
from jaxrl.models import init as model_init
from jaxrl.models import lora
from jaxrl.validate import validate

TIMING = ("train/tokens_per_s", "train/tflops_per_s")
TINY = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32")


FSDP = MeshConfig(data=1, fsdp=-1)


def lora_model(rank=4, preset="fsdp", mesh_cfg=FSDP, **overrides):
    """(LoRA config, base params, LoRA params, mesh) of a tiny model."""
    cfg = dataclasses.replace(TINY, lora_rank=rank, **overrides)
    mesh = sharding.make_mesh(dataclasses.replace(mesh_cfg, preset=preset))
    base = model_init.init_params(lora.base_config(cfg), 0, mesh, preset)
    return cfg, base, lora.init_params(cfg, base, 0, mesh, preset), mesh


def randomised_b(params, scale=0.1):
    """The params with every B drawn at random (a trained adapter, not a no-op)."""
    key = iter(jax.random.split(jax.random.PRNGKey(7), 64))

    def draw(path, x):
        if sharding.path_str(path).endswith("lora_b"):
            return x + scale * jax.random.normal(next(key), x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(draw, params)


def logits(cfg, params, tokens):
    return nnx.merge(model_init.abstract_model(cfg)[0], params)(tokens)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 12)), jnp.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_fresh_adapter_is_an_exact_no_op(dtype):
    cfg, base, params, _ = lora_model(dtype=dtype)
    _, trainable = lora.split(params)
    names = {sharding.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(trainable)}
    assert names and {n.rsplit("/", 1)[-1] for n in names} == {"lora_a", "lora_b"}
    a_leaves = [x for n, x in names.items() if n.endswith("lora_a")]
    assert all(float(jnp.abs(a).max()) > 0 for a in a_leaves)  # A is random: the adapter can learn
    np.testing.assert_array_equal(logits(cfg, params, TOKENS), logits(lora.base_config(cfg), base, TOKENS))
    # The base's initialisation does not depend on whether adapters are configured.
    full = model_init.init_params(lora.base_config(cfg), 0, *lora_model()[3:], "fsdp")
    for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_adapted_forward_equals_the_merged_weights_and_adapters_off_is_the_base():
    cfg, base, params, _ = lora_model(lora_alpha=8.0)
    trained = randomised_b(params)
    out = logits(cfg, trained, TOKENS)
    base_out = logits(lora.base_config(cfg), base, TOKENS)
    assert float(jnp.abs(out - base_out).max()) > 1e-2  # the adapters change the model
    merged = lora.merge(trained, cfg)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(out, logits(lora.base_config(cfg), merged, TOKENS), atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(logits(cfg, lora.adapters_off(trained), TOKENS), base_out)
    # split / combine round-trip without copying the base.
    frozen, trainable = lora.split(trained)
    assert jax.tree.structure(lora.combine(frozen, trainable)) == jax.tree.structure(trained)
    assert lora.combine(frozen, trainable)["embed"]["embedding"] is trained["embed"]["embedding"]


def test_the_sampler_applies_the_adapters():
    from jaxrl import sampling

    cfg, _, params, _ = lora_model()
    trained = randomised_b(params, scale=0.5)
    graphdef = model_init.abstract_model(cfg)[0]
    base_graphdef = model_init.abstract_model(lora.base_config(cfg))[0]
    ids, mask = np.asarray(TOKENS[:, :6]), np.ones((4, 6), np.int32)
    key = jax.random.PRNGKey(0)
    kw = dict(max_new=6, eos_id=1, pad_id=0)
    adapted = sampling.sample(graphdef, trained, ids, mask, key, 0.0, **kw)
    merged = sampling.sample(base_graphdef, lora.merge(trained, cfg), ids, mask, key, 0.0, **kw)
    np.testing.assert_array_equal(adapted[0], merged[0])
    np.testing.assert_allclose(adapted[1], merged[1], atol=1e-4)


def test_a_scalar_model_trains_its_head_with_the_adapters():
    cfg, _, params, _ = lora_model(head="scalar")
    frozen, trainable = lora.split(params)
    assert "score" in trainable and "score" not in frozen
    assert "kernel" not in json.dumps(jax.tree.map(lambda _: 0, trainable["layers"]))


def test_adapters_are_sharded_by_their_kernels_rules_on_8_devices():
    cfg, _, params, mesh = lora_model(preset="fsdp_tp", mesh_cfg=MeshConfig(data=1, fsdp=4, tensor=2))
    specs = {sharding.path_str(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(params)}
    assert specs["layers/attn/q/lora_a"] == P(None, "fsdp", None)  # kernel (layers, embed, heads, head_dim)
    assert specs["layers/attn/q/lora_b"] == P(None, None, "tensor", None)
    assert specs["layers/attn/o/lora_a"] == P(None, "tensor", None, None)  # kernel (layers, heads, hd, embed)
    assert specs["layers/attn/o/lora_b"] == P(None, None, "fsdp")
    assert specs["layers/mlp/down/lora_a"] == P(None, "tensor", None)
    assert specs["layers/mlp/up/lora_b"] == P(None, None, "tensor")
    # Optimizer moments inherit the layout (the table is applied to the whole state).
    _, trainable = lora.split(params)
    state = jax.eval_shape(lambda: steps.new_train_state(trainable, optax.adam(1e-3), 0))
    moment_specs = sharding.tree_specs(state, "fsdp_tp", mesh)
    mu = moment_specs.opt_state[0].mu
    assert mu["layers"]["attn"]["q"]["lora_b"] == P(None, None, "tensor", None)
    # Sharded and unsharded forwards agree.
    trained = randomised_b(params)
    with sharding.use_mesh(mesh, "fsdp_tp"):
        sharded = jax.jit(lambda p: logits(cfg, p, TOKENS))(trained)
    single = jax.device_put(trained, jax.devices()[0])
    np.testing.assert_allclose(sharded, logits(cfg, single, TOKENS), atol=1e-5)


def test_config_checks_lora_settings():
    for key, value, message in [
        ("model.lora_rank", -1, "lora_rank"),
        ("model.lora_alpha", 0.0, "lora_alpha"),
        ("model.lora_targets", "lm_head/kernel$", "matches none"),
        ("model.lora_targets", "attn/(q", "not a regex"),
    ]:
        cfg = config_lib.override(config_lib.Config(), {"model.lora_rank": 4, key: value})
        with pytest.raises(ConfigError, match=message):
            validate(cfg)  # the regex is checked by the full validation (config itself is a leaf)
    only_q = config_lib.override(config_lib.Config(), {"model.lora_rank": 2, "model.lora_targets": "attn/q/"})
    _, abstract = model_init.abstract_model(config_lib.validate(only_q).model)
    assert "lora_a" in abstract["layers"]["attn"]["q"] and "lora_a" not in abstract["layers"]["mlp"]["up"]


def test_a_lora_step_updates_only_the_adapters():
    cfg, base, params, mesh = lora_model()
    frozen, trainable = lora.split(params)
    tx = optax.adam(1e-2)
    state = steps.new_train_state(trainable, tx, 0).replace(frozen=frozen)
    graphdef = model_init.abstract_model(cfg)[0]
    objective, totals_fn = steps.stage_objective(config_lib.Config(stage="sft", model=cfg), graphdef)
    batch = {"tokens": TOKENS, "loss_mask": jnp.ones_like(TOKENS, jnp.int8)}
    step = jax.jit(steps.bind_step(objective, totals_fn, (tx, optax.constant_schedule(1e-2)), 1))
    new, metrics = step(state, batch, None)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    for x, y in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(x, y)
    moved = [
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(trainable), strict=True)
    ]
    assert max(moved) > 0
    assert jax.tree.structure(new.opt_state) == jax.tree.structure(
        tx.init(trainable)
    )  # adapters' moments only


# ---- runs in the synthetic world


def train_rows(workdir) -> dict[int, dict]:
    rows = {}
    for row in read_metrics(workdir):
        if "train/loss" in row:
            rows[row["step"]] = {k: v for k, v in row.items() if k not in TIMING}
    return rows


def lora_dpo_config(run_config, sft_dir, **overrides):
    return run_config(
        "dpo",
        **{
            "train.init_from": str(sft_dir),
            "train.reference": "on_the_fly",
            "loss.beta": 0.3,
            "optim.lr": 1e-2,
            "model.lora_rank": 4,
            "model.lora_alpha": 8.0,
            "data.eval_prompts_per_domain": 2,
            "data.eval_samples": 2,
            "data.val_prompts_per_domain": 0,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def lora_dpo_run(sft_run, run_config, tmp_path_factory):
    """A finished LoRA DPO run from the tiny SFT run and the program that trained it: (cfg, dir, program)."""
    _, sft_dir = sft_run
    cfg = lora_dpo_config(run_config, sft_dir)
    workdir = tmp_path_factory.mktemp("lora_dpo")
    seen = {}

    class Spy(train.SoloProgram):
        def __init__(self, member):
            super().__init__(member)
            seen["program"] = self

    original, train.SoloProgram = train.SoloProgram, Spy
    try:
        train.run(cfg, workdir, log=lambda *_: None)
    finally:
        train.SoloProgram = original
    return cfg, workdir, seen["program"]


def load_final(model_cfg, workdir):
    mesh = sharding.make_mesh(MeshConfig())
    _, abstract = model_init.abstract_model(model_cfg)
    target = checkpoint.abstract_with_shardings(abstract, sharding.tree_shardings(abstract, "fsdp", mesh))
    return checkpoint.load_params(checkpoint.final_params_dir(workdir), target)


def test_lora_dpo_reference_is_the_base_and_the_base_is_unchanged(lora_dpo_run, sft_run):
    cfg, workdir, program = lora_dpo_run
    rows = train_rows(workdir)
    assert rows[1]["train/loss"] == pytest.approx(
        np.log(2.0), abs=1e-5
    )  # fresh adapters: policy == reference
    summary = json.loads((workdir / train.DONE_FILE).read_text())
    assert (
        summary["eval"]["loss"] < np.log(2.0) - 5e-3 and summary["eval"]["rewards/margins"] > 0
    )  # it learns
    # The state holds the base once (frozen) and the adapters; no separate reference copy.
    state = program.state
    assert state.ref_params is None and state.frozen is not None
    sft_params, _ = model_init.load_run_params(sft_run[1], sharding.make_mesh(MeshConfig()), "fsdp")
    for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(sft_params), strict=True):
        np.testing.assert_array_equal(x, y)
    # The final parameters are the adapters merged into that unchanged base.
    merged = lora.merge(steps.model_params(state), program.member.model_cfg)
    final = load_final(lora.base_config(program.member.model_cfg), workdir)
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(
        float(jnp.abs(x - y).max()) > 0
        for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(sft_params), strict=True)
    )


def test_lora_dpo_equals_its_merged_weights_evaluated_as_a_full_weight_model(lora_dpo_run, sft_run):
    cfg, workdir, program = lora_dpo_run
    summary = json.loads((workdir / train.DONE_FILE).read_text())
    full_cfg = config_lib.override(cfg, {"model.lora_rank": 0})
    mesh, preset = sharding.make_mesh(full_cfg.mesh), full_cfg.mesh.preset
    model_cfg = model_init.stage_model_config(full_cfg)
    graphdef = model_init.abstract_model(model_cfg)[0]
    merged = load_final(model_cfg, workdir)
    sft_params, _ = model_init.load_run_params(sft_run[1], mesh, preset)
    data = pipeline.build_stage_data(full_cfg)
    objective, totals_fn = steps.stage_objective(full_cfg, graphdef)
    eval_fn = lambda p, b, h, r, d: steps.eval_step(
        p, b, h, objective=objective, totals_fn=totals_fn, ref_params=r
    )
    eval_step = jax.jit(member_lib.with_mesh(eval_fn, mesh, preset))
    t = full_cfg.train
    full = train.evaluate(
        eval_step,
        merged,
        dict(data.eval),
        steps.loss_hparams(full_cfg),
        t.batch_size,
        mesh,
        preset,
        sft_params,
    )
    world, _ = evaluate.synthetic_eval(full_cfg, graphdef, merged, sft_params, data.tokenizer, split="test")
    expected = full | world
    assert expected.keys() <= summary["eval"].keys() and "gold_reward" in " ".join(world)
    for key, value in expected.items():
        assert summary["eval"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_lora_dpo_resume_is_exact(lora_dpo_run, tmp_path):
    cfg, full_dir, _ = lora_dpo_run
    resumed_dir = tmp_path / "resumed"
    assert train.run(cfg, resumed_dir, log=lambda *_: None, stop_after=6) == {"stopped_at": 6}
    lines = []
    train.run(cfg, resumed_dir, log=lines.append)
    assert any("resumed" in line and "step 6" in line for line in lines), lines
    full, resumed = train_rows(full_dir), train_rows(resumed_dir)
    assert sorted(full) == sorted(resumed) == list(range(1, cfg.train.steps + 1))
    for step in full:
        assert resumed[step] == full[step], step
    a = json.loads((full_dir / train.DONE_FILE).read_text())["eval"]
    b = json.loads((resumed_dir / train.DONE_FILE).read_text())["eval"]
    assert a == b
    model_cfg = lora.base_config(model_init.stage_model_config(cfg))
    for x, y in zip(
        jax.tree.leaves(load_final(model_cfg, full_dir)),
        jax.tree.leaves(load_final(model_cfg, resumed_dir)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)


def test_lora_dpo_with_cached_reference_starts_at_log_2(sft_run, run_config, tmp_path):
    cfg = lora_dpo_config(
        run_config,
        sft_run[1],
        **{"train.reference": "cache", "train.steps": 2, "data.eval_prompts_per_domain": 0},
    )
    train.run(cfg, tmp_path, log=lambda *_: None)
    assert train_rows(tmp_path)[1]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-5)


def test_lora_reward_model_trains_adapters_and_head(sft_run, run_config, tmp_path):
    cfg = run_config(
        "rm", **{"train.init_from": str(sft_run[1]), "model.lora_rank": 4, "optim.lr": 1e-2, "train.steps": 8}
    )
    summary = train.run(cfg, tmp_path, log=lambda *_: None)
    rows = train_rows(tmp_path)
    assert summary["status"] == "finished" and all(np.isfinite(r["train/loss"]) for r in rows.values())
    assert rows[8]["train/loss"] < rows[1]["train/loss"]
    # Exported as a full reward model: a scalar head and no adapter leaves.
    params, model_cfg = model_init.load_run_params(tmp_path, sharding.make_mesh(MeshConfig()), "fsdp")
    assert model_cfg.lora_rank == 0 and model_cfg.head == "scalar" and "score" in params


LORA_RL = {
    "rl.verifiable": "gold",
    "rl.value_init": "policy",
    "rl.num_prompts": 64,
    "rl.rollout_batch": 8,
    "rl.minibatch": 8,
    "rl.max_new_tokens": 8,
    "optim.lr": 1e-2,
    "optim.schedule": "constant",
    "optim.warmup_ratio": 0.0,
    "model.lora_rank": 4,
    "train.steps": 3,
    "train.checkpoint_every": 1,
    "data.eval_prompts_per_domain": 1,
    "data.eval_samples": 1,
    "data.val_prompts_per_domain": 1,
}


def rl_rows(workdir) -> dict[int, dict]:
    drop = lambda k: k.startswith("time/") or k in TIMING
    return {
        r["step"]: {k: v for k, v in r.items() if not drop(k)}
        for r in read_metrics(workdir)
        if "objective/scores" in r
    }


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_lora_rl_trains_the_adapters_over_a_frozen_base_and_resumes_exactly(
    stage, sft_run, run_config, tmp_path, monkeypatch
):
    from jaxrl.rl import runner

    overrides = {**LORA_RL, "train.init_from": str(sft_run[1])}
    if stage == "grpo":
        overrides["rl.samples_per_prompt"] = 2
    cfg = run_config(stage, **overrides)
    seen = {}
    iterate = runner.iterate

    def spy(ctx, state, *args, **kwargs):
        seen.setdefault("first", jax.device_get(state.policy.params))  # before the update donates it
        seen["state"], values = iterate(ctx, state, *args, **kwargs)
        return seen["state"], values

    monkeypatch.setattr(runner, "iterate", spy)
    summary = train.run(cfg, tmp_path / "full", log=lambda *_: None)
    rows = rl_rows(tmp_path / "full")
    assert summary["status"] == "finished" and sorted(rows) == [1, 2, 3]
    assert all(np.isfinite(v) for r in rows.values() for v in r.values() if isinstance(v, float))
    # The first rollout's policy is the reference exactly (fresh adapters over the base, adapters off).
    assert abs(rows[1]["objective/kl"]) < 1e-6 and rows[3]["objective/kl"] > 1e-4
    state = seen["state"]
    mesh = sharding.make_mesh(MeshConfig())
    sft_params, _ = model_init.load_run_params(sft_run[1], mesh, "fsdp")
    for x, y in zip(jax.tree.leaves(state.policy.frozen), jax.tree.leaves(sft_params), strict=True):
        np.testing.assert_array_equal(x, y)
    names = {
        sharding.path_str(p).rsplit("/", 1)[-1]
        for p, _ in jax.tree_util.tree_leaves_with_path(state.policy.params)
    }
    assert names == {"lora_a", "lora_b"}
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.policy.params, seen["first"])
    assert max(jax.tree.leaves(moved)) > 0
    if stage == "ppo":  # the value model (from the merged policy, a fresh head) trains in full
        assert "kernel" in state.value.params["layers"]["attn"]["q"] and state.value.frozen is None
    final = load_final(lora.base_config(model_init.stage_model_config(cfg)), tmp_path / "full")
    merged = lora.merge(steps.model_params(state.policy), cfg.model)
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(x, y)
    # Checkpoints hold the adapters, not the base; a stopped and resumed run logs the same rows.
    assert train.run(cfg, tmp_path / "resumed", log=lambda *_: None, stop_after=1) == {"stopped_at": 1}
    train.run(cfg, tmp_path / "resumed", log=lambda *_: None)
    assert rl_rows(tmp_path / "resumed") == rows


def test_jaxrl_convert_exports_a_lora_run_with_its_adapters_merged(lora_dpo_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxrl import convert

    cfg, workdir, program = lora_dpo_run
    convert.run_to_hf(workdir, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 10))
    with torch.no_grad():
        exported = model(torch.tensor(ids)).logits.numpy()
    # The run's own forward: the adapters applied over the frozen base (not merged).
    adapted = logits(program.member.model_cfg, steps.model_params(program.state), jnp.asarray(ids))
    np.testing.assert_allclose(exported, np.asarray(adapted), atol=1e-4, rtol=1e-4)


def test_preflight_holds_a_lora_runs_base_once_and_only_the_adapters_moments(run_config):
    from jaxrl import preflight

    wide = {"mesh.data": 1, "mesh.fsdp": -1, "model.lora_rank": 2, "model.hidden": 256, "model.mlp": 512}
    report = preflight.run(run_config("dpo", **wide), "v5e-8", backend="cpu", log=lambda *_: None)
    assert [p.name for p in report.programs] == ["train_step", "reference_logps"]
    held = {h.name: h.bytes for h in report.holdings}
    assert set(held) == {"train params", "train optimizer state", "train frozen base params"}
    assert held["train params"] < held["train frozen base params"] / 4
    assert held["train optimizer state"] < 3 * held["train params"]  # Adam's two moments of the adapters only
    assert report.programs[1].holdings == ("train frozen base params",)  # the reference pass reads the base
    # The base is an argument of the step that is not donated: only the adapters and moments alias.
    train_step = report.programs[0]
    assert 0 < train_step.aliased < held["train frozen base params"]
    grpo = run_config(
        "grpo",
        **{
            "mesh.data": 1,
            "mesh.fsdp": -1,
            "model.lora_rank": 4,
            "rl.verifiable": "gold",
            "rl.rollout_batch": 8,
            "rl.samples_per_prompt": 2,
            "rl.minibatch": 16,
            "rl.max_new_tokens": 8,
        },
    )
    report = preflight.run(grpo, "v5e-8", backend="cpu", log=lambda *_: None)
    assert {h.name for h in report.holdings} == {
        "policy params",
        "policy optimizer state",
        "reference params",
    }
    assert report.fits and report.programs[0].holdings == ("policy params", "reference params")


def test_lora_sft_from_a_random_base_trains_and_exports_a_full_model(run_config, tmp_path):
    cfg = run_config("sft", **{"model.lora_rank": 8, "optim.lr": 3e-2, "train.steps": 8})
    summary = train.run(cfg, tmp_path, log=lambda *_: None)
    rows = train_rows(tmp_path)
    assert summary["status"] == "finished" and rows[8]["train/loss"] < rows[1]["train/loss"] - 0.05
    model_cfg = model_init.stage_model_config(cfg)
    mesh = sharding.make_mesh(MeshConfig())
    final, loaded_cfg = model_init.load_run_params(tmp_path, mesh, "fsdp")
    assert loaded_cfg == lora.base_config(model_cfg)
    # Only the targeted kernels moved from the seed's base, each by a rank-8 update.
    base = model_init.init_params(lora.base_config(model_cfg), cfg.seed, mesh, "fsdp")
    np.testing.assert_array_equal(final["embed"]["embedding"], base["embed"]["embedding"])
    delta = np.asarray(final["layers"]["mlp"]["up"]["kernel"][0] - base["layers"]["mlp"]["up"]["kernel"][0])
    assert np.abs(delta).max() > 0 and np.linalg.matrix_rank(delta, tol=1e-6) <= 8
