"""The transformer: jit/scan/remat invariance, architecture knobs, causality, packing, RoPE, counts."""

import dataclasses
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl import config as config_lib
from jaxrl.config import ModelConfig
from jaxrl.models import init as model_init
from jaxrl.models.transformer import REMAT_POLICIES, count_params, init_model, rope_frequencies

TINY = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32")
B, T = 2, 16


def build(cfg: ModelConfig, seed: int = 0):
    """(graphdef, pure-dict params) of a freshly initialised model."""
    graphdef, state = nnx.split(init_model(cfg, seed))
    return graphdef, nnx.to_pure_dict(state)


def graphdef_of(cfg: ModelConfig):
    return model_init.abstract_model(cfg)[0]


def forward(graphdef, params, tokens, **kw):
    return nnx.merge(graphdef, params)(tokens, **kw)


jit_forward = jax.jit(forward, static_argnums=0)


def tokens_for(cfg=TINY, shape=(B, T), seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)


def paths(params) -> dict[str, tuple]:
    return {"/".join(map(str, k)): v.shape for k, v in _flatten(params).items()}


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def perturbed(params, path: str, seed: int = 1):
    """A copy of params with the leaf at 'a/b/c' replaced by random values (so the test sees it is used)."""
    keys = path.split("/")
    out = jax.tree.map(lambda x: x, params)
    node = out
    for k in keys[:-1]:
        node = node[k]
    leaf = node[keys[-1]]
    node[keys[-1]] = leaf + 0.5 * jax.random.normal(jax.random.PRNGKey(seed), leaf.shape, leaf.dtype)
    return out


@pytest.fixture(scope="module")
def tiny():
    graphdef, params = build(TINY)
    return graphdef, params, tokens_for()


def test_jit_and_no_jit_agree(tiny):
    graphdef, params, tokens = tiny
    eager = forward(graphdef, params, tokens)
    jitted = jit_forward(graphdef, params, tokens)
    assert eager.shape == (B, T, TINY.vocab_size) and eager.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(eager)))
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_scan_and_unrolled_layers_agree(tiny):
    graphdef, params, tokens = tiny
    unrolled = jit_forward(graphdef_of(dataclasses.replace(TINY, scan_layers=False)), params, tokens)
    np.testing.assert_allclose(jit_forward(graphdef, params, tokens), unrolled, atol=1e-5, rtol=1e-5)


def _value_and_grad(graphdef, params, tokens):
    weights = jax.random.normal(jax.random.PRNGKey(5), (B, T, TINY.vocab_size))

    @jax.jit
    def f(p):
        logits = nnx.merge(graphdef, p)(tokens)
        return jnp.sum(logits * weights), logits

    (_, logits), grads = jax.value_and_grad(f, has_aux=True)(params)
    return logits, grads


@pytest.mark.parametrize(
    "remat,scan", [("full", True), ("dots", True), ("dots_no_batch", False), ("offload", True)]
)
def test_remat_policies_change_neither_logits_nor_gradients(tiny, remat, scan):
    graphdef, params, tokens = tiny
    logits, grads = _value_and_grad(graphdef, params, tokens)
    cfg = dataclasses.replace(TINY, remat=remat, scan_layers=scan)
    logits_r, grads_r = _value_and_grad(graphdef_of(cfg), params, tokens)
    np.testing.assert_allclose(logits, logits_r, atol=1e-5, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(grads_r)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(g, g_r, atol=1e-5, rtol=1e-4)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_every_remat_setting_has_a_policy():
    assert config_lib.REMATS == ("none", *REMAT_POLICIES)


def test_offload_remat_keeps_each_layer_input_in_host_memory(tiny):
    """remat="offload" is "full" with the saved layer inputs moved to pinned host memory: the gradient's
    program puts exactly those [B, T, D] values on the host, one per layer (stacked by the scan)."""
    graphdef, params, tokens = tiny

    def host_puts(remat):
        cfg = dataclasses.replace(TINY, remat=remat)
        jaxpr = jax.make_jaxpr(lambda p: _value_and_grad(graphdef_of(cfg), p, tokens))(params)
        puts = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "device_put"]
        return [eqn for eqn in puts if "Host" in str(eqn)]

    assert host_puts("full") == []
    puts = host_puts("offload")
    assert puts, "no layer input was moved to the host"
    assert {tuple(v.aval.shape) for eqn in puts for v in eqn.outvars} == {(B, T, TINY.hidden)}


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def test_scalar_head_outputs_one_value_per_position():
    cfg = dataclasses.replace(TINY, head="scalar")
    graphdef, params = build(cfg)
    assert "score" in params and "lm_head" not in params
    assert params["score"]["kernel"].shape == (TINY.hidden, 1)
    scores = jit_forward(graphdef, params, tokens_for())
    assert scores.shape == (B, T) and scores.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(scores)))


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads(tiny):
    graphdef, params, tokens = tiny
    group = TINY.heads // TINY.kv_heads
    assert group > 1
    mha_cfg = dataclasses.replace(TINY, kv_heads=TINY.heads)
    mha_params = jax.tree.map(lambda x: x, params)
    for name in ("k", "v"):
        kernel = params["layers"]["attn"][name]["kernel"]  # [L, D, K, Dh]
        assert kernel.shape[2] == TINY.kv_heads
        mha_params["layers"]["attn"][name]["kernel"] = jnp.repeat(kernel, group, axis=2)
    # The MHA model (kv_heads == heads) builds and has the full-size k/v kernels.
    assert paths(build(mha_cfg)[1]) == paths(mha_params)
    np.testing.assert_allclose(
        jit_forward(graphdef, params, tokens),
        jit_forward(graphdef_of(mha_cfg), mha_params, tokens),
        atol=1e-5,
        rtol=1e-5,
    )


L, D, H, K, Dh = TINY.layers, TINY.hidden, TINY.heads, TINY.kv_heads, TINY.head_size
VARIANTS = {
    "qkv_bias": (
        dict(qkv_bias=True),
        {
            "layers/attn/q/bias": (L, H, Dh),
            "layers/attn/k/bias": (L, K, Dh),
            "layers/attn/v/bias": (L, K, Dh),
        },
        set(),
    ),
    "qk_norm_head": (
        dict(qk_norm="head"),
        {"layers/attn/q_norm/scale": (L, Dh), "layers/attn/k_norm/scale": (L, Dh)},
        set(),
    ),
    "qk_norm_full": (
        dict(qk_norm="full"),
        {"layers/attn/q_norm/scale": (L, H * Dh), "layers/attn/k_norm/scale": (L, K * Dh)},
        set(),
    ),
    "post_norm": (dict(norm_position="post"), {}, set()),
    "tied": (dict(tie_embeddings=True), {}, {"lm_head/kernel"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_architecture_knobs_change_the_parameter_tree_as_expected_and_run(tiny, variant):
    base_graphdef, base_params, tokens = tiny
    overrides, added, removed = VARIANTS[variant]
    cfg = dataclasses.replace(TINY, **overrides)
    graphdef, params = build(cfg)
    base_paths, new_paths = paths(base_params), paths(params)
    assert {k: v for k, v in new_paths.items() if k not in base_paths} == added
    assert set(base_paths) - set(new_paths) == removed
    assert all(new_paths[k] == base_paths[k] for k in new_paths if k in base_paths)
    logits = jit_forward(graphdef, params, tokens)
    assert logits.shape == (B, T, TINY.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
    # Every new parameter is used: changing it changes the logits.
    for path in added:
        changed = jit_forward(graphdef, perturbed(params, path), tokens)
        assert float(jnp.max(jnp.abs(changed - logits))) > 1e-4, path
    if variant == "post_norm":
        # Same parameters, different wiring: post-norm must not compute the pre-norm function.
        shared = jax.tree.map(lambda x: x, base_params)
        assert (
            float(
                jnp.max(
                    jnp.abs(
                        jit_forward(graphdef, shared, tokens) - jit_forward(base_graphdef, shared, tokens)
                    )
                )
            )
            > 1e-4
        )
    if variant == "tied":
        model = nnx.merge(graphdef, params)
        h = model.hidden(tokens)
        np.testing.assert_allclose(
            logits, jnp.einsum("btd,vd->btv", h, params["embed"]["embedding"]), atol=1e-5, rtol=1e-5
        )


def test_causal_future_tokens_do_not_change_earlier_logits(tiny):
    graphdef, params, tokens = tiny
    t = 9
    changed_tokens = tokens.at[:, t].set((tokens[:, t] + 1) % TINY.vocab_size)
    before = jit_forward(graphdef, params, tokens)
    after = jit_forward(graphdef, params, changed_tokens)
    np.testing.assert_allclose(before[:, :t], after[:, :t], atol=1e-6, rtol=1e-6)
    assert float(jnp.min(jnp.max(jnp.abs(before[:, t:] - after[:, t:]), axis=-1))) > 1e-6


def test_packed_segments_equal_each_sequence_alone(tiny):
    graphdef, params, _ = tiny
    a, b = tokens_for(shape=(1, 7), seed=1), tokens_for(shape=(1, 9), seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segment_ids = jnp.asarray([[1] * 7 + [2] * 9], jnp.int32)
    positions = jnp.asarray([list(range(7)) + list(range(9))], jnp.int32)
    logits = jit_forward(graphdef, params, packed, positions_BT=positions, segment_ids_BT=segment_ids)
    np.testing.assert_allclose(logits[:, :7], jit_forward(graphdef, params, a), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[:, 7:], jit_forward(graphdef, params, b), atol=1e-5, rtol=1e-5)
    # Without the segment ids the second sequence sees the first one.
    unsegmented = jit_forward(graphdef, params, packed, positions_BT=positions)
    assert float(jnp.max(jnp.abs(unsegmented[:, 7:] - logits[:, 7:]))) > 1e-5


def test_llama3_rope_scaling_matches_the_hand_formula():
    cfg = dataclasses.replace(
        TINY,
        hidden=128,
        heads=4,
        head_dim=32,
        rope_theta=10000.0,
        rope_scaling="llama3",
        rope_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_positions=8192,
    )
    plain = rope_frequencies(dataclasses.replace(cfg, rope_scaling="none"))
    scaled = rope_frequencies(cfg)
    assert plain.shape == scaled.shape == (16,)
    np.testing.assert_allclose(plain, [10000.0 ** (-2 * i / 32) for i in range(16)], rtol=1e-6)

    def expected(i):
        inv = 10000.0 ** (-2 * i / 32)
        wavelen = 2 * math.pi / inv
        if wavelen < 8192 / 4.0:  # high frequency: unchanged
            return inv
        if wavelen > 8192 / 1.0:  # low frequency: divided by the factor
            return inv / 8.0
        smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
        return (1 - smooth) * inv / 8.0 + smooth * inv

    # Index 0 and 10 are high-frequency, 11 and 12 in the smoothed band, 13 and 15 low-frequency.
    for i in (0, 10, 11, 12, 13, 15):
        np.testing.assert_allclose(scaled[i], expected(i), rtol=1e-5)
    np.testing.assert_array_equal(scaled[:11], plain[:11])
    np.testing.assert_allclose(scaled[13:], plain[13:] / 8.0, rtol=1e-6)
    assert np.all(scaled[11:13] < plain[11:13]) and np.all(scaled[11:13] > plain[11:13] / 8.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(tie_embeddings=True),
        dict(head="scalar"),
        dict(qkv_bias=True),
        dict(qk_norm="head"),
        dict(qk_norm="full"),
        dict(head_dim=16),
        dict(kv_heads=4, layers=3, vocab_size=100),
    ],
    ids=["base", "tied", "scalar", "qkv_bias", "qk_norm_head", "qk_norm_full", "head_dim", "mha"],
)
def test_count_params_equals_the_real_parameter_count(overrides):
    cfg = dataclasses.replace(TINY, **overrides)
    _, abstract = model_init.abstract_model(cfg)
    real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    counts = count_params(cfg)
    assert counts["total"] == real
    assert counts["embedding"] == cfg.vocab_size * cfg.hidden


def test_bfloat16_compute_is_close_to_float32_and_keeps_float32_params(tiny):
    graphdef, params, tokens = tiny
    bf16 = dataclasses.replace(TINY, dtype="bfloat16")
    bf16_graphdef = graphdef_of(bf16)
    reference = jit_forward(graphdef, params, tokens)
    logits = jit_forward(bf16_graphdef, params, tokens)
    assert logits.dtype == jnp.float32  # fp32 accumulation of the output projection
    assert nnx.merge(bf16_graphdef, params).hidden(tokens).dtype == jnp.bfloat16
    scale = float(jnp.std(reference))
    assert float(jnp.max(jnp.abs(logits - reference))) < 0.1 * scale
    assert float(jnp.max(jnp.abs(logits - reference))) > 0  # it really ran in bf16
    # Master weights stay fp32 whatever the compute dtype.
    _, bf16_params = build(bf16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_params))
