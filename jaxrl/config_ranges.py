"""The range table of the config's numeric fields: (dotted key, allowed range) rows, checked by
jaxrl.config.validate. A leaf: it imports nothing from jaxrl."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
    """An allowed range of a numeric field: a test, and how the error message says it ("must be <text>")."""

    test: Callable[[Any], bool]
    text: str


def interval(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Range:
    """lo <= v <= hi (either end open); NaN fails every comparison, so it is refused too."""

    def test(v):
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return Range(test, f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


POSITIVE_INT = Range(lambda v: v >= 1, "a positive integer")
NON_NEGATIVE_INT = Range(lambda v: v >= 0, "a non-negative integer")
POSITIVE = Range(lambda v: math.isfinite(v) and v > 0, "positive and finite")
NON_NEGATIVE = Range(lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")
FINITE = Range(math.isfinite, "finite")
UNIT = interval(0, 1)
UNIT_OPEN_TOP = interval(0, 1, hi_open=True)
MESH_AXIS = Range(lambda v: v == -1 or v >= 1, "-1 (all remaining devices) or a positive integer")

# (dotted key, range) of the fields every stage reads.
RANGES: tuple[tuple[str, Range], ...] = (
    ("seed", NON_NEGATIVE_INT),
    ("model.vocab_size", POSITIVE_INT),
    ("model.hidden", POSITIVE_INT),
    ("model.layers", POSITIVE_INT),
    ("model.heads", POSITIVE_INT),
    ("model.kv_heads", POSITIVE_INT),
    ("model.head_dim", NON_NEGATIVE_INT),  # 0: hidden // heads
    ("model.mlp", POSITIVE_INT),
    ("model.norm_eps", POSITIVE),
    ("model.rope_theta", POSITIVE),
    ("model.rope_factor", POSITIVE),
    ("model.rope_low_freq_factor", POSITIVE),
    ("model.rope_high_freq_factor", POSITIVE),
    ("model.rope_original_max_positions", POSITIVE_INT),
    ("model.init_std", POSITIVE),
    ("model.lora_rank", NON_NEGATIVE_INT),  # 0: off
    ("model.lora_alpha", POSITIVE),
    ("mesh.data", MESH_AXIS),
    ("mesh.fsdp", MESH_AXIS),
    ("mesh.tensor", MESH_AXIS),
    ("optim.lr", NON_NEGATIVE),
    ("optim.warmup_ratio", UNIT),
    ("optim.end_lr_ratio", UNIT),
    ("optim.weight_decay", NON_NEGATIVE),
    ("optim.b1", UNIT_OPEN_TOP),
    ("optim.b2", UNIT_OPEN_TOP),
    ("optim.eps", POSITIVE),
    ("optim.grad_clip", NON_NEGATIVE),  # 0 disables
    ("data.num_train", NON_NEGATIVE_INT),  # 0: every record of a file source
    ("data.num_eval", NON_NEGATIVE_INT),
    ("data.list_size", NON_NEGATIVE_INT),  # 0: pairs; lists need 2 or more (checked with the loss)
    ("data.max_len", POSITIVE_INT),
    ("data.max_prompt_len", POSITIVE_INT),
    ("data.bucket_multiple", POSITIVE_INT),
    ("model.sliding_window", NON_NEGATIVE_INT),  # 0: full attention
    ("model.window_layers", NON_NEGATIVE_INT),
    ("model.logprob_chunk", NON_NEGATIVE_INT),  # 0: unchunked
    ("data.eval_prompts_per_domain", NON_NEGATIVE_INT),  # 0: off
    ("data.eval_max_new", POSITIVE_INT),
    ("data.eval_samples", POSITIVE_INT),
    ("data.eval_temperature", POSITIVE),
    ("data.val_prompts_per_domain", NON_NEGATIVE_INT),  # 0: no validation curve
    ("data.eval_best_of", NON_NEGATIVE_INT),  # 0: no best-of-N ceilings
    ("train.steps", POSITIVE_INT),
    ("train.batch_size", POSITIVE_INT),
    ("train.grad_accum", POSITIVE_INT),
    ("train.log_every", POSITIVE_INT),
    ("train.eval_every", NON_NEGATIVE_INT),  # 0: only at the end
    ("train.checkpoint_every", POSITIVE_INT),
    ("train.keep_checkpoints", POSITIVE_INT),
    ("train.max_skipped_fraction", UNIT),
)

# The loss fields a preference loss reads (stages dpo and online_dpo); label_smoothing's range is per loss.
PREFERENCE_LOSS_RANGES: tuple[tuple[str, Range], ...] = (
    ("loss.beta", POSITIVE),
    ("loss.gamma", NON_NEGATIVE),
    ("loss.nll_alpha", NON_NEGATIVE),
    ("loss.desirable_weight", NON_NEGATIVE),
    ("loss.undesirable_weight", NON_NEGATIVE),
)
# robust divides by 1 - 2ε; cdpo at ε = 1/2 pulls every margin to zero.
LABEL_SMOOTHING_RANGES = {"robust": interval(0, 0.5, hi_open=True), "cdpo": interval(0, 0.5, hi_open=True)}

RL_RANGES: tuple[tuple[str, Range], ...] = (
    ("rl.num_prompts", POSITIVE_INT),
    ("rl.eval_prompts", NON_NEGATIVE_INT),  # 0: no held-out evaluation
    ("rl.rollout_batch", POSITIVE_INT),
    ("rl.samples_per_prompt", POSITIVE_INT),
    ("rl.minibatch", POSITIVE_INT),
    ("rl.epochs", POSITIVE_INT),
    ("rl.max_new_tokens", POSITIVE_INT),
    ("rl.top_k", NON_NEGATIVE_INT),  # 0: off
    ("rl.kl_horizon", POSITIVE_INT),
    ("rl.temperature", POSITIVE),
    ("rl.top_p", interval(0, 1, lo_open=True)),
    ("rl.missing_eos_penalty", FINITE),  # added to the score as is (negative: a penalty)
    ("rl.length_penalty", NON_NEGATIVE),  # subtracted per response token
    ("rl.kl_coef", NON_NEGATIVE),
    ("rl.kl_target", NON_NEGATIVE),  # 0: fixed coefficient
    ("rl.gamma", UNIT),
    ("rl.lam", UNIT),
    ("rl.clip", POSITIVE),
    ("rl.clip_high", NON_NEGATIVE),  # 0: same as clip
    ("rl.value_clip", POSITIVE),
    ("rl.value_coef", NON_NEGATIVE),
    ("rl.value_lr", NON_NEGATIVE),  # 0: same as optim.lr
    ("rl.dual_clip", Range(lambda v: v == 0 or (math.isfinite(v) and v > 1), "0 (off) or finite and > 1")),
    ("rl.entropy_coef", NON_NEGATIVE),
    ("rl.uncertainty_coef", NON_NEGATIVE),
    ("rl.mixture_coef", UNIT),  # 0: the comparison is the policy's own sample; 1: the reference's
    ("rl.lambda_lr", NON_NEGATIVE),  # 0: multipliers fixed at their lambda_init
)
