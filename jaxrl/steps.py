"""Pure train/eval steps per stage, and make_step(): the one place that jits with shardings and donation.

Array names end in their shape: B rows (a pair or a ranked list per row for preference stages), K responses
per row (spelled 2 where only pairs occur), N the rows' responses flattened (B * K), T positions, D width."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl import losses, pairwise, sharding
from jaxrl.config import Config, OptimConfig
from jaxrl.models import logprobs

Batch = dict[str, jax.Array]
Totals = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser updates applied
    params: Any  # pure dict of arrays
    opt_state: Any
    rng: jax.Array  # raw uint32 key of the run's seed; no step reads it yet (it is in every checkpoint)
    skipped: jax.Array  # int32 scalar: updates skipped because the loss or gradient was not finite
    ref_params: Any = None  # frozen reference for on-the-fly DPO log-probs (no optimiser state)
    # A loss's state carried across steps: the running mean of implicit rewards (bco_pair's shift δ), or None.
    loss_state: Any = None
    # A LoRA run's frozen base (jaxrl.models.lora.split): `params` then holds only the trainables (adapters,
    # a scalar head) and the optimiser only their moments; never updated, never checkpointed (setup rebuilds
    # it).
    frozen: Any = None


def new_train_state(
    params, tx: optax.GradientTransformation, seed: int, ref_params=None, loss_state=None, frozen=None
) -> TrainState:
    """The state before the first update: `tx`'s fresh moments for `params`; a frozen `ref_params` or None;
    the loss's carried state (losses.RunningMean for a running-shift loss) or None; a LoRA run's `frozen`
    base (`params` its trainables) or None."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        skipped=jnp.zeros((), jnp.int32),
        ref_params=ref_params,
        loss_state=loss_state,
        frozen=frozen,
    )


def model_params(state: TrainState):
    """The whole model's params of a state: a LoRA run's frozen base with its trainables, else `params`."""
    from jaxrl.models import lora

    return state.params if state.frozen is None else lora.combine(state.frozen, state.params)


def on_frozen_base(objective: Callable, frozen) -> Callable:
    """`objective` of the whole model as a function of a LoRA run's trainables (the gradient is theirs)."""
    from jaxrl.models import lora

    return lambda trainable, *args, **kwargs: objective(lora.combine(frozen, trainable), *args, **kwargs)


def base_as_reference(objective: Callable) -> Callable:
    """A LoRA run's objective whose reference is its own base with the adapters off (lora.adapters_off): the
    reference forward reads the same base arrays, so no second model is held."""
    from jaxrl.models import lora

    return lambda params, *args, **kwargs: objective(
        params, *args, ref_params=lora.adapters_off(params), **kwargs
    )


def initial_loss_state(cfg: Config):
    """The carried loss state a run starts with: an empty running mean for a running-shift loss (bco_pair),
    else None."""
    from jaxrl import listwise

    if cfg.stage == "dpo" and listwise.offline_loss(cfg.loss.name).running_shift:
        return losses.RunningMean.create()
    return None


def learning_rate_schedule(cfg: OptimConfig, total_steps: int, lr=None) -> optax.Schedule:
    """Linear warmup, then constant, linear or cosine decay to end_lr_ratio * lr. `lr` (an array, e.g. one
    member's rate inside a group) replaces cfg.lr in the same formulas."""
    lr = cfg.lr if lr is None else lr
    warmup = int(round(cfg.warmup_ratio * total_steps))
    decay_steps = max(1, total_steps - warmup)
    end = lr * cfg.end_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_ratio)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params):
    # Weight decay on matrices only: not on norm scales or biases (stacked ones are 2-D, so go by path).
    def decays(path, x):
        name = sharding.path_str(path)
        return x.ndim >= 2 and "norm" not in name and not name.endswith("bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, lr=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and the configured schedule (`lr`: see learning_rate_schedule)."""
    schedule = learning_rate_schedule(cfg, total_steps, lr)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask
        )
    )
    return optax.chain(*parts), schedule


def token_logps(model, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """log p(tokens[t] | tokens[<t]) [B, T] in fp32; position 0 (nothing predicts it) is 0. Over sequence
    chunks of model.logprob_chunk positions when set (no [B, T, V] logits; see jaxrl.models.logprobs)."""
    h_BTD = model.hidden(tokens_BT, positions_BT, segment_ids_BT)
    return logprobs.next_token_logps(h_BTD, model.lm_kernel(), tokens_BT, chunk=model.cfg.logprob_chunk)[0]


def sequence_logps(model, tokens_BT, mask_BT):
    """Summed completion log-probs [B] and completion lengths [B]."""
    mask_BT = mask_BT.astype(jnp.float32)
    logp_BT = token_logps(model, tokens_BT)
    return jnp.sum(logp_BT * mask_BT, axis=-1), jnp.sum(mask_BT, axis=-1)


def last_token_index(mask_BT):
    """Index of the last position where mask is set [B] (0 when none is)."""
    T = mask_BT.shape[-1]
    return jnp.max(jnp.where(mask_BT > 0, jnp.arange(T), 0), axis=-1)


def _flatten_pairs(x_BKT):
    return x_BKT.reshape((-1,) + x_BKT.shape[2:])


def sft_totals(batch: Batch, aggregation: str) -> Totals:
    """Whole-batch denominators for SFT, so accumulation count does not change the loss."""
    return {
        "denominator": losses.sft_denominator(batch["loss_mask"], aggregation, batch.get("segment_ids")),
        "tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32)),
    }


def pair_totals(batch: Batch) -> Totals:
    """Whole-batch example count for paired stages."""
    return {
        "examples": jnp.asarray(batch["tokens"].shape[0], jnp.float32),
        "tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32)),
    }


def sft_objective(params, batch: Batch, hp, totals: Totals, *, graphdef, aggregation: str):
    """SFT NLL contribution of a (micro)batch and metric sums already divided by whole-batch totals."""
    model = nnx.merge(graphdef, params)
    # Packed rows carry segment ids and per-segment positions: attention stays within a conversation.
    segment_ids_BT = batch.get("segment_ids")
    logp_BT = token_logps(model, batch["tokens"], batch.get("positions"), segment_ids_BT)
    loss = losses.sft_token_loss(
        logp_BT,
        batch["loss_mask"],
        aggregation=aggregation,
        denominator=totals["denominator"],
        segment_ids_BT=segment_ids_BT,
    )
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    token_nll = -jnp.sum(logp_BT * mask_BT) / totals["tokens"]
    return loss, {"nll_per_token": token_nll, "num_tokens": jnp.sum(mask_BT)}


def rm_objective(params, batch: Batch, hp, totals: Totals, *, graphdef, use_margin: bool):
    """Bradley-Terry loss of a (micro)batch of pairs, reward read at the last completion token."""
    model = nnx.merge(graphdef, params)
    tokens_NT, mask_NT = _flatten_pairs(batch["tokens"]), _flatten_pairs(batch["loss_mask"])
    scores_NT = model.scores(model.hidden(tokens_NT))
    reward_N = jnp.take_along_axis(scores_NT, last_token_index(mask_NT)[:, None], axis=-1)[:, 0]
    reward_B2 = reward_N.reshape(-1, 2)
    margin_B = batch["margin"] if use_margin else jnp.zeros_like(batch["margin"])
    loss_B, metrics = losses.reward_model_loss(reward_B2[:, 0], reward_B2[:, 1], margin_B, hp)
    n = totals["examples"]
    out = {k: jnp.sum(v) / n for k, v in metrics.items()}
    out["mean_reward"] = jnp.sum(reward_B2) / (2 * n)
    out["num_tokens"] = jnp.sum(mask_NT.astype(jnp.float32))
    return jnp.sum(loss_B) / n, out


def policy_seq_logps(model, batch: Batch):
    """Summed log-probs and lengths [B, K] of every row of each example: both rows of a pair (K = 2), or the
    K responses of a ranked list."""
    K = batch["tokens"].shape[1]
    logp_N, len_N = sequence_logps(model, _flatten_pairs(batch["tokens"]), _flatten_pairs(batch["loss_mask"]))
    return logp_N.reshape(-1, K), len_N.reshape(-1, K)


def listwise_objective(
    params, batch: Batch, hp, totals: Totals, *, graphdef, loss_name: str, ref_params=None
):
    """A listwise loss (jaxrl.listwise) of a (micro)batch of ranked lists [B, K]; masked responses (shorter
    lists) change nothing; reference log-probs come cached in the batch or from ref_params."""
    from jaxrl import listwise

    spec = listwise.get_listwise_loss(loss_name)
    logp_BK, len_BK = policy_seq_logps(nnx.merge(graphdef, params), batch)
    if not spec.needs_reference:
        ref_BK = jnp.zeros_like(logp_BK)
    elif ref_params is not None:
        ref_BK = jax.lax.stop_gradient(policy_seq_logps(nnx.merge(graphdef, ref_params), batch)[0])
    else:
        ref_BK = batch["ref_logps"]
    mask_BK = batch["list_mask"]
    lists = listwise.ListLogps(
        logps=logp_BK, ref_logps=ref_BK, scores=batch["scores"], mask=mask_BK, lengths=len_BK
    )
    loss_B, metrics = spec.fn(lists, hp)
    n = totals["examples"]
    out = {k: jnp.sum(v) / n for k, v in metrics.items()}
    out["num_tokens"] = jnp.sum(len_BK * mask_BK)
    return jnp.sum(loss_B) / n, out


def _switched_loss(names: tuple[str, ...], index, seq: pairwise.SeqLogps, hp):
    """The loss `names[index]` on the same log-probs (`index` may be traced: one member of a group per
    loss); its metrics under the union of the names' metric keys, the ones it does not log set to zero."""
    specs = [losses.get_preference_loss(n) for n in names]
    no_ref = seq.replace(
        ref_chosen=jnp.zeros_like(seq.ref_chosen), ref_rejected=jnp.zeros_like(seq.ref_rejected)
    )
    inputs = [seq if spec.needs_reference else no_ref for spec in specs]  # as each loss sees them alone
    proto = {}
    for spec, x in zip(specs, inputs, strict=True):
        for k, v in jax.eval_shape(spec.fn, x, hp)[1].items():
            proto.setdefault(k, v)

    def branch(i):
        def run(hp):
            loss_B, metrics = specs[i].fn(inputs[i], hp)
            return loss_B, {
                k: metrics[k] if k in metrics else jnp.zeros(v.shape, v.dtype)
                for k, v in sorted(proto.items())
            }

        return run

    return jax.lax.switch(index, [branch(i) for i in range(len(specs))], hp)


def preference_objective(
    params,
    batch: Batch,
    hp,
    totals: Totals,
    *,
    graphdef,
    loss_name: str | tuple,
    ref_params=None,
    loss_index=None,
    delta=None,
):
    """A DPO-family loss of a (micro)batch of pairs; reference log-probs come cached in the batch or from
    ref_params. A tuple of names with a `loss_index` selects one of them (see _switched_loss)."""
    names = loss_name if isinstance(loss_name, tuple) else (loss_name,)
    specs = [losses.get_preference_loss(n) for n in names]
    logp_B2, len_B2 = policy_seq_logps(nnx.merge(graphdef, params), batch)
    if not any(spec.needs_reference for spec in specs):
        ref_B2 = jnp.zeros_like(logp_B2)
    elif ref_params is not None:
        ref_B2, _ = policy_seq_logps(nnx.merge(graphdef, ref_params), batch)
        ref_B2 = jax.lax.stop_gradient(ref_B2)
    else:
        ref_B2 = batch["ref_logps"]
    seq = pairwise.SeqLogps(
        chosen=logp_B2[:, 0],
        rejected=logp_B2[:, 1],
        ref_chosen=ref_B2[:, 0],
        ref_rejected=ref_B2[:, 1],
        chosen_len=len_B2[:, 0],
        rejected_len=len_B2[:, 1],
        desirable=batch.get("desirable"),
    )
    if isinstance(loss_name, tuple):
        loss_B, metrics = _switched_loss(names, loss_index, seq, hp)
    elif delta is not None:  # a running-shift loss (bco_pair): the shift carried in the state
        loss_B, metrics = specs[0].fn(seq, hp, delta=delta)
    else:
        loss_B, metrics = specs[0].fn(seq, hp)
    n = totals["examples"]
    out = {k: jnp.sum(v) / n for k, v in metrics.items()}
    out["num_tokens"] = jnp.sum(len_B2)
    return jnp.sum(loss_B) / n, out


def stage_objective(cfg: Config, graphdef):
    """(objective, totals_fn) of an offline stage (sft, rm, dpo), its static settings bound."""
    if cfg.stage == "sft":
        return (
            functools.partial(sft_objective, graphdef=graphdef, aggregation=cfg.loss.sft_aggregation),
            functools.partial(sft_totals, aggregation=cfg.loss.sft_aggregation),
        )
    if cfg.stage == "rm":
        return functools.partial(rm_objective, graphdef=graphdef, use_margin=cfg.loss.rm_margin), pair_totals
    from jaxrl import listwise

    if listwise.is_listwise(cfg.loss.name):
        return functools.partial(listwise_objective, graphdef=graphdef, loss_name=cfg.loss.name), pair_totals
    return (functools.partial(preference_objective, graphdef=graphdef, loss_name=cfg.loss.name), pair_totals)


def loss_hparams(cfg: Config) -> pairwise.LossHParams:
    """The loss hyperparameters as an array pytree (a new value never recompiles): every LossHParams field is
    the loss config's field of the same name, so the defaults live once, in LossConfig."""
    names = [f.name for f in dataclasses.fields(pairwise.LossHParams)]
    return pairwise.LossHParams.create(**{name: getattr(cfg.loss, name) for name in names})


def _microbatches(batch: Batch, grad_accum: int) -> Batch:
    # Row i of microbatch a is row i*A + a of the batch: the leading (sharded) dimension stays whole on
    # every device, so splitting needs no communication.
    def split(x):
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def accumulate(objective: Callable, params, batch: Batch, hp, totals: Totals, grad_accum: int):
    """Loss, metrics and gradients summed over microbatches (each already scaled by whole-batch totals)."""
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(params, batch, hp, totals)
        return loss, metrics, grads

    def body(carry, micro):
        (loss, metrics), grads = grad_fn(params, micro, hp, totals)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    micro = _microbatches(batch, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first, hp, totals)))
    (loss, metrics), grads = zeros
    (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), micro)
    return loss, metrics, grads


def train_step(
    state: TrainState,
    batch: Batch,
    hp,
    *,
    objective: Callable,
    totals_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
):
    """One optimiser update; a non-finite loss, gradient, update or result leaves params and moments untouched
    and is counted."""
    if state.ref_params is not None:
        objective = functools.partial(objective, ref_params=state.ref_params)
    if state.loss_state is not None:
        objective = functools.partial(objective, delta=state.loss_state.mean)
    if state.frozen is not None:
        objective = on_frozen_base(objective, state.frozen)
    totals = totals_fn(batch)
    loss, metrics, grads = accumulate(objective, state.params, batch, hp, totals, grad_accum)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite gradient can still give an update that overflows (optim.lr=1e30): its norm, and the new
    # params' norm, overflow too, so the update is refused before it ruins the weights.
    finite = (
        jnp.isfinite(loss)
        & jnp.isfinite(grad_norm)
        & jnp.isfinite(optax.tree.norm(updates))
        & jnp.isfinite(optax.tree.norm(params))
    )
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    loss_state = state.loss_state
    if loss_state is not None:  # the step's mean implicit reward, chosen and rejected alike (bco_pair's δ)
        reward = 0.5 * (metrics["rewards/chosen"] + metrics["rewards/rejected"])
        loss_state = keep(losses.update_running_mean(loss_state, reward), loss_state)
    new_state = state.replace(
        step=state.step + finite.astype(jnp.int32),
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32),
        loss_state=loss_state,
    )
    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=grad_norm,
        learning_rate=schedule(state.step),
        skipped_steps=new_state.skipped,
    )
    if loss_state is not None:
        metrics["reward_shift"] = loss_state.mean
    return new_state, metrics


def eval_step(
    params, batch: Batch, hp, *, objective: Callable, totals_fn: Callable, ref_params=None, delta=None
):
    """Loss and metrics of a batch without an update (`delta`: a running-shift loss's carried shift)."""
    if ref_params is not None:
        objective = functools.partial(objective, ref_params=ref_params)
    if delta is not None:
        objective = functools.partial(objective, delta=delta)
    loss, metrics = objective(params, batch, hp, totals_fn(batch))
    return dict(metrics, loss=loss)


def bind_step(objective: Callable, totals_fn: Callable, optimizer: tuple, grad_accum: int) -> Callable:
    """train_step with its objective, whole-batch totals and (tx, schedule) bound: (state, batch, hp) ->
    (state, metrics), what make_step jits."""
    tx, schedule = optimizer
    return functools.partial(
        train_step, objective=objective, totals_fn=totals_fn, tx=tx, schedule=schedule, grad_accum=grad_accum
    )


def _is_train_state(x) -> bool:
    return isinstance(x, TrainState)


def frozen_apart(state):
    """(the state with its TrainStates' frozen bases taken out, those bases): `state` is a TrainState or a
    pytree of them (an RL state)."""
    rest = jax.tree.map(
        lambda s: s.replace(frozen=None) if _is_train_state(s) else s, state, is_leaf=_is_train_state
    )
    frozen = jax.tree.map(lambda s: s.frozen if _is_train_state(s) else None, state, is_leaf=_is_train_state)
    return rest, frozen


def frozen_joined(rest, frozen):
    """The inverse of `frozen_apart`."""
    return jax.tree.map(
        lambda s, f: s.replace(frozen=f) if _is_train_state(s) else s, rest, frozen, is_leaf=_is_train_state
    )


class _FrozenArgument:
    """A step jitted as (state without frozen bases, frozen bases, batch, hp): only the first is donated, so a
    LoRA run's base is neither copied nor invalidated (the reference and the sampler keep reading it)."""

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, state, batch, hp):
        rest, frozen = frozen_apart(state)
        new_rest, metrics = self.jitted(rest, frozen, batch, hp)
        return frozen_joined(new_rest, frozen), metrics

    def lower(self, state, batch, hp):
        return self.jitted.lower(*frozen_apart(state), batch, hp)


def make_step(step_fn: Callable, abstract_state, abstract_batch, mesh, preset: str, *, donate: bool = True):
    """jit(step_fn(state, batch, hp)) with state/batch shardings from the rule table and state donation (a
    LoRA run's frozen base is a separate argument, never donated)."""
    state_shardings = sharding.tree_shardings(abstract_state, preset, mesh)
    batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh, preset), abstract_batch)
    rest_shardings, frozen_shardings = frozen_apart(state_shardings)
    if jax.tree.leaves(frozen_shardings):

        def traced_apart(rest, frozen, batch, hp):
            with sharding.use_mesh(mesh, preset):
                new_state, metrics = step_fn(frozen_joined(rest, frozen), batch, hp)
                return frozen_apart(new_state)[0], metrics

        return _FrozenArgument(
            jax.jit(
                traced_apart,
                in_shardings=(rest_shardings, frozen_shardings, batch_shardings, None),
                out_shardings=(rest_shardings, None),
                donate_argnums=(0,) if donate else (),
            )
        )

    def traced(state, batch, hp):
        with sharding.use_mesh(mesh, preset):
            return step_fn(state, batch, hp)

    return jax.jit(
        traced,
        in_shardings=(state_shardings, batch_shardings, None),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,) if donate else (),
    )


def make_eval_step(eval_fn: Callable, abstract_params, abstract_batch, mesh, preset: str):
    """jit(eval_fn(params, batch, hp)) with the same shardings as training."""
    param_shardings = sharding.tree_shardings(abstract_params, preset, mesh)
    batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh, preset), abstract_batch)

    def traced(params, batch, hp):
        with sharding.use_mesh(mesh, preset):
            return eval_fn(params, batch, hp)

    return jax.jit(traced, in_shardings=(param_shardings, batch_shardings, None))
