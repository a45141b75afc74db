"""Chunked token log-probs: exact against the unchunked computation (values and gradients, with entropy and a
logits transform), the unchunked path bitwise the formula it replaced, and no fp32 [B, T, V] array in a
chunked program (its jaxpr, and the compiled temporaries): the DPO gradient, the online-RL runner's PPO update
and rollout scoring, the lm-eval backend's log-likelihoods (with is_greedy), the sampler's trainer log-probs;
the reference sampler projects one position per step. Chunked RL objectives (PPO, online DPO) and rollout
statistics equal unchunked ones within fp32 rounding.

Tolerance: chunking changes no arithmetic per position (each chunk's logits are the same dot products), so
log-probs and entropies come out equal (measured: bitwise, fp32 and bf16 compute, on this CPU); the gradient
of the output projection sums over chunks instead of inside one matmul (another summation order): measured
max |diff| 1.9e-6 on gradients up to 13.8 in fp32 compute. Asserted at atol=rtol=1e-5 (fp32 compute); with
bf16 compute, where each chunk's projection gradient rounds to bf16 before the fp32 sum, measured 0.05 on
13.8 (one bf16 ulp of the largest gradient), asserted at 1e-2 of the largest gradient."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl import pairwise, steps
from jaxrl.config import ModelConfig
from jaxrl.models import init as model_init
from jaxrl.models import logprobs
from jaxrl.models.transformer import init_model

FP32 = dict(atol=1e-5, rtol=1e-5)
CFG = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32")
B, T = 3, 16


@pytest.fixture(scope="module")
def params():
    return nnx.to_pure_dict(nnx.state(init_model(CFG, 0)))


def tokens_and_mask(cfg=CFG, shape=(B, T)):
    tokens = jax.random.randint(jax.random.PRNGKey(1), shape, 0, cfg.vocab_size, dtype=jnp.int32)
    mask = (jnp.arange(shape[-1]) >= 5) & (jnp.arange(shape[-1]) < shape[-1] - 2)
    return tokens, jnp.broadcast_to(mask, shape).astype(jnp.int32)


def sequence_logps_and_grads(cfg, params, tokens, mask):
    """steps.sequence_logps [B] and the gradient of a weighted sum of them."""
    graphdef = model_init.abstract_model(cfg)[0]

    def f(params):
        logp_B, _ = steps.sequence_logps(nnx.merge(graphdef, params), tokens, mask)
        return jnp.sum(logp_B * jnp.arange(1.0, tokens.shape[0] + 1)), logp_B

    (_, logp_B), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return logp_B, grads


def old_token_logps(model, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """The unchunked formula steps.token_logps had before chunking existed."""
    logits_BTV = model.logits(model.hidden(tokens_BT, positions_BT, segment_ids_BT))[:, :-1]
    targets_BT = tokens_BT[:, 1:]
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logp_BT = picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    return jnp.pad(logp_BT, ((0, 0), (1, 0)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unchunked_token_logps_are_bitwise_the_formula_they_replaced(params, dtype):
    cfg = dataclasses.replace(CFG, dtype=dtype)
    graphdef = model_init.abstract_model(cfg)[0]
    tokens, _ = tokens_and_mask()
    new = jax.jit(lambda p: steps.token_logps(nnx.merge(graphdef, p), tokens))(params)
    old = jax.jit(lambda p: old_token_logps(nnx.merge(graphdef, p), tokens))(params)
    np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("chunk", [1, 4, 5, 8])  # T - 1 = 15 targets: 4 and 8 leave a padded last chunk
def test_chunked_sequence_logps_and_gradients_equal_unchunked(params, chunk):
    tokens, mask = tokens_and_mask()
    logp, grads = sequence_logps_and_grads(CFG, params, tokens, mask)
    logp_c, grads_c = sequence_logps_and_grads(
        dataclasses.replace(CFG, logprob_chunk=chunk), params, tokens, mask
    )
    np.testing.assert_allclose(logp_c, logp, **FP32)
    for g_c, g in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g_c, g, **FP32)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_gradients_in_bfloat16_compute_stay_close(tied):
    cfg = dataclasses.replace(CFG, dtype="bfloat16", tie_embeddings=tied)
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0)))
    tokens, mask = tokens_and_mask()
    logp, grads = sequence_logps_and_grads(cfg, params, tokens, mask)
    chunked = dataclasses.replace(cfg, logprob_chunk=4)
    logp_c, grads_c = sequence_logps_and_grads(chunked, params, tokens, mask)
    np.testing.assert_allclose(logp_c, logp, atol=1e-5, rtol=1e-5)  # values: the same bf16 dot products
    for g_c, g in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads), strict=True):
        assert float(jnp.max(jnp.abs(g_c - g))) <= 1e-2 * float(jnp.max(jnp.abs(g))) + 1e-8


def test_chunked_entropy_and_processed_logits_equal_unchunked():
    r = np.random.default_rng(0)
    h_BTD = jnp.asarray(0.25 * r.normal(size=(2, 13, 16)), jnp.float32)  # logits of std ~1, as a model's
    kernel_DV = jnp.asarray(r.normal(size=(16, 50)), jnp.float32)
    targets_BT = jnp.asarray(r.integers(0, 50, size=(2, 13)), jnp.int32)
    tempered = lambda logits: logits / 0.7

    def run(chunk):
        def f(h, kernel):
            logp, entropy = logprobs.token_logps(
                h, kernel, targets_BT, chunk=chunk, with_entropy=True, process=tempered
            )
            return jnp.sum(logp * jnp.cos(h[..., 0])) + jnp.sum(entropy), (logp, entropy)

        (_, values), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h_BTD, kernel_DV)
        return values, grads

    (logp, entropy), grads = run(0)
    # The definitions, by another formula (a different rounding: compared at 1e-4).
    logq_BTV = jax.nn.log_softmax(tempered(jnp.einsum("btd,dv->btv", h_BTD, kernel_DV)), axis=-1)
    np.testing.assert_allclose(entropy, -jnp.sum(jnp.exp(logq_BTV) * logq_BTV, axis=-1), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        logp, jnp.take_along_axis(logq_BTV, targets_BT[..., None], -1)[..., 0], atol=1e-4, rtol=1e-4
    )
    for chunk in (3, 4, 13):
        (logp_c, entropy_c), grads_c = run(chunk)
        np.testing.assert_allclose(logp_c, logp, **FP32)
        np.testing.assert_allclose(entropy_c, entropy, **FP32)
        for g_c, g in zip(grads_c, grads, strict=True):
            np.testing.assert_allclose(g_c, g, **FP32)


def _avals(jaxpr):
    """Every variable's abstract value in a jaxpr and in the jaxprs nested in it (scan, checkpoint, ...)."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _avals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _avals(sub)


def test_a_chunked_dpo_gradient_holds_no_fp32_logits_of_the_whole_sequence():
    cfg = dataclasses.replace(CFG, vocab_size=1024, dtype="bfloat16")
    abstract = model_init.abstract_model(cfg)[1]
    pairs, length = 2, 64
    tokens = jax.ShapeDtypeStruct((pairs, 2, length), jnp.int32)
    ref_logps = jax.ShapeDtypeStruct((pairs, 2), jnp.float32)
    batch = {"tokens": tokens, "loss_mask": tokens, "ref_logps": ref_logps}
    totals = {"examples": jnp.float32(pairs), "tokens": jnp.float32(1)}
    whole = 2 * pairs * (length - 1) * cfg.vocab_size  # fp32 logits of every row and position

    def grad_step(cfg):
        def loss(params, batch):
            return steps.preference_objective(
                params,
                batch,
                pairwise.LossHParams.create(),
                totals,
                graphdef=model_init.abstract_model(cfg)[0],
                loss_name="dpo",
            )[0]

        return jax.jit(jax.grad(loss))

    def largest_fp32_over_vocab(cfg):
        jaxpr = jax.make_jaxpr(grad_step(cfg))(abstract, batch).jaxpr
        return max(
            a.size
            for a in _avals(jaxpr)
            if getattr(a, "dtype", None) == jnp.float32 and cfg.vocab_size in a.shape
        )

    assert largest_fp32_over_vocab(cfg) >= whole  # the check sees the logits when they are there
    chunked = dataclasses.replace(cfg, logprob_chunk=8)
    assert largest_fp32_over_vocab(chunked) == 2 * pairs * 8 * cfg.vocab_size  # one chunk's logits
    # And the compiler's temporaries shrink with them.
    temp = lambda cfg: grad_step(cfg).lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp(chunked) < temp(cfg) - 4 * whole  # one fp32 [2B, T, V] array's bytes at least (measured 1.1)


def test_the_models_token_logps_follow_its_chunk_setting(params):
    tokens, _ = tokens_and_mask()
    tempered = lambda logits: logits / 0.7
    model = nnx.merge(model_init.abstract_model(CFG)[0], params)
    h_BTD = model.hidden(tokens)
    whole = logprobs.token_logps(h_BTD, model.lm_kernel(), tokens, with_entropy=True, process=tempered)
    chunked = nnx.merge(model_init.abstract_model(dataclasses.replace(CFG, logprob_chunk=6))[0], params)
    jaxpr = str(jax.make_jaxpr(lambda h: chunked.token_logps(h, tokens, with_entropy=True))(h_BTD))
    assert "scan" in jaxpr and ("checkpoint" in jaxpr or "remat" in jaxpr)  # the rematerialised chunk loop
    for got, want in zip(
        chunked.token_logps(h_BTD, tokens, with_entropy=True, process=tempered), whole, strict=True
    ):
        np.testing.assert_allclose(got, want, **FP32)


# The other programs that take log-probs over the vocabulary: the RL update and rollout scoring, the lm-eval
# backend's log-likelihoods, the sampler's trainer log-probs.


def largest_fp32_over_vocab(fn, *args, vocab, **static):
    """The size of the largest fp32 array with a vocabulary-sized axis in fn's jaxpr (nested jaxprs too)."""
    jaxpr = jax.make_jaxpr(functools.partial(fn, **static))(*args).jaxpr
    sizes = [a.size for a in _avals(jaxpr) if getattr(a, "dtype", None) == jnp.float32 and vocab in a.shape]
    return max(sizes, default=0)


def rl_batch(rows=8, P=5, N=16, vocab=CFG.vocab_size, seed=0):
    """A rollout batch with left-padded prompts, prefix response masks and training fields."""
    r = np.random.default_rng(seed)
    prompt_mask = np.ones((rows, P), np.int32)
    prompt_mask[: rows // 2, :2] = 0
    lengths = r.integers(1, N + 1, rows)
    return {
        "prompt": np.where(prompt_mask > 0, r.integers(4, vocab, (rows, P)), 0).astype(np.int32),
        "prompt_mask": prompt_mask,
        "response": r.integers(4, vocab, (rows, N)).astype(np.int32),
        "response_mask": np.arange(N)[None] < lengths[:, None],
        "old_logps": (r.normal(size=(rows, N)) - 4).astype(np.float32),
        "ref_logps": np.full((rows, N), -4.0, np.float32),
        "old_values": np.zeros((rows, N), np.float32),
        "returns": np.ones((rows, N), np.float32),
        "advantages": r.normal(size=(rows, N)).astype(np.float32),
    }


@pytest.mark.parametrize("chunk", [3, 16])
def test_greedy_token_logps_chunked_equal_unchunked_and_the_definitions(chunk):
    r = np.random.default_rng(1)
    h_BTD = jnp.asarray(0.25 * r.normal(size=(2, 13, 16)), jnp.float32)
    kernel_DV = jnp.asarray(r.normal(size=(16, 50)), jnp.float32)
    logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, kernel_DV)
    targets_BT = jnp.where(
        jnp.asarray(r.random((2, 13)) < 0.5),
        jnp.argmax(logits_BTV, -1),
        jnp.asarray(r.integers(0, 50, (2, 13))),
    )  # about half the targets are the argmax
    run = lambda c: jax.jit(functools.partial(logprobs.greedy_token_logps, chunk=c))(
        h_BTD, kernel_DV, targets_BT
    )
    (logp, greedy), (logp_c, greedy_c) = run(0), run(chunk)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits_BTV, -1) == targets_BT)
    assert 0 < int(greedy.sum()) < greedy.size
    np.testing.assert_array_equal(greedy_c, greedy)
    np.testing.assert_array_equal(logp, logprobs.token_logps(h_BTD, kernel_DV, targets_BT)[0])
    np.testing.assert_allclose(logp_c, logp, **FP32)


def _rl_config(vocab, chunk, N=16, rows=8):
    from jaxrl.config import Config, DataConfig, RLConfig

    model = dataclasses.replace(CFG, vocab_size=vocab, logprob_chunk=chunk)
    return Config(
        stage="ppo",
        model=model,
        data=DataConfig(max_prompt_len=5, eval_prompts_per_domain=0),
        rl=RLConfig(
            verifiable="gold",
            value_init="policy",
            rollout_batch=rows,
            minibatch=rows,
            max_new_tokens=N,
            temperature=0.7,
            top_p=0.9,
        ),
    )


def _ppo_programs(cfg):
    """The online-RL runner's own programs (jaxrl.rl.programs) of a PPO run of cfg, on one CPU device (so a
    program's temporaries are the whole batch's)."""
    from jaxrl import sharding
    from jaxrl.rl import programs as rl_programs

    graphdef, params = model_init.abstract_model(cfg.model)
    value_graphdef, value_params = model_init.abstract_model(dataclasses.replace(cfg.model, head="scalar"))
    roles = rl_programs.Roles(
        graphdef=graphdef, params=params, value_graphdef=value_graphdef, value_params=value_params
    )
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    return rl_programs.programs(cfg, mesh, roles, eos_id=1, pad_id=0)


@pytest.mark.parametrize("program", ["train_step", "rollout_stats"])
def test_a_chunked_ppo_update_and_rollout_scoring_hold_no_fp32_logits_of_the_whole_batch(program):
    vocab, rows, N, chunk = 1024, 8, 16, 4
    whole = rows * N * vocab  # fp32 logits of every row and response position
    sizes = {}
    for c in (0, chunk):
        p = _ppo_programs(_rl_config(vocab, c, N, rows))[program]
        sizes[c] = largest_fp32_over_vocab(p.fn, *p.args, vocab=vocab, **p.static)
    assert sizes[0] >= whole  # the check sees the logits when they are there
    assert sizes[chunk] < whole and sizes[chunk] <= max(rows * chunk * vocab, vocab * CFG.hidden)
    if program == "train_step":  # and the compiler's temporaries shrink with them
        temp = lambda c: (
            _ppo_programs(_rl_config(vocab, c, N, rows))[program]
            .lower()
            .compile()
            .memory_analysis()
            .temp_size_in_bytes
        )
        assert temp(chunk) < temp(0) - 4 * whole  # more than one fp32 [B, N, V] array (measured: 2.2)


@pytest.mark.parametrize("chunk", [1, 5, 16])  # N = 16 responses: 5 leaves a padded last chunk
def test_chunked_rl_objectives_equal_unchunked(params, chunk):
    """PPO's clipped surrogate (+ entropy bonus and KL loss) and online DPO's loss: values, metrics and
    gradients chunked as unchunked within fp32 rounding; rollout statistics too.

    Measured (fp32 compute, chunks 1 and 5): PPO loss 1.2e-7 on 0.63, metrics within 3.3e-7 relative (about
    half of them bitwise), gradients max |diff| 2.4e-7 on gradients up to 0.97 (the output projection's
    gradient sums over chunks); rollout log-probs and entropies 4.8e-7 (one ulp at |x| ~ 4-8); a chunk of
    N (= one chunk) bitwise. Asserted at atol=rtol=1e-5."""
    from jaxrl.rl import advantages, objectives
    from jaxrl.rl.losses import RLHParams

    batch = rl_batch()
    hp = RLHParams.create(temperature=0.7, kl_coef=0.1, entropy_coef=0.01)
    totals = advantages.aggregation_totals(jnp.asarray(batch["response_mask"]), 16)
    graphdef, chunked = (
        model_init.abstract_model(dataclasses.replace(CFG, logprob_chunk=c))[0] for c in (0, chunk)
    )

    def policy(graphdef):
        f = functools.partial(
            objectives.policy_objective,
            graphdef=graphdef,
            aggregation="dapo",
            kl_loss_estimator="k3",
            recompute_old_logps=False,
        )
        return jax.jit(jax.value_and_grad(lambda p: f(p, batch, hp, totals), has_aux=True))(params)

    (loss, metrics), grads = policy(graphdef)
    (loss_c, metrics_c), grads_c = policy(chunked)
    np.testing.assert_allclose(loss_c, loss, **FP32)
    for k in metrics:
        np.testing.assert_allclose(metrics_c[k], metrics[k], **FP32, err_msg=k)
    for g_c, g in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g_c, g, **FP32)

    pairs = {
        "prompt": batch["prompt"][:4],
        "prompt_mask": batch["prompt_mask"][:4],
        "response": batch["response"].reshape(4, 2, 16),
        "response_mask": batch["response_mask"].reshape(4, 2, 16),
        "ref_logps": np.full((4, 2), -40.0, np.float32),
        "weight": np.ones(4, np.float32),
    }

    def dpo(graphdef):
        f = functools.partial(objectives.online_dpo_objective, graphdef=graphdef, loss_name="dpo")
        hp = pairwise.LossHParams.create()
        return jax.jit(jax.value_and_grad(lambda p: f(p, pairs, hp, {"pairs": jnp.float32(4)})[0]))(params)

    (loss, grads), (loss_c, grads_c) = dpo(graphdef), dpo(chunked)
    np.testing.assert_allclose(loss_c, loss, **FP32)
    for g_c, g in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g_c, g, **FP32)

    def stats(graphdef):
        f = functools.partial(
            objectives.rollout_stats,
            graphdef=graphdef,
            value_graphdef=None,
            sequence_logps=True,
        )
        return jax.jit(lambda p: f({"policy": p, "ref": p}, batch, hp))(params)

    out, out_c = stats(graphdef), stats(chunked)
    for k in out:
        np.testing.assert_allclose(out_c[k], out[k], **FP32, err_msg=k)


def test_chunked_lm_eval_scores_equal_unchunked_without_whole_logits(params):
    from jaxrl.eval.backend import continuation_scores

    vocab = 1024
    cfg = dataclasses.replace(CFG, vocab_size=vocab)
    big = nnx.to_pure_dict(nnx.state(init_model(cfg, 0)))
    model = nnx.merge(model_init.abstract_model(cfg)[0], big)
    tokens, mask = tokens_and_mask(cfg)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    h = model.hidden(inputs)
    targets = jnp.where(jnp.arange(T - 1) % 2 == 0, jnp.argmax(model.logits(h), -1), targets)  # some greedy
    score = lambda chunk: jax.jit(lambda i, t, m: continuation_scores(model, i, t, m, chunk))(
        inputs, targets, mask[:, 1:]
    )
    (logp, greedy), (logp_c, greedy_c) = score(0), score(4)
    np.testing.assert_allclose(logp_c, logp, **FP32)
    np.testing.assert_array_equal(greedy_c, greedy)
    short = jnp.zeros_like(mask[:, 1:]).at[:, 2:5:2].set(1)  # only greedy targets: is_greedy holds
    assert bool(jnp.all(score(4)[1] == score(0)[1])) and bool(
        jax.jit(lambda m: continuation_scores(model, inputs, targets, m, 4))(short)[1].all()
    )
    whole = B * (T - 1) * vocab
    sizes = {
        c: largest_fp32_over_vocab(
            lambda i, t, m, c=c: continuation_scores(model, i, t, m, c),
            inputs,
            targets,
            mask[:, 1:],
            vocab=vocab,
        )
        for c in (0, 4)
    }
    assert sizes[0] >= whole and sizes[4] == B * 4 * vocab


def test_sampler_trainer_logps_chunked_and_reference_sampler_project_one_position():
    from jaxrl import sampling

    vocab = 1024
    cfg = dataclasses.replace(CFG, vocab_size=vocab, init_std=0.2)
    graphdef, state = nnx.split(init_model(cfg, 0))
    params = nnx.to_pure_dict(state)
    ids, mask = sampling.left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13], [3], [20, 21, 22, 23]], 0)
    key = jax.random.PRNGKey(0)
    tokens, _, resp_mask = sampling.sample(
        graphdef, params, ids, mask, key, np.float32(1.0), max_new=8, eos_id=-1, pad_id=0
    )
    chunked = model_init.abstract_model(dataclasses.replace(cfg, logprob_chunk=3))[0]
    for kw in ({}, {"top_p": 0.8}, {"top_k": 5}):
        whole = sampling.response_logps(
            graphdef, params, ids, mask, tokens, resp_mask, temperature=np.float32(0.7), **kw
        )
        part = sampling.response_logps(
            chunked, params, ids, mask, tokens, resp_mask, temperature=np.float32(0.7), **kw
        )
        np.testing.assert_allclose(part, whole, **FP32)
    rows, max_new = 4, 8
    args = (graphdef, params, ids, mask, jax.random.PRNGKey(0), np.float32(1.0))
    static = dict(max_new=max_new, eos_id=-1, pad_id=0, top_p=1.0, top_k=0, active_mesh=None)
    reference = sampling.sample_reference.__wrapped__
    assert largest_fp32_over_vocab(reference, *args, vocab=vocab, **static) == rows * vocab  # one position
    logps = lambda g: sampling.response_logps.__wrapped__(g, params, ids, mask, tokens, resp_mask)
    assert largest_fp32_over_vocab(logps, chunked, vocab=vocab) == rows * 3 * vocab
