"""Sampling from the token-level geometric mixture of the policy and the reference, Nash-MD's comparison
policy (Munos et al. 2023, "Nash Learning from Human Feedback"; TRL's `GeometricMixtureWrapper`).

At every step the next token is drawn from log-softmax((1 - c) * policy logits + c * reference logits), then
the run's temperature / top-k / top-p (`jaxrl.sampling.process_logits`), c the row's mixture coefficient: the
normalised product policy^(1-c) * reference^c, token by token (the paper defines the mixture over whole
sequences; token by token is its practical form, as in TRL). A row with c = 0 is sampled from the policy's
logits unchanged, so it draws exactly the tokens `jaxrl.sampling.sample` draws for it with the same key.

A client of the sampler's decode loop (`jaxrl.sampling.decode`): a `JointDecoder` of the two models' KV-cache
decoders gives both logits at each step, and the pick below mixes them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrl import sampling
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


def pick_from_mixture(logits, step, *, coef_B, key, temperature, top_k, top_p, logps_under):
    """A token [B] drawn from the mixture of the (policy [B, V], reference [B, V]) logits, as
    `sampling.choose` draws, and the *policy's* log-prob [B] of it (under its processed distribution, or its
    tempered one with logps_under="tempered")."""
    policy_BV, ref_BV = logits
    mixed_BV = mixture_logits(policy_BV, ref_BV, coef_B)
    token_B, mixed_logp_B = sampling.choose(
        mixed_BV, step, key=key, temperature=temperature, top_k=top_k, top_p=top_p, logps_under=logps_under
    )
    truncation = {} if logps_under == "tempered" else dict(top_k=top_k, top_p=top_p)
    policy_logp_B = sampling.token_logp(policy_BV, token_B, temperature, **truncation)
    # Where c = 0 the mixture is the policy: the draw's own log-prob, as the plain sampler records it.
    return token_B, jnp.where(jnp.asarray(coef_B) > 0, policy_logp_B, mixed_logp_B)


_STATIC = ("graphdef", "max_new", "eos_id", "pad_id", "top_p", "top_k", "logps_under", "active_mesh")


@sampling.with_active_mesh
@functools.partial(jax.jit, static_argnames=_STATIC)
def sample_mixture(
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
    logps_under: str = "processed",
    active_mesh=None,
):
    """KV-cache sampler of the geometric mixture: up to max_new tokens after left-padded prompts [B, P], row b
    drawn from log-softmax((1 - coef_B[b])·policy + coef_B[b]·reference logits) processed by temperature,
    top-k, top-p. Returns tokens [B, N], the *policy's* log-probs [B, N] of those tokens under its processed
    sampling distribution, or its tempered one with logps_under="tempered" (what the trainer recomputes, so
    the logged gap stays a numerics check), and a mask [B, N] that ends with the first EOS, inclusive."""
    with sampling.in_mesh(active_mesh):
        decoder = sampling.JointDecoder(
            (
                sampling.ModelDecoder.create(graphdef, params),
                sampling.ModelDecoder.create(graphdef, ref_params),
            )
        )
        pick = functools.partial(
            pick_from_mixture,
            coef_B=constrain(jnp.asarray(coef_B, jnp.float32), ("batch",)),
            key=key,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            logps_under=logps_under,
        )
        return sampling.decode(
            decoder, prompt_BP, prompt_mask_BP, pick, max_new=max_new, eos_id=eos_id, pad_id=pad_id
        )
