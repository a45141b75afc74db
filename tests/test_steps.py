"""Train steps: the loss falls, accumulation invariance, non-finite skipping, hparams as arrays, reference
log-probs (on the fly == cached) and the content-hashed reference cache."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl import config as config_lib
from jaxrl import reference, sharding, steps
from jaxrl.config import Config, MeshConfig, ModelConfig, OptimConfig
from jaxrl.data import pipeline
from jaxrl.models import init as model_init

TINY = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32")
LOG2 = math.log(2.0)
PRESET = "fsdp"


@functools.cache
def mesh1():
    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, preset=PRESET), devices=jax.devices()[:1])


@functools.cache
def initial_params(head: str, seed: int = 0):
    """Host copies of freshly initialised params (lm or scalar head)."""
    model_cfg = ModelConfig(**{**TINY.__dict__, "head": head})
    return jax.device_get(model_init.init_params(model_cfg, seed, mesh1(), PRESET))


def make_batch(stage: str, n: int = 8, length: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens with a prompt prefix (mask 0), a completion (mask 1) and right padding (mask 0)."""
    rng = np.random.default_rng(seed)
    shape = (n, length) if stage == "sft" else (n, 2, length)
    tokens = rng.integers(3, TINY.vocab_size, shape).astype(np.int32)
    starts = rng.integers(4, 10, shape[:-1])
    ends = rng.integers(length - 8, length + 1, shape[:-1])
    position = np.arange(length)
    mask = ((position >= starts[..., None]) & (position < ends[..., None])).astype(np.int8)
    if stage != "sft":
        tokens[:, 1, :4] = tokens[:, 0, :4]  # a shared prompt
    batch = {"tokens": tokens, "loss_mask": mask}
    if stage != "sft":
        batch["margin"] = rng.normal(size=n).astype(np.float32)
    return batch


class Setup:
    """A jitted step for a stage on one device, with its initial state, loss hparams and config."""

    def __init__(
        self, stage, *, grad_accum=1, lr=1e-3, donate=False, ref_params=None, objective_wrapper=None, **loss
    ):
        self.cfg = config_lib.override(
            Config(stage=stage, model=TINY), {f"loss.{k}": v for k, v in loss.items()}
        )
        model_cfg = model_init.stage_model_config(self.cfg)
        self.graphdef, abstract_params = model_init.abstract_model(model_cfg)
        objective, totals_fn = steps.stage_objective(self.cfg, self.graphdef)
        if objective_wrapper is not None:
            objective = objective_wrapper(objective)
        tx, schedule = steps.make_optimizer(OptimConfig(lr=lr, warmup_ratio=0.0, schedule="constant"), 100)
        self.step_fn = functools.partial(
            steps.train_step,
            objective=objective,
            totals_fn=totals_fn,
            tx=tx,
            schedule=schedule,
            grad_accum=grad_accum,
        )
        self.params = initial_params(model_cfg.head)
        self.state = steps.new_train_state(self.params, tx, 0, ref_params)
        self.hp = steps.loss_hparams(self.cfg)
        self.tx = tx

    def jit(self, batch, donate=False):
        example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        return steps.make_step(
            self.step_fn, jax.eval_shape(lambda: self.state), example, mesh1(), PRESET, donate=donate
        )


def with_reference(batch, graphdef, params):
    """The batch plus cached-style reference log-probs [N, 2] computed by the reference module."""
    ref = reference.compute_reference_logps(
        graphdef, params, batch, batch_size=4, mesh=mesh1(), preset=PRESET
    )
    return dict(batch, ref_logps=ref)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def train_losses(setup: Setup, batch, n_steps: int):
    step = setup.jit(batch, donate=True)
    state, losses = setup.state, []
    for _ in range(n_steps):
        state, metrics = step(state, batch, setup.hp)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == n_steps and int(state.skipped) == 0
    return losses, metrics


def test_sft_loss_falls_on_a_fixed_batch():
    losses, metrics = train_losses(Setup("sft", lr=3e-3), make_batch("sft"), 25)
    assert abs(losses[0] - math.log(TINY.vocab_size)) < 0.3  # an untrained model is near uniform
    assert losses[-1] < 0.7 * losses[0], losses
    assert float(metrics["grad_norm"]) > 0 and float(metrics["learning_rate"]) == pytest.approx(3e-3)


def test_reward_model_loss_falls_on_a_fixed_batch():
    losses, metrics = train_losses(Setup("rm", lr=3e-3), make_batch("rm"), 25)
    assert abs(losses[0] - LOG2) < 0.05
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(metrics["accuracy"]) == 1.0


def test_dpo_starts_at_log2_when_policy_is_the_reference_and_falls():
    setup = Setup("dpo", lr=3e-3, beta=0.1)
    batch = with_reference(make_batch("dpo"), setup.graphdef, setup.params)
    losses, metrics = train_losses(setup, batch, 25)
    assert losses[0] == pytest.approx(LOG2, abs=1e-5)
    assert losses[-1] < 0.6 * LOG2, losses
    assert float(metrics["rewards/accuracies"]) == 1.0 and float(metrics["rewards/margins"]) > 0


ACCUM_CASES = {
    "sft_token_mean": ("sft", dict(sft_aggregation="token_mean")),
    "sft_sequence_mean": ("sft", dict(sft_aggregation="sequence_mean")),
    "rm": ("rm", {}),
    "dpo": ("dpo", dict(beta=0.1)),
}


@pytest.mark.parametrize("case", list(ACCUM_CASES))
def test_gradient_accumulation_does_not_change_loss_metrics_or_params(case):
    stage, loss = ACCUM_CASES[case]
    batch = make_batch(stage, seed=3)
    if stage == "sft":
        batch["loss_mask"][1] = 0  # a row without targets: it must count in neither denominator
    results = {}
    for grad_accum in (1, 2, 4):
        setup = Setup(stage, grad_accum=grad_accum, **loss)
        if stage == "dpo":
            batch = with_reference(make_batch(stage, seed=3), setup.graphdef, initial_params("lm", seed=1))
        step = setup.jit(batch)
        state, history = setup.state, []
        for _ in range(2):
            state, metrics = step(state, batch, setup.hp)
            history.append(host(metrics))
        results[grad_accum] = (history, host(state.params))
    history_1, params_1 = results[1]
    for grad_accum in (2, 4):
        history, params = results[grad_accum]
        for metrics_1, metrics in zip(history_1, history, strict=True):
            assert set(metrics) == set(metrics_1)
            for name in metrics_1:
                np.testing.assert_allclose(
                    metrics[name],
                    metrics_1[name],
                    rtol=1e-5,
                    atol=1e-5,
                    err_msg=f"{name} with grad_accum={grad_accum}",
                )
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(history_1[0]["loss"], history_1[1]["loss"])  # the first step did something


def _device_put_inputs(setup, batch, hp):
    device = mesh1().devices.flat[0]
    state_shardings = sharding.tree_shardings(jax.eval_shape(lambda: setup.state), PRESET, mesh1())
    return (
        jax.device_put(setup.state, state_shardings),
        jax.device_put(batch, sharding.batch_sharding(mesh1(), PRESET)),
        jax.device_put(hp, device),
    )


@pytest.mark.parametrize(
    "stage,poison", [("dpo", dict(beta=float("nan"))), ("rm", dict(rm_center=float("inf")))]
)
def test_non_finite_step_is_skipped_and_the_next_one_proceeds(stage, poison):
    setup = Setup(stage, beta=0.1)
    batch = make_batch(stage)
    if stage == "dpo":
        batch = with_reference(batch, setup.graphdef, initial_params("lm", seed=1))
    step = setup.jit(batch)
    bad_hp = setup.hp.replace(**{k: jnp.asarray(v, jnp.float32) for k, v in poison.items()})
    state, batch_d, bad_hp = _device_put_inputs(setup, batch, bad_hp)
    good_hp = jax.device_put(setup.hp, mesh1().devices.flat[0])
    before = host((state.params, state.opt_state))
    # Every input is already on device: the step itself must not copy anything between host and device.
    with jax.transfer_guard("disallow"):
        state, metrics = step(state, batch_d, bad_hp)
        skipped_state = state
        state, good_metrics = step(state, batch_d, good_hp)
    assert not np.isfinite(float(metrics["loss"]))
    skipped_params, skipped_opt = host((skipped_state.params, skipped_state.opt_state))
    for a, b in zip(jax.tree.leaves((skipped_params, skipped_opt)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: nothing of the bad update leaked in
    assert int(skipped_state.skipped) == 1 and int(skipped_state.step) == 0
    assert int(metrics["skipped_steps"]) == 1
    assert np.isfinite(float(good_metrics["loss"]))
    assert int(state.skipped) == 1 and int(state.step) == 1
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(before[0]), strict=True)
    ]
    assert any(moved) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host(state.params)))


def test_new_hparam_values_do_not_recompile_and_hparams_vmap():
    traces = []

    def counting(objective):
        def wrapped(*args, **kwargs):
            traces.append(1)  # runs once per trace, never per call
            return objective(*args, **kwargs)

        return wrapped

    setup = Setup("dpo", beta=0.1, objective_wrapper=counting)
    batch = with_reference(make_batch("dpo"), setup.graphdef, initial_params("lm", seed=1))
    step = setup.jit(batch)
    _, metrics_a = step(setup.state, batch, setup.hp)
    n_traces = len(traces)
    _, metrics_b = step(setup.state, batch, setup.hp.replace(beta=jnp.asarray(0.5, jnp.float32)))
    assert len(traces) == n_traces and step._cache_size() == 1
    # The new beta is really used: rewards are beta times the (unchanged) log-ratios.
    np.testing.assert_allclose(metrics_b["rewards/chosen"], 5 * metrics_a["rewards/chosen"], rtol=1e-5)
    assert not np.isclose(float(metrics_a["loss"]), float(metrics_b["loss"]))
    # A stack of hparams runs in one program under vmap.
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), setup.hp, setup.hp.replace(beta=jnp.asarray(0.5)))
    _, vmapped = jax.jit(jax.vmap(setup.step_fn, in_axes=(None, None, 0)))(setup.state, batch, stacked)
    np.testing.assert_allclose(vmapped["loss"], [metrics_a["loss"], metrics_b["loss"]], rtol=1e-5)


def test_on_the_fly_reference_equals_cached_reference_logps():
    ref_params = initial_params("lm", seed=1)
    batch = make_batch("dpo", seed=5)
    on_the_fly = Setup("dpo", beta=0.2, ref_params=ref_params)
    cached = Setup("dpo", beta=0.2)
    cached_batch = with_reference(batch, cached.graphdef, ref_params)
    state_a, metrics_a = on_the_fly.jit(batch)(on_the_fly.state, batch, on_the_fly.hp)
    state_b, metrics_b = cached.jit(cached_batch)(cached.state, cached_batch, cached.hp)
    assert abs(float(metrics_a["loss"]) - LOG2) > 1e-3  # policy != reference, so the check has teeth
    assert set(metrics_a) == set(metrics_b)
    for name in metrics_a:
        np.testing.assert_allclose(metrics_a[name], metrics_b[name], rtol=1e-5, atol=1e-5, err_msg=name)
    for a, b in zip(*(jax.tree.leaves(host(s.params)) for s in (state_a, state_b)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The reference is frozen: it comes out of the step unchanged.
    for a, b in zip(jax.tree.leaves(host(state_a.ref_params)), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_compute_reference_logps_covers_every_row_when_batches_wrap():
    graphdef, _ = model_init.abstract_model(TINY)
    params = initial_params("lm")
    arrays = make_batch("dpo", n=10)
    logps = reference.compute_reference_logps(
        graphdef, params, arrays, batch_size=4, mesh=mesh1(), preset=PRESET
    )
    from flax import nnx

    direct, _ = steps.policy_seq_logps(nnx.merge(graphdef, params), arrays)
    assert logps.shape == (10, 2)
    np.testing.assert_allclose(logps, direct, rtol=1e-5, atol=1e-4)
    # Length-sorted, bucket-cut batches give the same log-probs, back in the rows' own order.
    lengths = pipeline.example_lengths(arrays)
    assert len(set(lengths.tolist())) > 1 and lengths.max() <= arrays["tokens"].shape[-1]
    bucketed = reference.compute_reference_logps(
        graphdef, params, arrays, batch_size=4, mesh=mesh1(), preset=PRESET, bucket_multiple=2
    )
    np.testing.assert_allclose(bucketed, direct, rtol=1e-5, atol=1e-4)


def test_reference_cache_hits_and_misses(tmp_path):
    graphdef, _ = model_init.abstract_model(TINY)
    params = initial_params("lm")
    arrays = make_batch("dpo", n=8)
    kw = dict(batch_size=8, mesh=mesh1(), preset=PRESET, log=lambda *_: None)
    first, path, hit = reference.cached_reference_logps(tmp_path, graphdef, params, arrays, **kw)
    assert not hit and path.exists()
    again, path_again, hit_again = reference.cached_reference_logps(tmp_path, graphdef, params, arrays, **kw)
    assert hit_again and path_again == path
    np.testing.assert_array_equal(again, first)

    other_params = jax.tree.map(lambda x: x, params)
    other_params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 1.5
    other, other_path, other_hit = reference.cached_reference_logps(
        tmp_path, graphdef, other_params, arrays, **kw
    )
    assert not other_hit and other_path != path and not np.allclose(other, first)

    other_tokens = dict(arrays, tokens=arrays["tokens"].copy())
    other_tokens["tokens"][0, 0, -1] = (other_tokens["tokens"][0, 0, -1] + 1) % TINY.vocab_size
    _, tokens_path, tokens_hit = reference.cached_reference_logps(
        tmp_path, graphdef, params, other_tokens, **kw
    )
    assert not tokens_hit and tokens_path not in (path, other_path)
    assert len(list((tmp_path / "ref_logps").glob("*.npy"))) == 3


def test_params_fingerprint_sees_one_changed_element():
    params = initial_params("lm")
    base = reference.params_fingerprint(params)
    assert reference.params_fingerprint(jax.tree.map(np.copy, params)) == base
    changed = jax.tree.map(np.copy, params)
    changed["layers"]["mlp"]["up"]["kernel"][1, 3, 5] += 1e-3
    assert reference.params_fingerprint(changed) != base
    swapped = jax.tree.map(np.copy, params)
    row = swapped["embed"]["embedding"]
    row[[4, 9]] = row[[9, 4]]  # same multiset of values, different positions
    assert reference.params_fingerprint(swapped) != base


def test_weight_decay_skips_norm_scales_and_biases_even_when_stacked():
    ones = lambda *shape: jnp.ones(shape, jnp.float32)  # noqa: E731
    params = {
        "embed": {"embedding": ones(8, 4)},
        "layers": {
            "attn_norm": {"scale": ones(2, 4)},
            "attn": {
                "q": {"kernel": ones(2, 4, 2, 2), "bias": ones(2, 2, 2)},
                "q_norm": {"scale": ones(2, 2)},
            },
        },
        "final_norm": {"scale": ones(4)},
    }
    optim = OptimConfig(lr=0.1, weight_decay=0.5, warmup_ratio=0.0, schedule="constant")
    tx, _ = steps.make_optimizer(optim, 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    flat = jax.tree_util.tree_leaves_with_path(updates)
    moved = {sharding.path_str(path): bool(jnp.any(u != 0)) for path, u in flat}
    assert moved == {
        "embed/embedding": True,
        "layers/attn_norm/scale": False,
        "layers/attn/q/kernel": True,
        "layers/attn/q/bias": False,
        "layers/attn/q_norm/scale": False,
        "final_norm/scale": False,
    }


def test_bco_pair_carries_its_reward_shift_across_steps_and_resume(tmp_path, sft_run):
    """bco_pair's δ is the running mean of the steps' mean implicit rewards (chosen and rejected alike),
    carried in the train state: logged as train/reward_shift, checkpointed, and resumed exactly."""
    import json

    from conftest import tiny_run_config

    from jaxrl import train

    _, base = sft_run
    cfg = tiny_run_config(
        "dpo",
        **{
            "loss.name": "bco_pair",
            "train.init_from": str(base),
            "train.steps": 6,
            "optim.lr": 3e-3,
            "loss.beta": 0.5,
        },
    )
    quiet = lambda *a, **k: None  # noqa: E731
    train.run(cfg, tmp_path / "whole", log=quiet)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    means = [0.5 * (r["train/rewards/chosen"] + r["train/rewards/rejected"]) for r in train_rows]
    expected = np.cumsum(means) / np.arange(1, len(means) + 1)
    np.testing.assert_allclose([r["train/reward_shift"] for r in train_rows], expected, rtol=1e-5, atol=1e-7)
    assert abs(expected[-1]) > 1e-4  # the shift moved, so the steps after the first used it
    train.run(cfg, tmp_path / "resumed", log=quiet, stop_after=4)
    train.run(cfg, tmp_path / "resumed", log=quiet)
    again = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, again, strict=True):
        for key in ("train/loss", "train/reward_shift", "eval/loss"):
            if key in a:
                assert a[key] == b[key], key
