"""Token log-probs (and entropies) from hidden states and the output projection, whole or over sequence
chunks. Chunked, each chunk's logits [B, C, V] are made, used and dropped inside a rematerialised scan step,
so no fp32 [B, T, V] array exists in the forward or the backward program: at Llama-3's 128k vocabulary that
array is 1 GiB per 2048-token row."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def lm_logits(h_BTD, kernel_DV):
    """Next-token logits [B, T, V] in fp32: fp32 accumulation over a compute-dtype matmul (the kernel is cast
    to h's dtype here, so a caller may pass the fp32 master weights)."""
    kernel_DV = kernel_DV.astype(h_BTD.dtype)
    return jnp.einsum("btd,dv->btv", h_BTD, kernel_DV, preferred_element_type=jnp.float32)


def logps_from_logits(logits_BTV, targets_BT, with_entropy: bool = False):
    """(log p(targets) [B, T], entropy [B, T] or None) of fp32 logits."""
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    if not with_entropy:
        return picked_BT - logz_BT, None
    probs_BTV = jnp.exp(logits_BTV - logz_BT[..., None])
    return picked_BT - logz_BT, logz_BT - jnp.sum(probs_BTV * logits_BTV, axis=-1)


def _over_positions(per_position: Callable, h_BTD, kernel_DV, targets_BT, chunk: int):
    """`per_position(logits [B, C, V] fp32, targets [B, C])` -> a tuple of [B, C] arrays (or None), over all T
    positions at once (`chunk` 0 or >= T) or over T-chunks of `chunk` positions (the last one padded) in a
    lax.scan whose step is jax.checkpoint-ed, so the backward pass recomputes each chunk's logits rather than
    keeping them; the projection's gradient sums over chunks in the kernel's own dtype (fp32 master weights:
    fp32). Each position's logits are the same dot products either way; what follows them may fuse and round
    differently (measured: log-probs within an fp32 ulp, tests/test_logprobs.py)."""
    B, T, D = h_BTD.shape
    if chunk <= 0 or chunk >= T:
        return per_position(lm_logits(h_BTD, kernel_DV), targets_BT)

    @jax.checkpoint
    def one_chunk(kernel_DV, h_BCD, targets_BC):
        return per_position(lm_logits(h_BCD, kernel_DV), targets_BC)

    n = -(-T // chunk)
    pad = n * chunk - T
    h_NBCD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    targets_NBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)
    step = lambda carry, xs: (carry, one_chunk(kernel_DV, *xs))
    _, out_NBC = jax.lax.scan(step, None, (h_NBCD, targets_NBC))
    return jax.tree.map(lambda x_NBC: x_NBC.swapaxes(0, 1).reshape(B, n * chunk)[:, :T], out_NBC)


def token_logps(
    h_BTD,
    kernel_DV,
    targets_BT,
    *,
    chunk: int = 0,
    with_entropy: bool = False,
    process: Callable | None = None,
):
    """(log p(targets[t] | h[t]) [B, T], entropy [B, T] or None) in fp32, from hidden states [B, T, D] and the
    output projection [D, V]. `process` maps logits [B, C, V] to the logits of the distribution wanted
    (temperature, top-k, ...; per position, so it chunks). `chunk` 0 (or >= T): one [B, T, V] array; C > 0:
    over T-chunks of C positions, rematerialised in the backward pass (`_over_positions`)."""

    def per_position(logits_BCV, targets_BC):
        return logps_from_logits(process(logits_BCV) if process else logits_BCV, targets_BC, with_entropy)

    return _over_positions(per_position, h_BTD, kernel_DV, targets_BT, chunk)


def greedy_token_logps(h_BTD, kernel_DV, targets_BT, *, chunk: int = 0):
    """(log p(targets[t] | h[t]) [B, T] in fp32, whether targets[t] is the argmax of the logits [B, T]), over
    chunks as `token_logps` (lm-eval's log-likelihood and is_greedy without a [B, T, V] array). The argmax
    is jnp.argmax's (the first of tied maxima), of the same fp32 logits the log-probs are taken from."""

    def per_position(logits_BCV, targets_BC):
        logp_BC = logps_from_logits(logits_BCV, targets_BC)[0]
        return logp_BC, jnp.argmax(logits_BCV, axis=-1) == targets_BC

    return _over_positions(per_position, h_BTD, kernel_DV, targets_BT, chunk)


def next_token_logps(
    h_BTD,
    kernel_DV,
    tokens_BT,
    *,
    chunk: int = 0,
    with_entropy: bool = False,
    process: Callable | None = None,
):
    """(log p(tokens[t] | tokens[<t]) [B, T], entropy of the distribution at t [B, T] or None) in fp32, from
    the hidden states of the same tokens; position 0 (nothing predicts it) is 0 in both."""
    logp_BT, entropy_BT = token_logps(
        h_BTD[:, :-1], kernel_DV, tokens_BT[:, 1:], chunk=chunk, with_entropy=with_entropy, process=process
    )
    shift = lambda x_BT: jnp.pad(x_BT, ((0, 0), (1, 0)))
    return shift(logp_BT), None if entropy_BT is None else shift(entropy_BT)
