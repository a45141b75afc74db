"""Length buckets and packing: the batches they make, and that the losses and gradients on them equal those on
max_len-padded rows; end to end through train.run, resume included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_checkpoint import assert_same_run, train_rows

from jaxrl import config as config_lib
from jaxrl import losses, steps, train
from jaxrl.config import ConfigError
from jaxrl.data import pipeline
from jaxrl.models.transformer import Transformer
from jaxrl.validate import validate

PAD = 0


def ragged_rows(lengths, T, *, seed=0, prompt=3, vocab=50):
    """Right-padded rows [N, T] of random tokens; the loss on positions [prompt, length)."""
    rng = np.random.default_rng(seed)
    tokens = np.full((len(lengths), T), PAD, np.int32)
    mask = np.zeros((len(lengths), T), np.int8)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(1, vocab, n)
        mask[i, min(prompt, n - 1) : n] = 1
    return {"tokens": tokens, "loss_mask": mask}


def test_used_lengths_and_bucket_width():
    arrays = ragged_rows([5, 17, 9, 3], 40)
    np.testing.assert_array_equal(pipeline.used_lengths(arrays["loss_mask"]), [5, 17, 9, 3])
    assert pipeline.used_lengths(np.zeros((2, 2, 8), np.int8)).tolist() == [[0, 0], [0, 0]]
    lengths = pipeline.example_lengths(arrays)
    assert pipeline.bucket_width(lengths, np.array([0, 2, 3]), 8, 40) == 16  # longest 9 -> 16
    assert pipeline.bucket_width(lengths, np.array([0, 1]), 8, 40) == 24
    assert pipeline.bucket_width(lengths, np.array([1]), 64, 40) == 40  # never wider than the arrays
    pairs = {"loss_mask": np.stack([arrays["loss_mask"], arrays["loss_mask"][::-1]], axis=1)}
    np.testing.assert_array_equal(pipeline.example_lengths(pairs), [5, 17, 17, 5])  # a pair's longer row
    batch = pipeline.host_batch({**arrays, "margin": np.arange(4.0)}, np.array([2, 0]), width=16)
    assert batch["tokens"].shape == (2, 16) and batch["loss_mask"].shape == (2, 16)
    np.testing.assert_array_equal(batch["margin"], [2.0, 0.0])  # per-example arrays are not cut


def test_length_grouped_order_is_a_per_epoch_permutation_of_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, 1000)
    order = pipeline.BatchOrder(1000, 16, seed=5, lengths=lengths, group=8)
    per_epoch = 1000 // 16
    for epoch in range(2):
        batches = [order.indices(epoch * per_epoch + k) for k in range(per_epoch)]
        seen = np.concatenate(batches)
        assert len(set(seen.tolist())) == len(seen) == per_epoch * 16  # no example twice within an epoch
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    plain = pipeline.BatchOrder(1000, 16, seed=5)
    plain_spread = np.mean([np.ptp(lengths[plain.indices(k)]) for k in range(per_epoch)])
    assert spread < plain_spread / 4  # batches hold similar lengths
    # A pure function of the step, whatever was asked before (resume starts anywhere).
    fresh = pipeline.BatchOrder(1000, 16, seed=5, lengths=lengths, group=8)
    np.testing.assert_array_equal(fresh.indices(per_epoch + 3), order.indices(per_epoch + 3))
    np.testing.assert_array_equal(fresh.indices(2), order.indices(2))
    other = pipeline.BatchOrder(1000, 16, seed=6, lengths=lengths, group=8)
    assert not np.array_equal(other.indices(0), order.indices(0))


def test_pack_keeps_every_conversation_once_and_apart():
    lengths = np.random.default_rng(1).integers(4, 30, 200)
    arrays = ragged_rows(lengths, 32)
    packed = pipeline.pack(arrays, pad_id=PAD, seed=0)
    rows = packed["tokens"].shape[0]
    assert rows < len(lengths) * 0.75  # packing needs far fewer rows
    assert pipeline.padding_fraction(packed) < 0.15 < pipeline.padding_fraction(arrays)
    found = []
    for r in range(rows):
        seg = packed["segment_ids"][r]
        ids = [s for s in np.unique(seg) if s]
        assert ids == list(range(1, len(ids) + 1))
        assert np.all(packed["tokens"][r][seg == 0] == PAD) and np.all(packed["loss_mask"][r][seg == 0] == 0)
        for s in ids:
            where = np.flatnonzero(seg == s)
            assert np.all(np.diff(where) == 1)  # contiguous
            np.testing.assert_array_equal(packed["positions"][r][where], np.arange(len(where)))
            assert packed["loss_mask"][r][where[0]] == 0  # nothing in the conversation predicts its 1st token
            found.append(tuple(packed["tokens"][r][where]))
    original = sorted(tuple(arrays["tokens"][i, :n]) for i, n in enumerate(lengths))
    assert sorted(found) == original  # each conversation exactly once, whole
    again = pipeline.pack(arrays, pad_id=PAD, seed=0)
    assert all(np.array_equal(again[k], packed[k]) for k in packed)  # a pure function of the seed
    assert not np.array_equal(pipeline.pack(arrays, pad_id=PAD, seed=1)["tokens"], packed["tokens"])


def _tiny_model(head="lm"):
    cfg = config_lib.ModelConfig(
        vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32", head=head
    )
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    return graphdef, nnx.to_pure_dict(state)


def _loss_and_grads(objective, totals_fn, params, batch, hp=None):
    batch = jax.tree.map(jnp.asarray, batch)
    totals = totals_fn(batch)
    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, hp, totals)
    return float(loss), grads


def _assert_close_trees(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_packed_sft_loss_and_gradients_equal_the_unpacked(aggregation):
    graphdef, params = _tiny_model()
    arrays = ragged_rows([7, 12, 5, 20, 9, 3, 15, 11], 24, vocab=64)
    packed = pipeline.pack(arrays, pad_id=PAD, seed=0)
    assert packed["tokens"].shape[0] < 8
    objective = lambda p, b, hp, tot: steps.sft_objective(
        p, b, hp, tot, graphdef=graphdef, aggregation=aggregation
    )
    totals_fn = lambda b: steps.sft_totals(b, aggregation)
    unpacked = {k: v.copy() for k, v in arrays.items()}
    unpacked["loss_mask"][:, 0] = 0  # as pack() does (already 0 here: the prompt comes first)
    loss_u, grads_u = _loss_and_grads(objective, totals_fn, params, unpacked)
    loss_p, grads_p = _loss_and_grads(objective, totals_fn, params, packed)
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    _assert_close_trees(grads_p, grads_u, atol=1e-6)
    # Without the segment ids the same packed rows give another loss: the check above can fail.
    leaky = {k: v for k, v in packed.items() if k not in ("segment_ids", "positions")}
    assert _loss_and_grads(objective, totals_fn, params, leaky)[0] != pytest.approx(loss_u, rel=1e-5)


def test_sequence_mean_over_packed_segments_by_hand():
    logp = -jnp.arange(1.0, 9.0).reshape(1, 8)
    mask = jnp.array([[0, 1, 1, 0, 1, 1, 1, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    denom = losses.sft_denominator(mask, "sequence_mean", seg)
    assert float(denom) == 2.0
    loss = losses.sft_token_loss(
        logp, mask, aggregation="sequence_mean", denominator=denom, segment_ids_BT=seg
    )
    assert float(loss) == pytest.approx(((2 + 3) / 2 + (5 + 6 + 7) / 3) / 2)


def _pairs(T, seed):
    rows = ragged_rows([9, 14, 6, 11, 8, 13, 10, 7], T, seed=seed, vocab=64)
    return {k: v.reshape(4, 2, T) for k, v in rows.items()} | {"margin": np.zeros(4, np.float32)}


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_a_bucketed_batch_gives_the_max_len_loss_and_gradients(stage):
    graphdef, params = _tiny_model("scalar" if stage == "rm" else "lm")
    T = 32
    arrays = ragged_rows([9, 14, 6, 11, 8, 13, 10, 7], T, vocab=64) if stage == "sft" else _pairs(T, 0)
    cfg = config_lib.Config(stage=stage)
    objective, totals_fn = steps.stage_objective(cfg, graphdef)
    hp = steps.loss_hparams(cfg)
    if stage == "dpo":
        arrays["ref_logps"] = np.random.default_rng(3).normal(-20, 2, (4, 2)).astype(np.float32)
    indices = np.arange(arrays["tokens"].shape[0])
    width = pipeline.bucket_width(pipeline.example_lengths(arrays), indices, 8, T)
    assert width == 16 < T
    full = pipeline.host_batch(arrays, indices)
    cut = pipeline.host_batch(arrays, indices, width)
    assert cut["tokens"].shape[-1] == 16
    loss_full, grads_full = _loss_and_grads(objective, totals_fn, params, full, hp)
    loss_cut, grads_cut = _loss_and_grads(objective, totals_fn, params, cut, hp)
    assert loss_cut == pytest.approx(loss_full, rel=1e-5)
    _assert_close_trees(grads_cut, grads_full, atol=1e-6)


def test_pack_is_for_sft_only(run_config):
    with pytest.raises(ConfigError, match="pack"):
        validate(run_config("dpo", **{"data.padding": "pack"}))
    with pytest.raises(ConfigError, match="data.padding"):
        validate(run_config("sft", **{"data.padding": "ragged"}))
    with pytest.raises(ConfigError, match="bucket_multiple"):
        validate(run_config("sft", **{"data.bucket_multiple": 0}))


@pytest.mark.slow
@pytest.mark.parametrize("padding", ["bucket", "grouped", "pack"])
def test_train_runs_resume_exactly_with_buckets_and_packing(run_config, tmp_path, padding):
    grouped = padding == "grouped"
    cfg = run_config(
        "sft",
        **{
            "data.padding": "bucket" if grouped else padding,
            "data.group_by_length": grouped,
            "data.bucket_multiple": 8,
            "train.batch_size": 8,
        },
    )
    lines = []
    train.run(cfg, tmp_path / "full", log=lines.append)
    rows = train_rows(tmp_path / "full")
    assert rows[12]["train/loss"] < rows[1]["train/loss"]
    if padding == "pack":
        assert any(line.startswith("packed train:") for line in lines), lines
    resumed = tmp_path / "resumed"
    assert train.run(cfg, resumed, log=lambda *_: None, stop_after=6) == {"stopped_at": 6}
    train.run(cfg, resumed, log=lambda *_: None)
    assert_same_run(cfg, tmp_path / "full", resumed)


@pytest.mark.slow
def test_bucketed_dpo_run_matches_the_max_len_run(run_config, sft_run, tmp_path):
    _, sft_dir = sft_run
    base = run_config("dpo", **{"train.init_from": str(sft_dir), "train.steps": 4})
    runs = {}
    for padding in ("max_len", "bucket"):
        cfg = config_lib.override(base, {"data.padding": padding, "data.bucket_multiple": 8})
        train.run(cfg, tmp_path / padding, log=lambda *_: None)
        runs[padding] = train_rows(tmp_path / padding)
    for step in range(1, 5):
        a, b = runs["max_len"][step], runs["bucket"][step]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4, abs=1e-6)
