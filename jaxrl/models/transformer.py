"""A decoder-only transformer (Llama family knobs) in Flax NNX, with stacked layers run by a scan.

Array names end in their shape: B rows, T positions, D model width, N query heads, K kv heads, H head dim,
F MLP width, R rotary frequencies (H / 2); a 1 is a broadcast axis."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxrl.config import ModelConfig
from jaxrl.models import attention, logprobs
from jaxrl.models.attention import window_mask, windowed_layers  # noqa: F401  (the sampler's, re-exported)
from jaxrl.sharding import constrain

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # recompute the whole block, and keep each layer's input (what "full" holds on the device, [B, T, D] per
    # layer) in pinned host memory between the forward and the backward pass
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=("layer_input",),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def _dtype(name: str):
    return jnp.dtype(name)


class Linear(nnx.Module):
    """A kernel of arbitrary shape (stacked over layers when `layers` > 0), with optional bias, and LoRA
    adapter slots when `lora_rank` > 0: A [*in, r] over the kernel's first `inputs` dims, B [r, *out]. The
    slots start at zero (no RNG drawn, so the base's initialisation is the same with or without them);
    jaxrl.models.lora.init_params fills them."""

    def __init__(self, shape, *, std, param_dtype, rngs, bias_shape=None, layers=0, lora_rank=0, inputs=1):
        lead = (layers,) if layers else ()
        init = jax.nn.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), lead + tuple(shape), param_dtype))
        if bias_shape is not None:
            self.bias = nnx.Param(jnp.zeros(lead + tuple(bias_shape), param_dtype))
        if lora_rank:
            self.lora_a = nnx.Param(jnp.zeros(lead + tuple(shape[:inputs]) + (lora_rank,), param_dtype))
            self.lora_b = nnx.Param(jnp.zeros(lead + (lora_rank,) + tuple(shape[inputs:]), param_dtype))


def _lora_rank(cfg: ModelConfig, path: str) -> int:
    """The adapter rank of the kernel at `path` (its parameter path): model.lora_rank where model.lora_targets
    matches it, else 0."""
    return cfg.lora_rank if cfg.lora_rank and re.search(cfg.lora_targets, path) else 0


class Norm(nnx.Module):
    def __init__(self, size, *, param_dtype, layers=0):
        lead = (layers,) if layers else ()
        self.scale = nnx.Param(jnp.ones(lead + (size,), param_dtype))


class Embed(nnx.Module):
    def __init__(self, vocab, hidden, *, std, param_dtype, rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, hidden), param_dtype) * std)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, layers):
        D, H, K, Dh = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_size
        kw = dict(std=cfg.init_std, param_dtype=_dtype(cfg.param_dtype), rngs=rngs, layers=layers)
        rank = lambda name: _lora_rank(cfg, f"layers/attn/{name}/kernel")
        self.q = Linear((D, H, Dh), bias_shape=(H, Dh) if cfg.qkv_bias else None, lora_rank=rank("q"), **kw)
        self.k = Linear((D, K, Dh), bias_shape=(K, Dh) if cfg.qkv_bias else None, lora_rank=rank("k"), **kw)
        self.v = Linear((D, K, Dh), bias_shape=(K, Dh) if cfg.qkv_bias else None, lora_rank=rank("v"), **kw)
        self.o = Linear((H, Dh, D), lora_rank=rank("o"), inputs=2, **kw)
        pd = _dtype(cfg.param_dtype)
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = (
                Norm(Dh, param_dtype=pd, layers=layers),
                Norm(Dh, param_dtype=pd, layers=layers),
            )
        elif cfg.qk_norm == "full":
            self.q_norm = Norm(H * Dh, param_dtype=pd, layers=layers)
            self.k_norm = Norm(K * Dh, param_dtype=pd, layers=layers)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, layers):
        kw = dict(std=cfg.init_std, param_dtype=_dtype(cfg.param_dtype), rngs=rngs, layers=layers)
        rank = lambda name: _lora_rank(cfg, f"layers/mlp/{name}/kernel")
        self.gate = Linear((cfg.hidden, cfg.mlp), lora_rank=rank("gate"), **kw)
        self.up = Linear((cfg.hidden, cfg.mlp), lora_rank=rank("up"), **kw)
        self.down = Linear((cfg.mlp, cfg.hidden), lora_rank=rank("down"), **kw)


class Layers(nnx.Module):
    """All blocks' parameters, stacked on a leading layer axis."""

    def __init__(self, cfg: ModelConfig, *, rngs):
        pd, L = _dtype(cfg.param_dtype), cfg.layers
        self.attn_norm = Norm(cfg.hidden, param_dtype=pd, layers=L)
        self.attn = Attention(cfg, rngs=rngs, layers=L)
        self.mlp_norm = Norm(cfg.hidden, param_dtype=pd, layers=L)
        self.mlp = MLP(cfg, rngs=rngs, layers=L)


def rms_norm(x_BTD, scale_D, eps):
    """RMSNorm computed in fp32, returned in the input dtype (as HF Llama)."""
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale_D.astype(jnp.float32) * x32).astype(x_BTD.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [Dh/2], with Llama-3 scaling when configured."""
    Dh = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, Dh, 2, dtype=np.float32) / Dh))
    if cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_positions
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x_BTNH, positions_BT, inv_freq):
    """Rotates the two halves of each head (the HF rotate_half convention); angles in fp32."""
    angles_BTR = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos_BT1R, sin_BT1R = jnp.cos(angles_BTR)[:, :, None], jnp.sin(angles_BTR)[:, :, None]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1R - x2 * sin_BT1R, x2 * cos_BT1R + x1 * sin_BT1R], axis=-1)
    return out.astype(x_BTNH.dtype)


def lora_scale(cfg: ModelConfig) -> float:
    """The factor on the adapters' output, lora_alpha / lora_rank (0 without adapters)."""
    return cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0


def with_lora(out, x, p, inputs: int, cfg: ModelConfig):
    """`out` (x times p's kernel over x's last `inputs` dims) plus the adapter's (x @ A) @ B scaled by
    lora_alpha / rank, when p has adapter slots. The kernel is never changed: the base stays frozen and shared
    (a reference with adapters off is the same arrays), and the extra work is 2r per output, r << D."""
    if "lora_a" not in p:
        return out
    dtype = _dtype(cfg.dtype)
    xa = jnp.tensordot(x, p["lora_a"].astype(dtype), axes=inputs) * jnp.asarray(lora_scale(cfg), dtype)
    return out + jnp.tensordot(xa, p["lora_b"].astype(dtype), axes=1)


def _proj(x_BTD, p, cfg: ModelConfig):
    dtype = _dtype(cfg.dtype)
    out = with_lora(jnp.einsum("btd,dnh->btnh", x_BTD, p["kernel"].astype(dtype)), x_BTD, p, 1, cfg)
    return out + p["bias"].astype(dtype) if "bias" in p else out


def project_qkv(x_BTD, p, positions_BT, cfg: ModelConfig, inv_freq):
    """One layer's roped (and QK-normed) q [B, T, H, Dh], k and v [B, T, K, Dh]."""
    B, T, _ = x_BTD.shape
    q_BTNH, k_BTKH, v_BTKH = (_proj(x_BTD, p[n], cfg) for n in ("q", "k", "v"))
    if cfg.qk_norm == "head":
        q_BTNH = rms_norm(q_BTNH, p["q_norm"]["scale"], cfg.norm_eps)
        k_BTKH = rms_norm(k_BTKH, p["k_norm"]["scale"], cfg.norm_eps)
    elif cfg.qk_norm == "full":
        q_BTNH = rms_norm(q_BTNH.reshape(B, T, -1), p["q_norm"]["scale"], cfg.norm_eps).reshape(q_BTNH.shape)
        k_BTKH = rms_norm(k_BTKH.reshape(B, T, -1), p["k_norm"]["scale"], cfg.norm_eps).reshape(k_BTKH.shape)
    q_BTNH = constrain(apply_rope(q_BTNH, positions_BT, inv_freq), ("batch", None, "heads", None))
    k_BTKH = constrain(apply_rope(k_BTKH, positions_BT, inv_freq), ("batch", None, "kv_heads", None))
    return q_BTNH, k_BTKH, constrain(v_BTKH, ("batch", None, "kv_heads", None))


def attention_output(out_BTNH, p, cfg: ModelConfig):
    """The output projection of attention heads back to the model width [B, T, D]."""
    h_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, p["o"]["kernel"].astype(_dtype(cfg.dtype)))
    return with_lora(h_BTD, out_BTNH, p["o"], 2, cfg)


def attention_block(x_BTD, p, positions_BT, segment_ids_BT, cfg: ModelConfig, inv_freq, windowed=None):
    """Self-attention of one layer (GQA, optional QK-norm), causal and within segments, and within the sliding
    window when the layer is `windowed` (a traced bool from the layer scan), by `model.attention`."""
    q_BTNH, k_BTKH, v_BTKH = project_qkv(x_BTD, p, positions_BT, cfg, inv_freq)
    out_BTNH = attention.attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg, windowed)
    return attention_output(out_BTNH, p, cfg)


def mlp_block(x_BTD, p, cfg: ModelConfig):
    """SwiGLU feed-forward of one layer."""
    dtype = _dtype(cfg.dtype)
    gate_BTF = with_lora(x_BTD @ p["gate"]["kernel"].astype(dtype), x_BTD, p["gate"], 1, cfg)
    up_BTF = with_lora(x_BTD @ p["up"]["kernel"].astype(dtype), x_BTD, p["up"], 1, cfg)
    h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", None, "mlp"))
    return with_lora(h_BTF @ p["down"]["kernel"].astype(dtype), h_BTF, p["down"], 1, cfg)


def residual_block(x_BTD, p, cfg: ModelConfig, attend):
    """One block around `attend(h_BTD) -> (out_BTD, extra)`: pre-norm (Llama) or post-norm (OLMo 2) residual
    attention and MLP; returns (x_BTD, extra). The sampler passes a cached attention here."""
    eps = cfg.norm_eps
    if cfg.norm_position == "pre":
        h_BTD, extra = attend(rms_norm(x_BTD, p["attn_norm"]["scale"], eps))
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + mlp_block(rms_norm(x_BTD, p["mlp_norm"]["scale"], eps), p["mlp"], cfg)
    else:
        h_BTD, extra = attend(x_BTD)
        x_BTD = x_BTD + rms_norm(h_BTD, p["attn_norm"]["scale"], eps)
        x_BTD = x_BTD + rms_norm(mlp_block(x_BTD, p["mlp"], cfg), p["mlp_norm"]["scale"], eps)
    return constrain(x_BTD, ("batch", "seq", "embed")), extra


def decoder_layer(x_BTD, p, positions_BT, segment_ids_BT, cfg: ModelConfig, inv_freq, windowed=None):
    """One full-sequence decoder block."""
    attend = lambda h_BTD: (
        attention_block(h_BTD, p["attn"], positions_BT, segment_ids_BT, cfg, inv_freq, windowed),
        None,
    )
    return residual_block(x_BTD, p, cfg, attend)[0]


class Transformer(nnx.Module):
    """Decoder-only LM (head="lm") or scalar model (head="scalar": a reward or value per position)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = _dtype(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.hidden, std=cfg.init_std, param_dtype=pd, rngs=rngs)
        self.layers = Layers(cfg, rngs=rngs)
        self.final_norm = Norm(cfg.hidden, param_dtype=pd)
        if cfg.head == "scalar":
            self.score = Linear((cfg.hidden, 1), std=cfg.init_std, param_dtype=pd, rngs=rngs)
        elif not cfg.tie_embeddings:
            self.lm_head = Linear((cfg.hidden, cfg.vocab_size), std=cfg.init_std, param_dtype=pd, rngs=rngs)

    def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
        """Final-normed hidden states [B, T, D] in the compute dtype."""
        cfg = self.cfg
        dtype = _dtype(cfg.dtype)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD = jnp.take(self.embed.embedding[...], tokens_BT, axis=0).astype(dtype)
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
        inv_freq = jnp.asarray(rope_frequencies(cfg))
        stacked = nnx.to_pure_dict(nnx.state(self.layers))

        def body(x, layer):
            p, windowed = layer
            x = checkpoint_name(x, "layer_input")
            return decoder_layer(x, p, positions_BT, segment_ids_BT, cfg, inv_freq, windowed), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        layers = (stacked, jnp.asarray(windowed_layers(cfg)))
        x_BTD, _ = jax.lax.scan(body, x_BTD, layers, unroll=1 if cfg.scan_layers else cfg.layers)
        return rms_norm(x_BTD, self.final_norm.scale[...], cfg.norm_eps)

    def lm_kernel(self):
        """The output projection [D, V] (the transposed embedding when tied)."""
        return self.embed.embedding[...].T if self.cfg.tie_embeddings else self.lm_head.kernel[...]

    def logits(self, h_BTD):
        """Next-token logits [B, T, V] in fp32 (fp32 accumulation over a compute-dtype matmul)."""
        return logprobs.lm_logits(h_BTD, self.lm_kernel())

    def token_logps(self, h_BTD, targets_BT, *, with_entropy: bool = False, process=None):
        """(log p(targets[t] | h[t]) [B, T], entropy [B, T] or None) in fp32, over sequence chunks of
        cfg.logprob_chunk positions when set (no [B, T, V] logits): see jaxrl.models.logprobs.token_logps."""
        return logprobs.token_logps(
            h_BTD,
            self.lm_kernel(),
            targets_BT,
            chunk=self.cfg.logprob_chunk,
            with_entropy=with_entropy,
            process=process,
        )

    def scores(self, h_BTD):
        """Scalar head output per position [B, T] in fp32."""
        kernel = self.score.kernel[...].astype(h_BTD.dtype)
        return jnp.einsum("btd,dk->btk", h_BTD, kernel, preferred_element_type=jnp.float32)[..., 0]

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
        h_BTD = self.hidden(tokens_BT, positions_BT, segment_ids_BT)
        return self.scores(h_BTD) if self.cfg.head == "scalar" else self.logits(h_BTD)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: total, embedding, and matmul (non-embedding weights incl. the output head)."""
    D, F, V, L = cfg.hidden, cfg.mlp, cfg.vocab_size, cfg.layers
    H, K, Dh = cfg.heads, cfg.kv_heads, cfg.head_size
    per_layer = D * Dh * (H + 2 * K) + H * Dh * D + 3 * D * F
    head = D if cfg.head == "scalar" else (0 if cfg.tie_embeddings else D * V)
    matmul = L * per_layer + (D * V if cfg.tie_embeddings and cfg.head == "lm" else head)
    biases = (H + 2 * K) * Dh if cfg.qkv_bias else 0
    qk_norms = {"head": 2 * Dh, "full": (H + K) * Dh}.get(cfg.qk_norm, 0)
    norms = L * (2 * D + qk_norms) + D
    total = V * D + L * (per_layer + biases) + head + norms
    return {"total": total, "embedding": V * D, "matmul": matmul}


def flops_per_token(cfg: ModelConfig, seq_len: int, *, backward: bool = True) -> float:
    """Model FLOPs per token: 2N (forward) or 6N (forward+backward) over matmul weights, plus attention
    scores and values 4·L·T·H·Dh forward (12 with backward), counting the full T×T matrix (not halved for
    causality), as in the PaLM/MFU convention."""
    n = count_params(cfg)["matmul"]
    attn = 4 * cfg.layers * seq_len * cfg.heads * cfg.head_size
    mult = 3 if backward else 1
    return mult * (2 * n + attn)


def init_model(cfg: ModelConfig, seed: int) -> Transformer:
    """A freshly initialised model."""
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))
