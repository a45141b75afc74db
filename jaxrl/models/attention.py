"""Causal self-attention behind one call, by `model.attention`: XLA's dot-product attention (T x T scores),
cuDNN flash attention (GPU) or Pallas splash attention (TPU; Pallas interpret mode on other platforms, which
is how the tests check it on CPU). "auto" picks the fused kernel of the platform the program is compiled for
where its constraints hold, else XLA.

Every implementation computes the same function: causal, within segments (packed rows), within the sliding
window in the windowed layers, grouped-query heads."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl import sharding
from jaxrl.config import ModelConfig

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
FUSED_DTYPES = ("bfloat16", "float16")  # cuDNN flash attention takes these only
SPLASH_LANES = 128  # splash blocks are multiples of the TPU's 128 lanes; rows are padded up to one


def current_platform() -> str:
    """The platform the program being traced is for: the active mesh's (an AOT compile for TPU from a CPU host
    traces under a mesh of TPU devices), else JAX's default backend ("cpu", "gpu", "tpu")."""
    active = sharding.active_mesh()
    if active is not None:
        return active[0].devices.flat[0].platform
    return jax.default_backend()


def _cuda_head_dim_limit() -> int:
    # Hopper and later take head dims up to 256 in cuDNN flash attention, earlier GPUs 128.
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_compute_capability

        return 256 if check_compute_capability("9.0") else 128
    except Exception:  # noqa: BLE001 - no CUDA backend on this host: the limit every GPU takes
        return 128


def cudnn_fits(cfg: ModelConfig) -> bool:
    """Whether cuDNN flash attention takes this model: fp16/bf16 compute, a head dim that is a multiple of 8
    within the GPU's limit."""
    Dh = cfg.head_size
    return cfg.dtype in FUSED_DTYPES and Dh % 8 == 0 and Dh <= _cuda_head_dim_limit()


def resolve(cfg: ModelConfig, platform: str | None = None) -> str:
    """The implementation `cfg.attention` means on `platform` (default: `current_platform()`): "xla",
    "cudnn" or "splash". "auto": splash on TPU, cuDNN on a GPU where it fits, XLA otherwise."""
    if cfg.attention != "auto":
        return cfg.attention
    platform = platform or current_platform()
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and cudnn_fits(cfg):
        return "cudnn"
    return "xla"


def describe(cfg: ModelConfig, platform: str | None = None) -> str:
    """One line for a run's log: the resolved implementation, what asked for it and on which platform."""
    platform = platform or current_platform()
    name = resolve(cfg, platform)
    note = " in Pallas interpret mode (slow: for tests)" if name == "splash" and platform != "tpu" else ""
    return f"attention: {name}{note} (model.attention={cfg.attention} on {platform})"


def windowed_layers(cfg: ModelConfig) -> np.ndarray:
    """Which layers use the sliding window [L] (bool): none without one, else those from window_layers on."""
    return (np.arange(cfg.layers) >= cfg.window_layers) & (cfg.sliding_window > 0)


def _static_window(windowed) -> bool | None:
    """A per-layer window flag known at trace time (a Python or NumPy bool: the sampler's unrolled layers),
    else None (a traced flag from the layer scan, or None itself)."""
    return bool(windowed) if isinstance(windowed, (bool, np.bool_)) else None


def _window_pattern(cfg: ModelConfig) -> str:
    """ "none" (no layer is windowed), "all" or "mixed" (a traced per-layer flag decides)."""
    flags = windowed_layers(cfg)
    return "all" if flags.all() else "none" if not flags.any() else "mixed"


def window_mask(query_T, key_S, window, windowed=True):
    """Keys a query may see under a sliding window [T, S] (bool; causality apart): key index > query index -
    window, as transformers' sliding_window_overlay. `windowed` (a traced per-layer flag) False lifts it."""
    return (key_S[None, :] > query_T[:, None] - window) | jnp.logical_not(windowed)


def xla_attention(
    q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg: ModelConfig, windowed=None, implementation: str = "xla"
):
    """jax.nn.dot_product_attention with a dense [B, 1, T, T] mask for segments and the window (XLA; or cuDNN
    with that mask turned into a bias)."""
    mask = None
    if segment_ids_BT is not None:
        # Packed sequences: attend only within the same segment; causality comes from is_causal.
        mask = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
    if cfg.sliding_window:
        index_T = jnp.arange(q_BTNH.shape[1])
        local_TT = window_mask(index_T, index_T, cfg.sliding_window, True if windowed is None else windowed)
        mask = local_TT[None, None] if mask is None else mask & local_TT[None, None]
    return jax.nn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, mask=mask, is_causal=True, implementation=implementation
    )


def cudnn_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg: ModelConfig, windowed=None):
    """cuDNN flash attention: causal, the window as cuDNN's own sliding window when every layer has it;
    segments (and a per-layer window) as a mask, which cuDNN takes as a bias."""
    T = q_BTNH.shape[1]
    pattern = _window_pattern(cfg)
    if pattern == "mixed" and _static_window(windowed) is not None:
        pattern = "all" if windowed else "none"
    if segment_ids_BT is None and pattern != "mixed":
        window = (cfg.sliding_window - 1, 0) if pattern == "all" else None
        return jax.nn.dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, is_causal=True, local_window_size=window, implementation="cudnn"
        )
    # cuDNN trains with a bias only on even lengths; the rare odd one takes XLA.
    return xla_attention(
        q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg, windowed, implementation="cudnn" if T % 2 == 0 else "xla"
    )


def _splash_blocks(T: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b = next(b for b in (512, 256, SPLASH_LANES) if T % b == 0)
    return sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        use_fused_bwd_kernel=True,
    )


@functools.lru_cache(maxsize=64)
def splash_kernel(heads: int, T: int, window: int, interpret: bool):
    """A splash kernel for one row: q [heads, T, Dh], k and v [kv heads, T, Dh] (grouped queries when fewer),
    causal, or causal within `window` (> 0) keys; built once per shape (its block map is numpy work)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.LocalMask((T, T), (window - 1, 0), 0) if window else sm.CausalMask((T, T))
    with jax.ensure_compile_time_eval():  # concrete block maps, not tracers of the first trace that asked
        return sk.make_splash_mha(
            sm.MultiHeadMask([one] * heads),
            block_sizes=_splash_blocks(T),
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _splash_local(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, window: int, interpret: bool):
    """Splash attention of one device's rows and heads (q already scaled, T a multiple of the lanes)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    kernel = splash_kernel(q_BTNH.shape[2], q_BTNH.shape[1], window, interpret)
    q_BNTH, k_BKTH, v_BKTH = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BTKH, v_BTKH))
    if segment_ids_BT is None:
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    else:
        row = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))
        out_BNTH = jax.vmap(row)(q_BNTH, k_BKTH, v_BKTH, segment_ids_BT)
    return out_BNTH.transpose(0, 2, 1, 3)


def _shard_mapped(fn, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    """fn run per device under shard_map over the active mesh's batch and head axes (a Pallas kernel is opaque
    to the partitioner); heads stay whole where q and kv heads are not split alike (each device needs the kv
    heads of its query heads)."""
    active = sharding.active_mesh()
    if active is None:
        return fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    mesh, preset = active
    with warnings.catch_warnings():  # an axis that does not divide is replicated; constrain() has said so
        warnings.simplefilter("ignore", UserWarning)
        q_spec = sharding.spec_for(("batch", None, "heads", None), q_BTNH.shape, preset, mesh)
        kv_spec = sharding.spec_for(("batch", None, "kv_heads", None), k_BTKH.shape, preset, mesh)
    if tuple(q_spec)[2:3] != tuple(kv_spec)[2:3]:
        q_spec = jax.sharding.PartitionSpec(*tuple(q_spec)[:2])
        kv_spec = jax.sharding.PartitionSpec(*tuple(kv_spec)[:2])
    rows = jax.sharding.PartitionSpec(*tuple(q_spec)[:1])
    if segment_ids_BT is None:
        local = lambda q, k, v: fn(q, k, v, None)
        return jax.shard_map(
            local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False
        )(q_BTNH, k_BTKH, v_BTKH)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows), out_specs=q_spec, check_vma=False
    )(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


def splash_attention(
    q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg: ModelConfig, windowed=None, interpret: bool | None = None
):
    """Pallas splash attention [B, T, H, Dh]: rows padded to a multiple of 128 (pads come last, so causality
    hides them from real queries), queries scaled by 1/sqrt(Dh) first (splash does not scale), segment ids
    for packed rows, a LocalMask in windowed layers (both kernels under a lax.cond when only some layers are
    windowed); under a mesh, shard_mapped over its batch and head axes. `interpret`: default off a TPU."""
    if interpret is None:
        interpret = current_platform() != "tpu"
    B, T, H, Dh = q_BTNH.shape
    pad = -T % SPLASH_LANES
    scale = 1.0 / np.sqrt(Dh)
    q_BTNH = (q_BTNH.astype(jnp.float32) * scale).astype(q_BTNH.dtype)
    if pad:
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_BTNH, k_BTKH, v_BTKH = widen(q_BTNH), widen(k_BTKH), widen(v_BTKH)
        if segment_ids_BT is not None:
            segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), mode="edge")
    if segment_ids_BT is not None:
        segment_ids_BT = segment_ids_BT.astype(jnp.int32)

    def run(window):
        local = functools.partial(_splash_local, window=window, interpret=interpret)
        return lambda q, k, v, s: _shard_mapped(local, q, k, v, s)

    pattern = _window_pattern(cfg)
    if pattern == "mixed" and _static_window(windowed) is not None:
        pattern = "all" if windowed else "none"
    args = (q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    if pattern == "none":
        out_BTNH = run(0)(*args)
    elif pattern == "all" or windowed is None:
        out_BTNH = run(cfg.sliding_window)(*args)
    else:
        out_BTNH = jax.lax.cond(windowed, run(cfg.sliding_window), run(0), *args)
    return out_BTNH[:, :T]


def attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg: ModelConfig, windowed=None):
    """Causal self-attention [B, T, H, Dh] of roped q [B, T, H, Dh] and k, v [B, T, K, Dh], within segments
    (None: one sequence per row) and within the sliding window when the layer is `windowed` (a traced bool
    from the layer scan, or a Python bool; None: as configured), by the implementation `resolve(cfg)`
    names."""
    name = resolve(cfg)
    if name == "splash":
        return splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg, windowed)
    if name == "cudnn":
        return cudnn_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg, windowed)
    return xla_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg, windowed)
