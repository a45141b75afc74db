"""Sampling from the token-level geometric mixture of the policy and the reference, Nash-MD's comparison
policy (Munos et al. 2023, "Nash Learning from Human Feedback"; TRL's `GeometricMixtureWrapper`).

At every step the next token is drawn from log-softmax((1 - c) * policy logits + c * reference logits), then
the run's temperature / top-k / top-p (`jaxrl.sampling.process_logits`), c the row's mixture coefficient: the
normalised product policy^(1-c) * reference^c, token by token (the paper defines the mixture over whole
sequences; token by token is its practical form, as in TRL). A row with c = 0 is sampled from the policy's
logits unchanged, so it draws exactly the tokens `jaxrl.sampling.sample` draws for it with the same key.

The KV-cache sampler of `jaxrl.sampling` decodes one model and takes no logits hook, so this module runs its
prefill / decode steps (`_prefill`, `_decode`, `_compute_params`, `DecodeState`) for two models side by side,
one cache each. What the sampler would need to own this: `sample(..., ref_params=None, mixture_coef_B=None)`
(a second model's cache and a per-row mixing of the two models' logits before `process_logits`), or a general
`logits_fn(step, logits_BV, extra_logits_BV)` hook with an extra model's cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl import sampling, sharding
from jaxrl.models.transformer import rope_frequencies
from jaxrl.sharding import constrain


def mixture_logits(policy_logits_BV, ref_logits_BV, coef_B):
    """Logits [B, V] (fp32) of the geometric mixture: log-softmax((1 - c)·policy + c·reference) per row, the
    policy's logits unchanged where c = 0."""
    policy_BV = policy_logits_BV.astype(jnp.float32)
    c_B1 = jnp.asarray(coef_B, jnp.float32)[:, None]
    mixed_BV = jax.nn.log_softmax(
        (1.0 - c_B1) * policy_BV + c_B1 * ref_logits_BV.astype(jnp.float32), axis=-1
    )
    return jnp.where(c_B1 > 0, mixed_BV, policy_BV)


def _record(state, policy_BV, ref_BV, coef_B, key, temperature, *, top_k, top_p, eos_id, pad_id):
    """Samples token `state.step` from the mixture and writes it with the *policy's* log-prob of it under the
    processed distribution (pad, log-prob 0, mask off once a row is done)."""
    i = state.step
    token_B, _ = sampling._choose(
        mixture_logits(policy_BV, ref_BV, coef_B), key, i, temperature, top_k, top_p
    )
    processed_BV = sampling.process_logits(policy_BV, temperature, top_k=top_k, top_p=top_p)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(processed_BV, axis=-1), token_B[:, None], axis=-1)[:, 0]
    return sampling.write_token(state, token_B, logp_B, eos_id=eos_id, pad_id=pad_id)


_STATIC = ("graphdef", "max_new", "eos_id", "pad_id", "top_p", "top_k", "active_mesh")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_mixture(
    graphdef,
    params,
    ref_params,
    prompt_BP,
    prompt_mask_BP,
    key,
    temperature,
    coef_B,
    *,
    max_new: int,
    eos_id: int,
    pad_id: int,
    top_p: float = 1.0,
    top_k: int = 0,
    active_mesh=None,
):
    with sampling._in_mesh(active_mesh):
        cfg = nnx.merge(graphdef, params).cfg
        if cfg.head != "lm":
            raise ValueError("sampling needs an LM head (model.head='lm')")
        B, P = prompt_BP.shape
        prompt_BP = constrain(prompt_BP, ("batch", None))
        prompt_mask_BP = constrain(prompt_mask_BP.astype(jnp.int32), ("batch", None))
        coef_B = constrain(jnp.asarray(coef_B, jnp.float32), ("batch",))
        dtype = jnp.dtype(cfg.dtype)
        inv_freq = jnp.asarray(rope_frequencies(cfg))
        models = []
        for p in (params, ref_params):
            cast_params, layer_params = sampling._compute_params(p, cfg.layers, dtype)
            models.append((nnx.merge(graphdef, cast_params), layer_params))
        (policy, policy_layers), (ref, ref_layers) = models
        policy_BV, k_cache, v_cache = sampling._prefill(
            policy, policy_layers, prompt_BP, prompt_mask_BP, max_new, cfg, inv_freq
        )
        ref_BV, ref_k, ref_v = sampling._prefill(
            ref, ref_layers, prompt_BP, prompt_mask_BP, max_new, cfg, inv_freq
        )
        record = functools.partial(
            _record,
            coef_B=coef_B,
            key=key,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        state = sampling.DecodeState(
            step=jnp.zeros((), jnp.int32),
            tokens_BN=constrain(jnp.full((B, max_new), pad_id, prompt_BP.dtype), ("batch", None)),
            logp_BN=constrain(jnp.zeros((B, max_new), jnp.float32), ("batch", None)),
            mask_BN=constrain(jnp.zeros((B, max_new), bool), ("batch", None)),
            done_B=constrain(jnp.zeros((B,), bool), ("batch",)),
            k_cache=k_cache,
            v_cache=v_cache,
        )
        state = record(state, policy_BV, ref_BV)
        prompt_len_B = jnp.sum(prompt_mask_BP, axis=1)
        slots_S = jnp.arange(P + max_new)
        prompt_valid_BS = jnp.pad(prompt_mask_BP, ((0, 0), (0, max_new))) > 0

        def body(carry):
            # As `sampling.sample`'s loop, once per model: token i-1 goes into slot P+i-1 of both caches.
            state, ref_k, ref_v = carry
            i = state.step
            slot = P + i - 1
            valid_BS = jnp.where(slots_S < P, prompt_valid_BS, slots_S <= slot)
            token_B = jax.lax.dynamic_index_in_dim(state.tokens_BN, i - 1, axis=1, keepdims=False)
            positions_B = prompt_len_B + i - 1
            policy_BV, k_cache, v_cache = sampling._decode(
                policy, policy_layers, state, token_B, slot, positions_B, valid_BS, cfg, inv_freq
            )
            ref_state = state.replace(k_cache=ref_k, v_cache=ref_v)
            ref_BV, ref_k, ref_v = sampling._decode(
                ref, ref_layers, ref_state, token_B, slot, positions_B, valid_BS, cfg, inv_freq
            )
            return record(state.replace(k_cache=k_cache, v_cache=v_cache), policy_BV, ref_BV), ref_k, ref_v

        def cond(carry):
            state = carry[0]
            return (state.step < max_new) & ~jnp.all(state.done_B)

        state = jax.lax.while_loop(cond, body, (state, ref_k, ref_v))[0]
        return state.tokens_BN, state.logp_BN, state.mask_BN


@functools.wraps(_sample_mixture)
def sample_mixture(*args, top_p: float = 1.0, top_k: int = 0, **kwargs):
    """KV-cache sampler of the geometric mixture: up to max_new tokens after left-padded prompts [B, P], row b
    drawn from log-softmax((1 - coef_B[b])·policy + coef_B[b]·reference logits) processed by temperature,
    top-k, top-p. Arguments: (graphdef, params, ref_params, prompt_BP, prompt_mask_BP, key, temperature,
    coef_B); returns tokens [B, N], the *policy's* log-probs [B, N] of those tokens under its processed
    sampling distribution (what the trainer recomputes, so the logged gap stays a numerics check) and a mask
    [B, N] that ends with the first EOS, inclusive."""
    return _sample_mixture(
        *args, top_p=float(top_p), top_k=int(top_k), active_mesh=sharding.active_mesh(), **kwargs
    )
