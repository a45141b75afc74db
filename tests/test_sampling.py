"""The KV-cache sampler against the full-recompute reference, the full forward, the trainer's log-probs,
top-k/p, EOS, left padding, sharding, architecture variants and the prefill's attention implementations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl import sampling, sharding
from jaxrl.config import MeshConfig, ModelConfig
from jaxrl.models.transformer import init_model

# A large init scale keeps the top two logits far apart, so argmax comparisons are not decided by rounding.
TINY = ModelConfig(
    vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32", init_std=0.2
)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3], [20, 21, 22, 23]]
N, PAD, NO_EOS = 8, 0, -1  # -1: an EOS id that is never sampled
KEY = jax.random.PRNGKey(0)


def build(cfg: ModelConfig, seed: int = 0):
    graphdef, state = nnx.split(init_model(cfg, seed))
    return graphdef, nnx.to_pure_dict(state)


def run(fn, graphdef, params, ids, mask, temperature, **kw):
    kw = {"max_new": N, "eos_id": NO_EOS, "pad_id": PAD} | kw
    return [np.asarray(x) for x in fn(graphdef, params, ids, mask, KEY, np.float32(temperature), **kw)]


@jax.jit
def _teacher_forced(model, ids, mask, tokens):
    P = ids.shape[1]
    valid = jnp.concatenate([mask, jnp.ones_like(tokens)], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    return model.logits(model.hidden(jnp.concatenate([ids, tokens], axis=1), positions, valid))[:, P - 1 : -1]


def teacher_forced_logits(graphdef, params, ids, mask, tokens):
    """Full-forward logits [B, N, V] predicting each response token (positions and segments as sampling)."""
    return np.asarray(_teacher_forced(nnx.merge(graphdef, params), ids, mask, tokens))


def assert_greedy_is_forward_argmax(graphdef, params, ids, mask, tokens, resp_mask):
    logits = teacher_forced_logits(graphdef, params, ids, mask, tokens)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    gap = np.min((top2[..., 1] - top2[..., 0])[resp_mask])
    assert gap > 1e-4, "logits too close for an exact argmax test"
    np.testing.assert_array_equal(np.argmax(logits, -1)[resp_mask], tokens[resp_mask])


@pytest.fixture(scope="module")
def tiny():
    graphdef, params = build(TINY)
    ids, mask = sampling.left_pad(PROMPTS, PAD)
    return graphdef, params, ids, mask, run(sampling.sample, graphdef, params, ids, mask, 0.0)


def test_greedy_matches_reference_and_forward_argmax(tiny):
    graphdef, params, ids, mask, (tokens, logp, resp_mask) = tiny
    ref_tokens, ref_logp, ref_mask = run(sampling.sample_reference, graphdef, params, ids, mask, 0.0)
    assert tokens.shape == logp.shape == resp_mask.shape == (len(PROMPTS), N)
    assert resp_mask.all() and len(set(tokens.ravel().tolist())) > 4  # no EOS, and not a degenerate repeat
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(resp_mask, ref_mask)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    assert_greedy_is_forward_argmax(graphdef, params, ids, mask, tokens, resp_mask)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_equal_trainer_logps_and_reference_draws(tiny, temperature):
    graphdef, params, ids, mask, _ = tiny
    tokens, logp, resp_mask = run(sampling.sample, graphdef, params, ids, mask, temperature)
    ref_tokens, _, _ = run(sampling.sample_reference, graphdef, params, ids, mask, temperature)
    np.testing.assert_array_equal(tokens, ref_tokens)  # the same random stream
    trainer = np.asarray(
        sampling.response_logps(
            graphdef, params, ids, mask, tokens, resp_mask, temperature=np.float32(temperature)
        )
    )
    assert np.max(np.abs(logp - trainer)) < 1e-4
    if temperature != 1.0:  # an untempered trainer would be wrong, and the test must be able to see it
        plain = np.asarray(sampling.response_logps(graphdef, params, ids, mask, tokens, resp_mask))
        assert np.max(np.abs(logp - plain)) > 1e-2


def test_top_k_1_is_greedy(tiny):
    graphdef, params, ids, mask, (greedy, _, _) = tiny
    tokens, logp, _ = run(sampling.sample, graphdef, params, ids, mask, 1.0, top_k=1)
    np.testing.assert_array_equal(tokens, greedy)
    np.testing.assert_allclose(logp, 0.0, atol=1e-6)  # the processed distribution is a point mass


def test_top_p_sampler_stays_in_nucleus_and_matches_trainer(tiny):
    graphdef, params, ids, mask, _ = tiny
    tokens, logp, resp_mask = run(sampling.sample, graphdef, params, ids, mask, 1.0, top_p=0.6)
    probs = jax.nn.softmax(teacher_forced_logits(graphdef, params, ids, mask, tokens), axis=-1)
    picked = np.take_along_axis(np.asarray(probs), tokens[..., None], -1)[..., 0]
    above = np.sum(np.where(probs > picked[..., None], probs, 0.0), axis=-1)
    assert np.all(above < 0.6 + 1e-5)  # the mass ranked above a sampled token is short of top_p
    trainer = np.asarray(sampling.response_logps(graphdef, params, ids, mask, tokens, resp_mask, top_p=0.6))
    assert np.max(np.abs(logp - trainer)) < 1e-4
    assert np.all(logp >= np.log(picked) - 1e-5)  # renormalised: at least the untruncated log-prob


def test_process_logits_top_p_masks_exactly_the_tail():
    probs = np.array([0.15, 0.5, 0.05, 0.3], np.float32)  # ranked: 0.5, 0.3, 0.15, 0.05
    logits = jnp.asarray(np.log(probs))[None]

    def kept(**kw):
        out = np.asarray(sampling.process_logits(logits, jnp.float32(1.0), **kw))[0]
        survivors = set(np.flatnonzero(out > sampling.REMOVED_LOGIT / 2).tolist())
        return survivors, np.asarray(jax.nn.log_softmax(out))

    assert kept(top_p=0.45)[0] == {1}
    assert kept(top_p=0.7)[0] == {1, 3}  # 0.5 < 0.7, then 0.8 >= 0.7: the 0.15 and 0.05 tail goes
    assert kept(top_p=0.9)[0] == {0, 1, 3}
    assert kept(top_p=1.0)[0] == {0, 1, 2, 3}
    nucleus, logp = kept(top_p=0.7)
    np.testing.assert_allclose(np.exp(logp[[1, 3]]), [0.5 / 0.8, 0.3 / 0.8], rtol=1e-5)
    assert np.exp(logp[[0, 2]]).max() == 0.0
    assert kept(top_k=2)[0] == {1, 3}
    assert kept(top_p=0.6)[0] == {1, 3}
    assert kept(top_k=2, top_p=0.6)[0] == {1}  # top-k first: renormalised over two, 0.625 >= 0.6 already
    # Temperature is applied before truncation: a flatter distribution needs more tokens for the same mass.
    flat = np.asarray(sampling.process_logits(logits, jnp.float32(4.0), top_p=0.7))[0]
    assert np.sum(flat > sampling.REMOVED_LOGIT / 2) == 3


def test_eos_stops_and_masks(tiny):
    graphdef, params, ids, mask, (greedy, greedy_logp, _) = tiny
    eos = int(greedy[0, 2])
    tokens, logp, resp_mask = run(sampling.sample, graphdef, params, ids, mask, 0.0, eos_id=eos)
    ref = run(sampling.sample_reference, graphdef, params, ids, mask, 0.0, eos_id=eos)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(greedy[row] == eos)
        stop = hits[0] + 1 if len(hits) else N
        assert resp_mask[row].tolist() == [True] * stop + [False] * (N - stop)
        np.testing.assert_array_equal(tokens[row, :stop], greedy[row, :stop])
        assert np.all(tokens[row, stop:] == PAD) and np.all(logp[row, stop:] == 0.0)
        np.testing.assert_allclose(logp[row, :stop], greedy_logp[row, :stop], atol=1e-5)
    assert not resp_mask[0, 3:].any()
    for a, b in zip((tokens, logp, resp_mask), ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Every row stops at step 2: the loop exits early and the rest must still read as pad / 0 / masked.
    same_ids, same_mask = np.repeat(ids[:1], len(PROMPTS), 0), np.repeat(mask[:1], len(PROMPTS), 0)
    tokens, logp, resp_mask = run(sampling.sample, graphdef, params, same_ids, same_mask, 0.0, eos_id=eos)
    assert resp_mask.sum(1).tolist() == [3] * len(PROMPTS)
    assert np.all(tokens[:, 3:] == PAD) and np.all(logp[:, 3:] == 0.0) and np.all(tokens[:, 2] == eos)


def test_left_padding_does_not_change_a_prompt_output(tiny):
    graphdef, params, ids, mask, (greedy, logp, _) = tiny
    for row in (2, 1):  # the most padded prompt and the unpadded one
        alone_ids, alone_mask = sampling.left_pad([PROMPTS[row]], PAD)
        tokens, alone_logp, _ = run(sampling.sample, graphdef, params, alone_ids, alone_mask, 0.0)
        np.testing.assert_array_equal(tokens[0], greedy[row])
        np.testing.assert_allclose(alone_logp[0], logp[row], atol=1e-5)


def test_sharded_equals_unsharded(tiny):
    graphdef, params, ids, mask, (greedy, greedy_logp, _) = tiny
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, preset="fsdp_tp"))
    placed = jax.device_put(params, sharding.tree_shardings(params, "fsdp_tp", mesh))
    assert any(
        len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
        for x in jax.tree.leaves(placed)
    )
    unsharded_sampled = run(sampling.sample, graphdef, params, ids, mask, 1.0)
    with sharding.use_mesh(mesh, "fsdp_tp"):
        tokens, logp, resp_mask = run(sampling.sample, graphdef, placed, ids, mask, 0.0)
        sampled = run(sampling.sample, graphdef, placed, ids, mask, 1.0)
    np.testing.assert_array_equal(tokens, greedy)
    np.testing.assert_allclose(logp, greedy_logp, atol=1e-5)
    np.testing.assert_array_equal(sampled[0], unsharded_sampled[0])


@pytest.mark.parametrize(
    "variant",
    [
        dict(kv_heads=1),  # multi-query
        dict(kv_heads=4),  # plain multi-head
        dict(qk_norm="head", qkv_bias=True),  # Qwen-style
        dict(qk_norm="full", norm_position="post", tie_embeddings=True),  # OLMo-2-style, tied head
    ],
    ids=["mqa", "mha", "qknorm_head_bias", "qknorm_full_post_tied"],
)
def test_architecture_variants(variant):
    graphdef, params = build(dataclasses.replace(TINY, **variant), seed=1)
    if variant.get("qkv_bias"):  # zero-initialised biases would not show whether they are used
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.3 if sharding.path_str(path).endswith("bias") else x, params
        )
    ids, mask = sampling.left_pad(PROMPTS, PAD)
    tokens, logp, resp_mask = run(sampling.sample, graphdef, params, ids, mask, 0.0)
    assert_greedy_is_forward_argmax(graphdef, params, ids, mask, tokens, resp_mask)
    trainer = np.asarray(sampling.response_logps(graphdef, params, ids, mask, tokens, resp_mask))
    assert np.max(np.abs(logp - trainer)) < 1e-4


@pytest.mark.parametrize(
    "variant", [{}, dict(sliding_window=3, window_layers=1)], ids=["full", "window_in_some_layers"]
)
def test_prefill_attends_by_model_attention(variant):
    """The prefill attends by `model.attention` (`attention.attend`, the prompt padding as segment ids):
    "auto" is XLA on CPU (bitwise the explicit choice), and the TPU's splash kernel (Pallas interpret mode
    here) samples the same greedy tokens with log-probs within fp32 rounding (measured max |diff| 7.2e-7)."""
    cfg = dataclasses.replace(TINY, **variant)
    ids, mask = sampling.left_pad(PROMPTS, PAD)
    out = {}
    for name in ("auto", "xla", "splash"):
        graphdef, params = build(dataclasses.replace(cfg, attention=name))
        out[name] = run(sampling.sample, graphdef, params, ids, mask, 0.0)
    for a, b in zip(out["auto"], out["xla"], strict=True):
        np.testing.assert_array_equal(a, b)
    tokens, logp, resp_mask = out["splash"]
    np.testing.assert_array_equal(tokens, out["xla"][0])
    np.testing.assert_array_equal(resp_mask, out["xla"][2])
    np.testing.assert_allclose(logp, out["xla"][1], atol=1e-5)
    assert_greedy_is_forward_argmax(*build(cfg), ids, mask, tokens, resp_mask)
