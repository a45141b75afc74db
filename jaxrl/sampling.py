"""Samplers: a KV-cache sampler (the default) and the exact full-recompute reference it must match.

`sample` prefills the left-padded prompts in one forward pass, then decodes one token per step in a
`lax.while_loop` (it stops early once every row has emitted EOS) against a preallocated K/V cache that is
updated in place. The cache is L buffers of [B, K, S, Dh] (S = P + max_new) in the compute dtype rather than
one [L, B, S, K, Dh] array: separate per-layer buffers (and per-layer weights, split and cast once per call)
mean a decode step never copies a layer's slice out of a stack, and K before S makes both attention products
canonical batched matmuls over (B, K), so the cache is read once per step with no transpose.
`sample_reference` re-runs the whole forward for every token: slow, but with no cache to get wrong.

Extension point. `sample` is `decode(ModelDecoder.create(graphdef, params), ..., pick)`: the loop (`decode`)
asks a *decoder* for next-token logits (`prefill` once, then `step` per token, each carrying the decoder's own
cache) and a *pick* function for the token and the log-prob it records (`choose`). Another sampler is a client
that brings its own decoder or pick: `JointDecoder` steps several models side by side over one token stream
(Nash-MD's policy/reference mixture, `jaxrl.rl.mixture`, picks from a mix of their logits).

Log-probabilities. Both samplers return, for each sampled token, its log-probability under the
*processed* sampling distribution: logits / temperature (1 when greedy), then top-k, then top-p,
renormalised (`process_logits`; `response_logps(..., temperature=, top_k=, top_p=)` recomputes them). At
temperature 0 the tokens are the argmax and the log-probs are those of the temperature-1 processed
distribution. With `logps_under="tempered"` they are instead the log-probs under logits / temperature with
no truncation: what jaxrl's RL trainer computes its ratios and KL from (as TRL does; `jaxrl.rl.objectives.
policy_logps`), finite for every token whatever the top-k / top-p, so its rollouts ask for those.
"""

# Shape letters of array names: B batch rows, P prompt slots (left-padded), N new tokens (max_new), T = P + N
# positions of a whole sequence, S cache slots (P + max_new), V vocabulary, D model width, K kv heads, G query
# heads per kv head, Q query heads (K·G; the model code's q_BTNH calls them N), H head size (Dh), C a chunk of
# positions, R the top-k survivors (descending), X any leading axes, 1 an axis of size one.

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl import sharding
from jaxrl.models import attention
from jaxrl.models.transformer import (
    attention_output,
    project_qkv,
    residual_block,
    rms_norm,
    rope_frequencies,
    window_mask,
    windowed_layers,
)
from jaxrl.sharding import constrain

# A removed token's logit: finite, so log_softmax and a trainer's ratios never meet inf - inf, yet its
# probability is exactly 0 in fp32.
REMOVED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


def left_pad(
    prompts: list[list[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids [B, P] and their validity mask [B, P] (P = the longest prompt, or `width`)."""
    width = max(max(len(p) for p in prompts), width or 0)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


def process_logits(logits_XV, temperature, *, top_k: int = 0, top_p: float = 1.0):
    """Sampling logits [..., V] in fp32: / temperature (1 when <= 0), then top-k, then top-p (removed tokens
    get REMOVED_LOGIT; ties with the last kept logit stay). Its log_softmax is the sampling distribution."""
    logits_XV = logits_XV.astype(jnp.float32)
    scaled_XV = logits_XV / jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    V = scaled_XV.shape[-1]
    k = top_k if 0 < top_k < V else V
    if k == V and top_p >= 1.0:
        return scaled_XV  # no sort: top-p's sort over V is the costliest op of a decode step
    top_XR = jax.lax.top_k(scaled_XV, k)[0]  # descending
    if top_p < 1.0:
        probs_XR = jax.nn.softmax(top_XR, axis=-1)  # renormalised over the top-k survivors
        mass_before_XR = jnp.cumsum(probs_XR, axis=-1) - probs_XR
        # The smallest prefix whose mass reaches top_p: keep a token while the mass above it is short of it.
        kept_X1 = jnp.sum(mass_before_XR < top_p, axis=-1, keepdims=True)
        threshold_X1 = jnp.take_along_axis(top_XR, jnp.maximum(kept_X1, 1) - 1, axis=-1)
    else:
        threshold_X1 = top_XR[..., -1:]
    return jnp.where(scaled_XV >= threshold_X1, scaled_XV, REMOVED_LOGIT)


LOGPS_UNDER = ("processed", "tempered")


def _picked_logp(processed_BV, token_B):
    return jnp.take_along_axis(jax.nn.log_softmax(processed_BV, axis=-1), token_B[:, None], axis=-1)[:, 0]


def token_logp(logits_BV, token_B, temperature, *, top_k: int = 0, top_p: float = 1.0):
    """Log-prob [B] of token_B under the processed distribution of logits [B, V] (`process_logits`)."""
    return _picked_logp(process_logits(logits_BV, temperature, top_k=top_k, top_p=top_p), token_B)


def choose(
    logits_BV, step, *, key, temperature, top_k: int = 0, top_p: float = 1.0, logps_under: str = "processed"
):
    """The next token [B] drawn from logits [B, V] (argmax when temperature <= 0; the draw's key is `key`
    folded with `step`) and its log-prob [B] under the processed sampling distribution, or with
    `logps_under="tempered"` under logits / temperature untruncated. `decode`'s default pick."""
    if logps_under not in LOGPS_UNDER:
        raise ValueError(f"logps_under={logps_under!r}; expected one of {LOGPS_UNDER}")
    processed_BV = process_logits(logits_BV, temperature, top_k=top_k, top_p=top_p)
    drawn_B = jax.random.categorical(jax.random.fold_in(key, step), processed_BV)
    token_B = jnp.where(temperature <= 0, jnp.argmax(processed_BV, axis=-1), drawn_B)
    if logps_under == "tempered":
        return token_B, token_logp(logits_BV, token_B, temperature)
    return token_B, _picked_logp(processed_BV, token_B)


@flax.struct.dataclass
class DecodeState:
    """What the decode loop carries: outputs so far, the done flags and the decoder's cache."""

    step: jax.Array  # int32: index of the next token to sample
    tokens_BN: jax.Array
    logp_BN: jax.Array
    mask_BN: jax.Array
    done_B: jax.Array
    cache: Any  # the decoder's (a KVCache for a ModelDecoder)


def write_token(state: DecodeState, token_B, logp_B, *, eos_id, pad_id) -> DecodeState:
    """Writes token `state.step` and its log-prob (pad, log-prob 0 and mask off for rows already done)."""
    i = state.step
    token_B = jnp.where(state.done_B, pad_id, token_B).astype(state.tokens_BN.dtype)

    def put(buf_BN, col_B):
        return constrain(
            jax.lax.dynamic_update_index_in_dim(buf_BN, col_B.astype(buf_BN.dtype), i, axis=1),
            ("batch", None),
        )

    return state.replace(
        step=i + 1,
        tokens_BN=put(state.tokens_BN, token_B),
        logp_BN=put(state.logp_BN, jnp.where(state.done_B, 0.0, logp_B)),
        mask_BN=put(state.mask_BN, ~state.done_B),
        done_B=state.done_B | (token_B == eos_id),
    )


def cached_attention(q_B1QH, k_BKSH, v_BKSH, valid_BS):
    """Attention [B, 1, H, Dh] of one new query per row over a cache [B, K, S, Dh] (GQA without repeating kv
    heads: q is grouped to [B, K, H/K, Dh]); slots where valid_BS is false are never attended. Numerics as
    jax.nn.dot_product_attention's XLA path: fp32 scores and softmax, probabilities in the cache dtype."""
    B, _, N, Dh = q_B1QH.shape
    K = k_BKSH.shape[1]
    q_BKGH = q_B1QH.reshape(B, K, N // K, Dh)
    # K before S in the cache keeps both products canonical batched matmuls over (B, K): no cache transpose.
    scores_BKGS = jnp.einsum("bkgh,bksh->bkgs", q_BKGH, k_BKSH, preferred_element_type=jnp.float32)
    scores_BKGS = scores_BKGS * jnp.float32(1.0 / math.sqrt(Dh))
    scores_BKGS = jnp.where(valid_BS[:, None, None, :], scores_BKGS, -0.7 * jnp.finfo(jnp.float32).max)
    probs_BKGS = jax.nn.softmax(scores_BKGS, axis=-1).astype(v_BKSH.dtype)
    out_BKGH = jnp.einsum("bkgs,bksh->bkgh", probs_BKGS, v_BKSH)
    return out_BKGH.reshape(B, 1, N, Dh)


def _compute_params(params, L, dtype):
    """Matmul weights cast once to the compute dtype (not once per step) and split into per-layer trees, so a
    decode step reads each weight once, from its own buffer, with no per-layer slice copied out of a stack."""

    def cast(path, x):
        name = sharding.path_str(path).rsplit("/", 1)[-1]
        return x.astype(dtype) if name in ("kernel", "embedding", "bias", "lora_a", "lora_b") else x

    cast_params = jax.tree_util.tree_map_with_path(cast, params)
    per_layer = [jax.tree.map(lambda a, l=l: a[l], cast_params["layers"]) for l in range(L)]
    return cast_params, per_layer


def _prefill(model, layer_params, prompt_BP, prompt_mask_BP, max_new, cfg, inv_freq):
    """One forward over the prompts [B, P]: last-position logits [B, V] and per-layer caches
    [B, K, P + max_new, Dh]. Attention by `model.attention` (`attention.attend`: XLA, cuDNN or splash)."""
    dtype = jnp.dtype(cfg.dtype)
    # Pads form segment 0 and never attend to or from real tokens; positions count real tokens only.
    positions_BP = jnp.maximum(jnp.cumsum(prompt_mask_BP, axis=1) - 1, 0)
    x_BPD = jnp.take(model.embed.embedding[...], prompt_BP, axis=0).astype(dtype)
    x_BPD = constrain(x_BPD, ("batch", None, "embed"))
    k_cache, v_cache = [], []
    for p, windowed in zip(layer_params, windowed_layers(cfg), strict=True):
        # Slots of real tokens are contiguous (pads are on the left), so slot distance is position distance:
        # the window over slots is the window over positions. `windowed` is a Python bool per layer here.

        def attend(h_BPD, p=p, windowed=bool(windowed)):
            q_BPQH, k_BPKH, v_BPKH = project_qkv(h_BPD, p["attn"], positions_BP, cfg, inv_freq)
            out_BPQH = attention.attend(q_BPQH, k_BPKH, v_BPKH, prompt_mask_BP, cfg, windowed)
            return attention_output(out_BPQH, p["attn"], cfg), (k_BPKH, v_BPKH)

        x_BPD, (k_BPKH, v_BPKH) = residual_block(x_BPD, p, cfg, attend)
        for cache, new_BPKH in ((k_cache, k_BPKH), (v_cache, v_BPKH)):
            cache_BKSH = jnp.pad(new_BPKH.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, max_new), (0, 0)))
            cache.append(constrain(cache_BKSH, ("batch", "kv_heads", None, None)))
    # Only the last position's logits are needed: [B, P, V] in fp32 would dwarf the cache.
    h_B1D = rms_norm(x_BPD[:, -1:], model.final_norm.scale[...], cfg.norm_eps)
    return model.logits(h_B1D)[:, 0], tuple(k_cache), tuple(v_cache)


def _decode(model, layer_params, kv_cache, token_B, slot, positions_B, valid_BS, cfg, inv_freq):
    """Feeds one token per row at cache slot `slot`: next-token logits [B, V] and the updated caches."""
    dtype = jnp.dtype(cfg.dtype)
    x_B1D = jnp.take(model.embed.embedding[...], token_B[:, None], axis=0).astype(dtype)
    x_B1D = constrain(x_B1D, ("batch", None, "embed"))
    k_cache, v_cache = [], []
    layers = zip(layer_params, kv_cache.k, kv_cache.v, windowed_layers(cfg), strict=True)
    for p, k_BKSH, v_BKSH, windowed in layers:
        layer_valid_BS = valid_BS
        if windowed:  # the new token sees the slots (slot - window, slot]
            slot_S = jnp.arange(valid_BS.shape[1])
            layer_valid_BS = valid_BS & window_mask(jnp.asarray(slot)[None], slot_S, cfg.sliding_window)

        def attend(h_B1D, p=p, k_BKSH=k_BKSH, v_BKSH=v_BKSH, valid_BS=layer_valid_BS):
            q_B1QH, k_B1KH, v_B1KH = project_qkv(h_B1D, p["attn"], positions_B[:, None], cfg, inv_freq)
            # In place: the cache buffers are loop carries, so this writes one slot, not a new cache.
            k_BKSH = jax.lax.dynamic_update_slice_in_dim(k_BKSH, k_B1KH.transpose(0, 2, 1, 3), slot, axis=2)
            v_BKSH = jax.lax.dynamic_update_slice_in_dim(v_BKSH, v_B1KH.transpose(0, 2, 1, 3), slot, axis=2)
            out_B1QH = cached_attention(q_B1QH, k_BKSH, v_BKSH, valid_BS)
            return attention_output(out_B1QH, p["attn"], cfg), (k_BKSH, v_BKSH)

        x_B1D, (k_BKSH, v_BKSH) = residual_block(x_B1D, p, cfg, attend)
        k_cache.append(constrain(k_BKSH, ("batch", "kv_heads", None, None)))
        v_cache.append(constrain(v_BKSH, ("batch", "kv_heads", None, None)))
    h_B1D = rms_norm(x_B1D, model.final_norm.scale[...], cfg.norm_eps)
    return model.logits(h_B1D)[:, 0], tuple(k_cache), tuple(v_cache)


@flax.struct.dataclass
class KVCache:
    """A model's K/V cache: L buffers of [B, K, S, Dh] each (S = P + max_new), in the compute dtype."""

    k: tuple
    v: tuple


class Decoder(Protocol):
    """What `decode` asks for next-token logits: `prefill` over the prompts once, then `step` per token. The
    logits are whatever the loop's pick function takes ([B, V] for a ModelDecoder); the cache is any pytree,
    carried by the loop and updated in place."""

    def prefill(self, prompt_BP, prompt_mask_BP, max_new: int) -> tuple[Any, Any]:
        """(logits predicting token 0, cache with room for max_new more slots)."""
        ...

    def step(self, cache, token_B, slot, positions_B, valid_BS) -> tuple[Any, Any]:
        """(logits predicting the next token, cache) after feeding token_B [B] at cache slot `slot`, position
        positions_B [B], attending the slots where valid_BS [B, S] holds."""
        ...


@dataclasses.dataclass(frozen=True)
class ModelDecoder:
    """One model's KV-cache prefill and decode step (a `Decoder`). Build it inside the jitted sampler."""

    model: Any  # merged with the compute-dtype parameters
    layer_params: list
    cfg: Any
    inv_freq: jax.Array

    @classmethod
    def create(cls, graphdef, params) -> ModelDecoder:
        """The decoder of an LM (head 'lm'), its matmul weights cast and split per layer once per call."""
        cfg = nnx.merge(graphdef, params).cfg
        if cfg.head != "lm":
            raise ValueError("sampling needs an LM head (model.head='lm')")
        cast_params, layer_params = _compute_params(params, cfg.layers, jnp.dtype(cfg.dtype))
        inv_freq = jnp.asarray(rope_frequencies(cfg))
        return cls(nnx.merge(graphdef, cast_params), layer_params, cfg, inv_freq)

    def prefill(self, prompt_BP, prompt_mask_BP, max_new: int) -> tuple[jax.Array, KVCache]:
        """Last-position logits [B, V] of the prompts [B, P] and their cache [B, K, P + max_new, Dh] per
        layer."""
        logits_BV, k_cache, v_cache = _prefill(
            self.model, self.layer_params, prompt_BP, prompt_mask_BP, max_new, self.cfg, self.inv_freq
        )
        return logits_BV, KVCache(k_cache, v_cache)

    def step(self, cache: KVCache, token_B, slot, positions_B, valid_BS) -> tuple[jax.Array, KVCache]:
        """Next-token logits [B, V] after token_B [B] at cache slot `slot`, and the updated cache."""
        logits_BV, k_cache, v_cache = _decode(
            self.model,
            self.layer_params,
            cache,
            token_B,
            slot,
            positions_B,
            valid_BS,
            self.cfg,
            self.inv_freq,
        )
        return logits_BV, KVCache(k_cache, v_cache)


@dataclasses.dataclass(frozen=True)
class JointDecoder:
    """Several decoders fed the same tokens side by side (a `Decoder`): logits and caches are tuples, one
    entry per decoder, in order."""

    decoders: tuple

    def prefill(self, prompt_BP, prompt_mask_BP, max_new: int) -> tuple[tuple, tuple]:
        """Each decoder's (logits, cache) of the prompts, as (logits tuple, cache tuple)."""
        out = [d.prefill(prompt_BP, prompt_mask_BP, max_new) for d in self.decoders]
        return tuple(logits for logits, _ in out), tuple(cache for _, cache in out)

    def step(self, cache: tuple, token_B, slot, positions_B, valid_BS) -> tuple[tuple, tuple]:
        """Each decoder's step on its own cache, as (logits tuple, cache tuple)."""
        out = [
            d.step(c, token_B, slot, positions_B, valid_BS) for d, c in zip(self.decoders, cache, strict=True)
        ]
        return tuple(logits for logits, _ in out), tuple(c for _, c in out)


Pick = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]  # (decoder logits, step) -> (token_B, logp_B)


def decode(
    decoder: Decoder, prompt_BP, prompt_mask_BP, pick: Pick, *, max_new: int, eos_id: int, pad_id: int
):
    """The KV-cache decode loop over left-padded prompts [B, P]: `decoder` gives the logits of each next
    token, `pick(logits, step)` the token and the log-prob recorded for it. Returns tokens [B, N], log-probs
    [B, N] and a mask [B, N] that ends with the first EOS, inclusive (pad, log-prob 0 after it). Call it under
    jit; it stops early once every row has emitted EOS."""
    B, P = prompt_BP.shape
    prompt_BP = constrain(prompt_BP, ("batch", None))
    prompt_mask_BP = constrain(prompt_mask_BP.astype(jnp.int32), ("batch", None))
    logits, cache = decoder.prefill(prompt_BP, prompt_mask_BP, max_new)

    def record(state: DecodeState, logits) -> DecodeState:
        token_B, logp_B = pick(logits, state.step)
        return write_token(state, token_B, logp_B, eos_id=eos_id, pad_id=pad_id)

    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        tokens_BN=constrain(jnp.full((B, max_new), pad_id, prompt_BP.dtype), ("batch", None)),
        logp_BN=constrain(jnp.zeros((B, max_new), jnp.float32), ("batch", None)),
        mask_BN=constrain(jnp.zeros((B, max_new), bool), ("batch", None)),
        done_B=constrain(jnp.zeros((B,), bool), ("batch",)),
        cache=cache,
    )
    state = record(state, logits)
    prompt_len_B = jnp.sum(prompt_mask_BP, axis=1)
    slots_S = jnp.arange(P + max_new)
    prompt_valid_BS = jnp.pad(prompt_mask_BP, ((0, 0), (0, max_new))) > 0

    def body(state: DecodeState) -> DecodeState:
        # Token i-1 goes into slot P+i-1 at position len+i-1; every valid slot up to it is attended.
        i = state.step
        slot = P + i - 1
        valid_BS = jnp.where(slots_S < P, prompt_valid_BS, slots_S <= slot)
        token_B = jax.lax.dynamic_index_in_dim(state.tokens_BN, i - 1, axis=1, keepdims=False)
        logits, cache = decoder.step(state.cache, token_B, slot, prompt_len_B + i - 1, valid_BS)
        return record(state.replace(cache=cache), logits)

    def cond(state: DecodeState):
        return (state.step < max_new) & ~jnp.all(state.done_B)

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens_BN, state.logp_BN, state.mask_BN


def with_active_mesh(fn):
    """Calls a jitted fn with the `use_mesh` context of the call as a static argument: the trace (and its
    constrain() calls) then belongs to that mesh, and a jit cache hit never reuses another mesh's trace."""

    @functools.wraps(fn)
    def wrapper(*args, top_p: float = 1.0, top_k: int = 0, **kwargs):
        # Static (hashable) truncation settings: top_p=1 then compiles without the sort over the vocabulary.
        return fn(*args, top_p=float(top_p), top_k=int(top_k), active_mesh=sharding.active_mesh(), **kwargs)

    return wrapper


def in_mesh(active_mesh):
    """The `use_mesh` context of a sampler's static `active_mesh` argument (none when it is None)."""
    return sharding.use_mesh(*active_mesh) if active_mesh is not None else contextlib.nullcontext()


_STATIC = ("graphdef", "max_new", "eos_id", "pad_id", "top_p", "top_k", "logps_under", "active_mesh")


@with_active_mesh
@functools.partial(jax.jit, static_argnames=_STATIC)
def sample(
    graphdef,
    params,
    prompt_BP,
    prompt_mask_BP,
    key,
    temperature,
    *,
    max_new: int,
    eos_id: int,
    pad_id: int,
    top_p: float = 1.0,
    top_k: int = 0,
    logps_under: str = "processed",
    active_mesh=None,
):
    """KV-cache sampler: up to max_new tokens after left-padded prompts [B, P] (temperature 0 is greedy).
    Returns tokens [B, N], log-probs [B, N] of the sampled tokens under the processed sampling distribution
    (or, with logps_under="tempered", under logits / temperature untruncated; see the module docstring) and a
    mask [B, N] that ends with the first EOS, inclusive."""
    with in_mesh(active_mesh):
        pick = functools.partial(
            choose, key=key, temperature=temperature, top_k=top_k, top_p=top_p, logps_under=logps_under
        )
        decoder = ModelDecoder.create(graphdef, params)
        return decode(decoder, prompt_BP, prompt_mask_BP, pick, max_new=max_new, eos_id=eos_id, pad_id=pad_id)


@with_active_mesh
@functools.partial(jax.jit, static_argnames=_STATIC)
def sample_reference(
    graphdef,
    params,
    prompt_BP,
    prompt_mask_BP,
    key,
    temperature,
    *,
    max_new: int,
    eos_id: int,
    pad_id: int,
    top_p: float = 1.0,
    top_k: int = 0,
    logps_under: str = "processed",
    active_mesh=None,
):
    """Full-recompute sampler (re-runs the forward over [B, P + N] per token): the exact reference for
    `sample`, with the same signature, outputs [B, N] and random stream."""
    with in_mesh(active_mesh):
        model = nnx.merge(graphdef, params)
        B, P = prompt_BP.shape
        tokens_BT = jnp.concatenate([prompt_BP, jnp.full((B, max_new), pad_id, prompt_BP.dtype)], axis=1)
        # Pads form segment 0 and never attend to or from real tokens; positions count real tokens only.
        valid_BT = jnp.concatenate([prompt_mask_BP, jnp.ones((B, max_new), prompt_mask_BP.dtype)], axis=1)
        positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
        segments_BT = valid_BT
        pick = functools.partial(
            choose, key=key, temperature=temperature, top_k=top_k, top_p=top_p, logps_under=logps_under
        )

        def body(i, carry):
            tokens_BT, logp_BN, done_B, mask_BN = carry
            # Only the position that predicts token i is projected: the same dot products as its row of the
            # full [B, T, V] logits, which are never made.
            h_BTD = model.hidden(tokens_BT, positions_BT, segments_BT)
            h_B1D = jax.lax.dynamic_slice_in_dim(h_BTD, P + i - 1, 1, axis=1)
            logits_BV = model.logits(h_B1D)[:, 0]
            sampled_B, picked_B = pick(logits_BV, i)
            token_B = jnp.where(done_B, pad_id, sampled_B).astype(tokens_BT.dtype)
            tokens_BT = jax.lax.dynamic_update_index_in_dim(tokens_BT, token_B, P + i, axis=1)
            logp_BN = logp_BN.at[:, i].set(jnp.where(done_B, 0.0, picked_B))
            mask_BN = mask_BN.at[:, i].set(~done_B)
            done_B = done_B | (token_B == eos_id)
            return tokens_BT, logp_BN, done_B, mask_BN

        init = (
            tokens_BT,
            jnp.zeros((B, max_new), jnp.float32),
            jnp.zeros((B,), bool),
            jnp.zeros((B, max_new), bool),
        )
        tokens_BT, logp_BN, _, mask_BN = jax.lax.fori_loop(0, max_new, body, init)
        return tokens_BT[:, P:], logp_BN, mask_BN


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "top_p"))
def response_logps(
    graphdef,
    params,
    prompt_BP,
    prompt_mask_BP,
    response_BN,
    response_mask_BN,
    *,
    temperature=1.0,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """Per-token log-probs [B, N] of given responses after left-padded prompts [B, P], under the processed
    distribution (logits / temperature, top-k, top-p) the samplers report; defaults give plain log-probs.
    Over chunks of `model.logprob_chunk` positions when set (`Transformer.token_logps`: no [B, N, V]
    array)."""
    model = nnx.merge(graphdef, params)
    P = prompt_BP.shape[1]
    tokens_BT = jnp.concatenate([prompt_BP, response_BN], axis=1)
    ones_BN = jnp.ones_like(response_mask_BN, prompt_mask_BP.dtype)
    valid_BT = jnp.concatenate([prompt_mask_BP, ones_BN], axis=1)
    positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
    h_BND = model.hidden(tokens_BT, positions_BT, valid_BT)[:, P - 1 : -1]
    temperature = jnp.asarray(temperature, jnp.float32)
    process = lambda logits_BCV: process_logits(logits_BCV, temperature, top_k=top_k, top_p=top_p)
    picked_BN, _ = model.token_logps(h_BND, response_BN, process=process)
    return jnp.where(response_mask_BN, picked_BN, 0.0)
