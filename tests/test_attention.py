"""Attention implementations: what "auto" picks per platform, and the TPU splash kernel (run here in Pallas
interpret mode) against XLA's attention: values and gradients, causal, packed segments, sliding windows
(every layer or some), grouped-query heads, lengths off the 128-lane grid, under a mesh, inside the model.

Tolerance (fp32): splash and XLA differ by fp32 rounding only (online softmax in blocks against one
softmax, q scaled before the product): measured max |diff| 6e-7 on outputs of size ~1 and 3e-6 on gradients
of size ~5; asserted at atol=rtol=1e-5. bf16 inputs: asserted at 2e-2 (bf16 has 8 bits of mantissa)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl import sharding, steps
from jaxrl.config import MeshConfig, ModelConfig
from jaxrl.models import attention
from jaxrl.models import init as model_init
from jaxrl.models.transformer import init_model

FP32 = dict(atol=1e-5, rtol=1e-5)
B, T, H, K, Dh = 2, 200, 4, 2, 32  # T: not a multiple of the 128 lanes, so splash pads
CFG = ModelConfig(vocab_size=64, hidden=H * Dh, layers=2, heads=H, kv_heads=K, mlp=64, dtype="float32")
SEGMENTS = np.stack([np.repeat([1, 2, 3], [70, 90, 40]), np.repeat([0, 5], [120, 80])]).astype(np.int32)


def qkv(heads=H, kv_heads=K, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    shapes = [(B, T, heads, Dh), (B, T, kv_heads, Dh), (B, T, kv_heads, Dh)]
    return tuple(jnp.asarray(r.normal(size=s), dtype) for s in shapes)


def value_and_grads(fn, q, k, v):
    """fn's output and the gradients of a random projection of it w.r.t. q, k and v."""
    weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), q.dtype)
    f = lambda q, k, v: jnp.sum((fn(q, k, v) * weights).astype(jnp.float32))
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)


def assert_close(a, b, **tol):
    out_a, grads_a = a
    out_b, grads_b = b
    np.testing.assert_allclose(np.asarray(out_a, np.float32), np.asarray(out_b, np.float32), **tol)
    for g_a, g_b in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(np.asarray(g_a, np.float32), np.asarray(g_b, np.float32), **tol)


def splash_and_xla(cfg, segment_ids, windowed=None, **kw):
    splash = lambda q, k, v: attention.splash_attention(q, k, v, segment_ids, cfg, windowed, interpret=True)
    xla = lambda q, k, v: attention.xla_attention(q, k, v, segment_ids, cfg, windowed)
    q, k, v = qkv(**kw)
    return value_and_grads(splash, q, k, v), value_and_grads(xla, q, k, v)


def test_auto_resolves_by_platform_and_explicit_choices_pass_through():
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    assert attention.resolve(CFG, "cpu") == "xla"
    assert attention.resolve(CFG, "tpu") == "splash"
    assert attention.resolve(bf16, "gpu") == "cudnn"
    assert attention.resolve(CFG, "gpu") == "xla"  # cuDNN flash attention takes fp16/bf16 only
    assert attention.resolve(dataclasses.replace(bf16, head_dim=12), "gpu") == "xla"  # not a multiple of 8
    assert attention.resolve(dataclasses.replace(bf16, head_dim=512), "gpu") == "xla"  # beyond any GPU limit
    for name in ("xla", "cudnn", "splash"):
        assert attention.resolve(dataclasses.replace(CFG, attention=name), "tpu") == name
    # The platform is the program's: the active mesh's devices, else the default backend.
    assert attention.current_platform() == "cpu" and attention.resolve(CFG) == "xla"
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    with sharding.use_mesh(mesh, "fsdp"):
        assert attention.current_platform() == "cpu"
    assert attention.describe(CFG, "tpu") == "attention: splash (model.attention=auto on tpu)"
    splash = dataclasses.replace(CFG, attention="splash")
    assert "interpret mode" in attention.describe(splash, "cpu")


@pytest.mark.parametrize("segments", [False, True], ids=["causal", "segments"])
def test_splash_equals_xla_causal_and_within_segments(segments):
    segment_ids = jnp.asarray(SEGMENTS) if segments else None
    splash, xla = splash_and_xla(CFG, segment_ids)
    assert_close(splash, xla, **FP32)
    if segments:  # the segments really cut attention: without them the later segments differ
        plain = splash_and_xla(CFG, None)[1]
        assert float(jnp.max(jnp.abs(plain[0][:, 70:] - xla[0][:, 70:]))) > 1e-2


@pytest.mark.parametrize(
    "window_layers,windowed",
    [(0, None), (1, True), (1, False)],
    ids=["every-layer", "mixed-windowed", "mixed-full"],
)
def test_splash_equals_xla_with_a_sliding_window(window_layers, windowed):
    cfg = dataclasses.replace(CFG, sliding_window=48, window_layers=window_layers)
    flag = None if windowed is None else jnp.asarray(windowed)  # a traced per-layer flag picks the kernel
    splash, xla = splash_and_xla(cfg, jnp.asarray(SEGMENTS), flag)
    assert_close(splash, xla, **FP32)
    full = splash_and_xla(CFG, jnp.asarray(SEGMENTS))[1]
    differs = float(jnp.max(jnp.abs(full[0] - xla[0]))) > 1e-2
    assert differs == (windowed is not False)


@pytest.mark.parametrize("windowed", [True, False])
def test_a_python_bool_window_flag_picks_one_kernel(windowed):
    """The sampler's prefill runs its layers unrolled and passes each one's window flag as a Python bool:
    splash then builds one kernel (no lax.cond over both), with the numbers of XLA's attention."""
    cfg = dataclasses.replace(CFG, sliding_window=48, window_layers=1)
    segment_ids = jnp.asarray(SEGMENTS)
    splash, xla = splash_and_xla(cfg, segment_ids, windowed)
    assert_close(splash, xla, **FP32)
    q, k, v = qkv()
    kernels = lambda flag: str(
        jax.make_jaxpr(
            lambda q, k, v: attention.splash_attention(q, k, v, segment_ids, cfg, flag, interpret=True)
        )(q, k, v)
    ).count("pallas_call")
    assert kernels(windowed) == 1
    assert kernels(jnp.asarray(windowed)) == 2  # the scan's traced flag: both kernels, under a lax.cond


@pytest.mark.parametrize("kv_heads", [1, 4], ids=["mqa", "mha"])
def test_splash_equals_xla_for_other_head_groupings(kv_heads):
    cfg = dataclasses.replace(CFG, kv_heads=kv_heads)
    splash, xla = splash_and_xla(cfg, jnp.asarray(SEGMENTS), kv_heads=kv_heads)
    assert_close(splash, xla, **FP32)


def test_splash_equals_xla_in_bfloat16():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    splash, xla = splash_and_xla(cfg, jnp.asarray(SEGMENTS), dtype=jnp.bfloat16)
    assert splash[0].dtype == jnp.bfloat16
    assert_close(splash, xla, atol=2e-2, rtol=2e-2)


def test_splash_under_a_mesh_is_shard_mapped_and_equals_xla():
    # data 2 x fsdp 2 x tensor 2: rows over data and fsdp, q and kv heads over tensor.
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, preset="fsdp_tp"))
    cfg = dataclasses.replace(CFG, attention="splash")
    q, k, v = qkv()
    q, k, v = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v))  # 4 rows: one per batch shard
    segment_ids = jnp.asarray(np.concatenate([SEGMENTS, SEGMENTS[::-1]]))

    def sharded(q, k, v):
        with sharding.use_mesh(mesh, "fsdp_tp"):
            return attention.attend(q, k, v, segment_ids, cfg)

    jaxpr = str(jax.make_jaxpr(sharded)(q, k, v))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    xla = lambda q, k, v: attention.xla_attention(q, k, v, segment_ids, cfg)
    assert_close(value_and_grads(sharded, q, k, v), value_and_grads(xla, q, k, v), **FP32)


def _model_logps_and_grads(cfg, params, tokens, positions, segment_ids):
    graphdef = model_init.abstract_model(cfg)[0]

    def f(params):
        model = nnx.merge(graphdef, params)
        return jnp.sum(steps.token_logps(model, tokens, positions, segment_ids) * jnp.arange(tokens.shape[1]))

    return jax.jit(jax.value_and_grad(f))(params)


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(sliding_window=5, window_layers=1), dict(remat="full")],
    ids=["plain", "mixed-window", "remat"],
)
def test_the_model_with_splash_equals_the_model_with_xla(overrides):
    cfg = dataclasses.replace(CFG, hidden=32, **overrides)  # head dim 8
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0)))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, cfg.vocab_size, dtype=jnp.int32)
    segment_ids = jnp.asarray([[1] * 7 + [2] * 9, [1] * 16], jnp.int32)
    positions = jnp.asarray([list(range(7)) + list(range(9)), list(range(16))], jnp.int32)
    splash = _model_logps_and_grads(
        dataclasses.replace(cfg, attention="splash"), params, tokens, positions, segment_ids
    )
    xla = _model_logps_and_grads(
        dataclasses.replace(cfg, attention="xla"), params, tokens, positions, segment_ids
    )
    np.testing.assert_allclose(splash[0], xla[0], **FP32)
    for g_s, g_x in zip(jax.tree.leaves(splash[1]), jax.tree.leaves(xla[1]), strict=True):
        np.testing.assert_allclose(g_s, g_x, **FP32)
