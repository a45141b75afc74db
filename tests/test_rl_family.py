"""The rest of the online family: online IPO (online DPO with the IPO loss), Nash-MD (comparisons from the
policy/reference geometric mixture) and constrained RLHF (Lagrange multipliers on constraint rewards)."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl import config as config_lib
from jaxrl import pairwise, rewards, sampling, sharding, train
from jaxrl.config import ConfigError, MeshConfig, ModelConfig
from jaxrl.metrics import read_metrics
from jaxrl.models import init as model_init
from jaxrl.rl import algorithms, constraints, context, mixture, objectives
from jaxrl.rl.losses import RLHParams
from jaxrl.validate import validate

PRESET = "fsdp"
# A wide initialisation: the two models' next-token distributions differ visibly (std 0.02 is near uniform).
SHARP = ModelConfig(
    vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32", init_std=0.3
)


@functools.cache
def mesh1():
    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, preset=PRESET), devices=jax.devices()[:1])


@functools.cache
def model(seed):
    """(graphdef, params) of a sharp tiny LM."""
    return model_init.abstract_model(SHARP)[0], jax.device_get(
        model_init.init_params(SHARP, seed, mesh1(), PRESET)
    )


def prompts(B=8, width=6, seed=0):
    rng = np.random.default_rng(seed)
    return context.fixed_left_pad(
        [list(rng.integers(4, 64, n)) for n in rng.integers(2, width + 1, B)], width, 0
    )


# Online IPO: online DPO's entry with loss.name=ipo.


def test_online_ipo_is_online_dpo_with_the_ipo_loss_and_matches_its_closed_form(run_config):
    variant = algorithms.VARIANTS["online_ipo"]
    cfg = config_lib.override(run_config(), {**variant, "rl.verifiable": "gold", "rl.samples_per_prompt": 2})
    validate(cfg)
    assert algorithms.of(cfg).name == "online_dpo" and cfg.loss.name == "ipo"
    assert "online_ipo" not in algorithms.ALGORITHMS  # a variant of an entry, not an entry

    # A scored rollout: four prompts, two samples each, from the policy; the reference is another model.
    graphdef, policy = model(0)
    _, ref = model(1)
    ids, mask = prompts()
    ids, mask = np.repeat(ids[:4], 2, axis=0), np.repeat(mask[:4], 2, axis=0)
    tokens, sampler_logps, response_mask = sampling.sample(
        graphdef, policy, ids, mask, jax.random.PRNGKey(3), np.float32(1.0), max_new=5, eos_id=2, pad_id=0
    )
    rollout = {
        "prompt": ids,
        "prompt_mask": mask,
        "response": tokens,
        "response_mask": response_mask,
        "sampler_logps": sampler_logps,
    }
    stats = objectives.rollout_stats(
        {"policy": policy, "ref": ref},
        rollout,
        RLHParams.create(),
        graphdef=graphdef,
        value_graphdef=None,
        sequence_logps=True,
    )
    scores = np.asarray([0.1, 0.7, 0.9, 0.2, 0.5, 0.5, 0.0, 1.0], np.float32)  # pair 2 ties
    data = algorithms.of(cfg).prepare(rollout, stats, jnp.asarray(scores), None)
    objective, totals_fn = algorithms.of(cfg).objective(cfg, graphdef)
    beta = 0.3
    hp = pairwise.LossHParams.create(beta=beta)
    loss, metrics = objective(policy, data, hp, totals_fn(data))

    def seq(params):
        logps = sampling.response_logps(graphdef, params, ids, mask, tokens, response_mask)
        return np.asarray(logps).sum(-1).reshape(4, 2)

    pi, pi_ref = seq(policy), seq(ref)
    margins = []
    for p in range(4):
        if scores[2 * p] == scores[2 * p + 1]:
            continue  # a tie trains nothing
        w, l = (0, 1) if scores[2 * p] > scores[2 * p + 1] else (1, 0)
        margins.append((pi[p, w] - pi_ref[p, w]) - (pi[p, l] - pi_ref[p, l]))
    margins = np.asarray(margins)
    np.testing.assert_allclose(float(loss), np.mean((margins - 1 / (2 * beta)) ** 2), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), beta * margins.mean(), rtol=1e-4, atol=1e-6)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(np.mean(margins > 0))


# Nash-MD: the mixture, its sampler, its objective, its run.


def test_mixture_logits_are_the_normalised_geometric_mixture():
    rng = np.random.default_rng(0)
    policy, ref = rng.normal(size=(4, 11)) * 3, rng.normal(size=(4, 11)) * 3
    coef = np.asarray([0.0, 0.25, 0.5, 1.0], np.float32)
    out = np.asarray(mixture.mixture_logits(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(coef)))

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(policy), softmax(ref)
    for b, c in enumerate(coef):
        unnormalised = p[b] ** (1 - c) * q[b] ** c  # π^(1-c) π_ref^c, renormalised
        np.testing.assert_allclose(softmax(out[b]), unnormalised / unnormalised.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(
        out[0], policy[0].astype(np.float32)
    )  # c = 0: the policy's logits as they are
    np.testing.assert_allclose(np.exp(out[1:]).sum(-1), 1.0, rtol=1e-5)  # mixed rows are log-probabilities


def full_recompute_mixture(graphdef, policy, ref, ids, mask, key, temperature, coef, max_new):
    """The mixture sampler's reference: both models' full forward for every token (no cache)."""
    B, P = ids.shape
    tokens = np.concatenate([ids, np.zeros((B, max_new), ids.dtype)], 1)
    valid = np.concatenate([mask, np.ones((B, max_new), mask.dtype)], 1)
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    done = np.zeros(B, bool)
    out_tokens, out_mask = np.zeros((B, max_new), np.int32), np.zeros((B, max_new), bool)
    for i in range(max_new):
        logits = [
            np.asarray(
                nnx.merge(graphdef, p).logits(
                    nnx.merge(graphdef, p).hidden(
                        jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid)
                    )
                )
            )[:, P + i - 1]
            for p in (policy, ref)
        ]
        mixed = mixture.mixture_logits(jnp.asarray(logits[0]), jnp.asarray(logits[1]), jnp.asarray(coef))
        token, _ = sampling.choose(mixed, i, key=key, temperature=jnp.float32(temperature))
        token = np.where(done, 0, np.asarray(token))
        tokens[:, P + i], out_tokens[:, i], out_mask[:, i] = token, token, ~done
        done = done | (token == 2)
    return out_tokens, out_mask


def test_mixture_sampler_matches_the_policy_sampler_and_a_full_recompute_reference():
    graphdef, policy = model(0)
    _, ref = model(1)
    ids, mask = prompts()
    key, kw = jax.random.PRNGKey(7), dict(max_new=6, eos_id=2, pad_id=0)
    coef = np.asarray([0, 0.5, 0, 0.5, 0, 1.0, 0, 0.25], np.float32)
    tokens, logps, response_mask = mixture.sample_mixture(
        graphdef, policy, ref, ids, mask, key, np.float32(0.8), coef, **kw
    )
    tokens, logps, response_mask = (np.asarray(x) for x in (tokens, logps, response_mask))
    # Rows with coefficient 0 are the policy sampler's own draws, bit for bit; the one with 1 the reference's.
    own, own_logps, own_mask = (
        np.asarray(x) for x in sampling.sample(graphdef, policy, ids, mask, key, np.float32(0.8), **kw)
    )
    np.testing.assert_array_equal(tokens[coef == 0], own[coef == 0])
    np.testing.assert_allclose(logps[coef == 0], own_logps[coef == 0], atol=1e-6)  # fusion order aside
    np.testing.assert_array_equal(response_mask[coef == 0], own_mask[coef == 0])
    ref_tokens = np.asarray(sampling.sample(graphdef, ref, ids, mask, key, np.float32(0.8), **kw)[0])
    np.testing.assert_array_equal(tokens[coef == 1], ref_tokens[coef == 1])
    # Every row against a sampler with no cache to get wrong.
    expected_tokens, expected_mask = full_recompute_mixture(
        graphdef, policy, ref, ids, mask, key, 0.8, coef, 6
    )
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(response_mask, expected_mask)
    assert (tokens[coef == 0.5] != own[coef == 0.5]).any()  # the mixture does draw other responses
    # The returned log-probs are the policy's (tempered) ones of the drawn tokens, on every row.
    policy_logps = sampling.response_logps(
        graphdef, policy, ids, mask, tokens, response_mask, temperature=0.8
    )
    np.testing.assert_allclose(logps, np.asarray(policy_logps), atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"top_p": 0.9}, {"top_k": 5, "logps_under": "tempered"}])
def test_mixture_sampler_with_coefficient_zero_is_the_plain_sampler_bitwise(kw):
    """Tokens and masks bit for bit; log-probs too under XLA's default CPU optimisation (measured: all three
    cases, JAXRL_TEST_FULL_XLA=1). The tests' reduced optimisation fuses the two programs' reductions
    differently: up to 1 ulp (measured max |diff| 2.4e-7)."""
    graphdef, policy = model(0)
    _, ref = model(1)
    ids, mask = prompts()
    args = (ids, mask, jax.random.PRNGKey(5), np.float32(0.9))
    kw = dict(max_new=6, eos_id=2, pad_id=0, **kw)
    mixed = mixture.sample_mixture(graphdef, policy, ref, *args, np.zeros(len(ids), np.float32), **kw)
    (tokens, logps, response_mask), (own, own_logps, own_mask) = (
        [np.asarray(x) for x in out] for out in (mixed, sampling.sample(graphdef, policy, *args, **kw))
    )
    np.testing.assert_array_equal(tokens, own)
    np.testing.assert_array_equal(response_mask, own_mask)
    if os.environ.get("JAXRL_TEST_FULL_XLA") == "1":
        np.testing.assert_array_equal(logps, own_logps)
    else:
        np.testing.assert_allclose(logps, own_logps, rtol=0, atol=1e-6)
    assert own_mask.sum() > 2 * len(ids) and len(np.unique(own[own_mask])) > 4  # much was compared


def test_the_mixture_sampler_is_a_client_of_the_samplers_public_api():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(mixture))
    private = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "sampling"
        and node.attr.startswith("_")
    ]
    imported = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "jaxrl.sampling"
        for alias in node.names
    ]
    assert private == [] and not any(name.startswith("_") for name in imported)


def nash_batch(graphdef, params, probability, ref_shift=0.0):
    """Policy samples with their preference probabilities; reference log-probs = the policy's + ref_shift."""
    ids, mask = prompts(B=4)
    tokens, _, response_mask = sampling.sample(
        graphdef, params, ids, mask, jax.random.PRNGKey(0), np.float32(1.0), max_new=5, eos_id=2, pad_id=0
    )
    logps = np.asarray(sampling.response_logps(graphdef, params, ids, mask, tokens, response_mask))
    return {
        "prompt": ids,
        "prompt_mask": mask,
        "response": np.asarray(tokens),
        "response_mask": np.asarray(response_mask),
        "ref_logps": logps + ref_shift * np.asarray(response_mask),
        "probability": np.full(4, probability, np.float32),
        "weight": np.ones(4, np.float32),
    }


def nash_objective():
    graphdef, _ = model(0)
    return functools.partial(objectives.nash_md_objective, graphdef=graphdef)


def sequence_logps(params, batch):
    graphdef, _ = model(0)
    out = sampling.response_logps(
        graphdef, params, batch["prompt"], batch["prompt_mask"], batch["response"], batch["response_mask"]
    )
    return np.asarray(out).sum(-1)


def test_nash_md_objective_closed_form_and_gradient_signs():
    graphdef, params = model(0)
    fn = nash_objective()
    # The value: β Σ_t sg(log π/π_ref) log π − (P − ½) Σ_t log π, averaged over pairs.
    batch = nash_batch(graphdef, params, 0.8, ref_shift=-0.3)
    hp = RLHParams.create(temperature=1.0, kl_coef=0.1)
    loss, metrics = fn(params, batch, hp, objectives.nash_md_totals(batch))
    logp = sequence_logps(params, batch)
    n_tokens = batch["response_mask"].sum(-1)
    expected = 0.1 * 0.3 * logp - (0.8 - 0.5) * logp  # log ratio 0.3 on every valid token
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss/kl"]), (0.3 * n_tokens).mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/probabilities"]), 0.8, rtol=1e-6)

    def step(batch, hp):
        grads = jax.grad(lambda p: fn(p, batch, hp, objectives.nash_md_totals(batch))[0])(params)
        return jax.tree.map(lambda w, g: w - 0.05 * g, params, grads)

    before = logp
    no_kl = RLHParams.create(temperature=1.0, kl_coef=0.0)
    # Preferred to the mixture's sample (P > ½): its probability rises; dispreferred: it falls.
    assert (sequence_logps(step(nash_batch(graphdef, params, 0.9), no_kl), batch) - before).mean() > 0
    assert (sequence_logps(step(nash_batch(graphdef, params, 0.1), no_kl), batch) - before).mean() < 0
    # A tie with the policy above the reference: the KL term alone pulls the sample's probability down.
    kl_only = RLHParams.create(temperature=1.0, kl_coef=1.0)
    assert (
        sequence_logps(step(nash_batch(graphdef, params, 0.5, ref_shift=-1.0), kl_only), batch) - before
    ).mean() < 0


def test_nash_md_pairs_each_policy_sample_with_the_mixture_sample_after_it():
    rng = np.random.default_rng(0)
    B, N = 8, 5
    rollout = {
        "prompt": rng.integers(0, 9, (B, 3)),
        "prompt_mask": np.ones((B, 3)),
        "response": np.arange(B * N).reshape(B, N),
        "response_mask": np.ones((B, N), bool),
    }
    stats = {"ref_logps": rng.normal(size=(B, N))}
    scores = rng.normal(size=B).astype(np.float32)
    data = objectives.nash_md_data(rollout, stats, jnp.asarray(scores), None)
    np.testing.assert_array_equal(data["response"], rollout["response"][0::2])
    np.testing.assert_allclose(data["ref_logps"], stats["ref_logps"][0::2])
    np.testing.assert_allclose(
        data["probability"], 1 / (1 + np.exp(-(scores[0::2] - scores[1::2]))), rtol=1e-6
    )


def test_nash_md_config_rules(run_config):
    cfg = run_config("nash_md", **{"rl.verifiable": "gold", "rl.samples_per_prompt": 2})
    validate(cfg)
    assert algorithms.kl_placement(cfg) == "loss" and algorithms.units(cfg) == (64, 32)
    assert algorithms.policy_rows(cfg) == slice(0, None, 2)
    with pytest.raises(ConfigError, match="samples_per_prompt=2"):
        validate(config_lib.override(cfg, {"rl.samples_per_prompt": 1}))
    with pytest.raises(ConfigError, match="kl_mode"):
        validate(config_lib.override(cfg, {"rl.kl_mode": "reward"}))
    with pytest.raises(ConfigError, match="rl.mixture_coef"):
        validate(config_lib.override(cfg, {"rl.mixture_coef": 1.5}))
    coef = context.mixture_coefs(cfg, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    np.testing.assert_array_equal(np.asarray(coef), np.tile([0.0, 0.5], 64).astype(np.float32))


SMALL = {
    "rl.verifiable": "gold",
    "rl.num_prompts": 64,
    "rl.max_new_tokens": 8,
    "rl.rollout_batch": 16,
    "rl.value_init": "policy",
    "train.steps": 2,
    "train.checkpoint_every": 100,
    "data.eval_prompts_per_domain": 0,
}


@pytest.mark.slow
def test_nash_md_runs_end_to_end_and_logs_its_metrics(sft_run, run_config, tmp_path):
    cfg = run_config(
        "nash_md",
        **{
            **SMALL,
            "rl.samples_per_prompt": 2,
            "rl.minibatch": 16,
            "rl.mixture_coef": 0.5,
            "train.init_from": str(sft_run[1]),
        },
    )
    summary = train.run(validate(cfg), tmp_path / "nash", log=lambda *_: None)
    assert summary["status"] == "finished" and summary["stage"] == "nash_md"
    rows = [r for r in read_metrics(tmp_path / "nash") if "objective/scores" in r]
    assert len(rows) == 2
    for r in rows:
        for name in (
            "loss/score",
            "loss/kl",
            "rewards/probabilities",
            "rewards/chosen",
            "rewards/rejected",
            "objective/kl",
            "policy/entropy_avg",
            "loss/policy_total",
            "debug/logprob_gap_max",
        ):
            assert math.isfinite(r[name]), name
        assert r["mixture_coef"] == 0.5 and 0 < r["rewards/probabilities"] < 1
        assert r["debug/logprob_gap_max"] < 1e-3  # mixture rows report the policy's own log-probs
    # The first iteration's policy is the reference: no KL on the policy's own samples yet.
    assert abs(rows[0]["objective/kl"]) < 1e-4


# Constrained RLHF: the multipliers, the Lagrangian reward, the run.


def test_multipliers_rise_while_violated_and_fall_to_zero_once_satisfied():
    thresholds = {"safety": 0.5}
    lam = {"safety": 0.0}
    trajectory = []
    for value in (0.2, 0.3, 0.4, 0.9, 0.9, 0.9, 0.9):
        lam = constraints.update_multipliers(lam, {"safety": value}, thresholds, lr=0.5)
        trajectory.append(lam["safety"])
    np.testing.assert_allclose(trajectory[:3], [0.15, 0.25, 0.3])  # λ += 0.5 (0.5 − value)
    assert trajectory[3] == pytest.approx(0.1) and trajectory[4:] == [0.0, 0.0, 0.0]  # projected at 0
    # A constraint that holds from the start keeps λ = 0; lr 0 keeps λ where it starts.
    assert constraints.update_multipliers({"a": 0.0}, {"a": 1.0}, {"a": 0.5}, lr=1.0) == {"a": 0.0}
    assert constraints.update_multipliers({"a": 2.0}, {"a": 0.0}, {"a": 0.5}, lr=0.0) == {"a": 2.0}
    metrics = constraints.metrics({"a": 2.0}, {"a": 0.25}, {"a": 0.5})
    assert metrics == {"constraint/a/value": 0.25, "constraint/a/lambda": 2.0, "constraint/a/violation": 0.25}


def test_the_lagrangian_reward_adds_each_weighted_constraint_reward():
    components = {
        "score": np.asarray([1.0, 2.0], np.float32),
        "constraint/a": np.asarray([0.5, 0.0], np.float32),
        "constraint/b": np.asarray([1.0, 3.0], np.float32),
    }
    out = constraints.lagrangian_components(components, {"a": 2.0, "b": 0.5})
    np.testing.assert_allclose(out["score"], [1.0 + 1.0 + 0.5, 2.0 + 0.0 + 1.5])
    np.testing.assert_array_equal(out["objective"], components["score"])
    assert constraints.lagrangian_components(components, {}) is components
    assert constraints.rollout_values(out, {"a": 2.0}, slice(0, None, 2)) == {"a": 0.5}


def test_constraints_parse_and_are_refused_when_malformed():
    specs = rewards.parse_constraints(
        json.dumps(
            [
                {"verifiable": "gold", "threshold": 0.4},
                {
                    "reward_model": "runs/rm_a,runs/rm_b",
                    "threshold": -1,
                    "name": "helpful",
                    "lambda_init": 0.5,
                },
            ]
        )
    )
    assert [(s.name, s.threshold, s.lambda_init) for s in specs] == [
        ("gold", 0.4, 0.0),
        ("helpful", -1.0, 0.5),
    ]
    assert rewards.parse_constraints("") == []
    bad = {
        "JSON list": "{",
        "unknown keys": '[{"verifiable": "gold", "threshold": 1, "weight": 2}]',
        "one reward": '[{"threshold": 1}]',
        "not both": '[{"verifiable": "gold", "reward_model": "x", "threshold": 1}]',
        "threshold": '[{"verifiable": "gold"}]',
        "verifiable must be": '[{"verifiable": "bleu", "threshold": 1}]',
        "lambda_init": '[{"verifiable": "gold", "threshold": 1, "lambda_init": -1}]',
        "used twice": '[{"verifiable": "gold", "threshold": 1}, {"verifiable": "gold", "threshold": 2}]',
        "name must be": '[{"verifiable": "gold", "threshold": 1, "name": "a/b"}]',
    }
    for message, text in bad.items():
        with pytest.raises(ConfigError, match=message):
            rewards.parse_constraints(text)


def test_constraint_config_is_validated(run_config):
    cfg = run_config(
        "ppo", **{**SMALL, "rl.minibatch": 8, "rl.constraints": '[{"verifiable": "gold", "threshold": 0.5}]'}
    )
    validate(cfg)
    with pytest.raises(ConfigError, match="rl.constraints"):
        validate(config_lib.override(cfg, {"rl.constraints": '[{"verifiable": "gold"}]'}))
    with pytest.raises(ConfigError, match="rl.lambda_lr"):
        validate(config_lib.override(cfg, {"rl.lambda_lr": -1.0}))


@pytest.mark.slow
def test_constrained_ppo_logs_its_multipliers_and_resumes_exactly(sft_run, run_config, tmp_path):
    overrides = {
        **SMALL,
        "train.init_from": str(sft_run[1]),
        "rl.minibatch": 8,
        "train.steps": 4,
        "train.checkpoint_every": 2,
        # Unreachable: the multiplier rises every iteration and reweighs the reward the policy sees.
        "rl.constraints": '[{"verifiable": "gold", "threshold": 0.95, "name": "gold_floor"}]',
        "rl.lambda_lr": 2.0,
    }
    cfg = validate(run_config("ppo", **overrides))
    train.run(cfg, tmp_path / "whole", log=lambda *_: None)
    assert train.run(cfg, tmp_path / "split", log=lambda *_: None, stop_after=2) == {"stopped_at": 2}
    train.run(cfg, tmp_path / "split", log=lambda *_: None)

    def rows(workdir):
        return [
            {k: v for k, v in r.items() if not k.startswith("time/")}
            for r in read_metrics(workdir)
            if "objective/scores" in r
        ]

    whole, split = rows(tmp_path / "whole"), rows(tmp_path / "split")
    assert len(whole) == 4 and whole == split
    lambdas = [r["constraint/gold_floor/lambda"] for r in whole]
    assert lambdas[0] == 0.0 and all(b > a for a, b in zip(lambdas, lambdas[1:], strict=False))
    for r, next_lambda in zip(whole, lambdas[1:], strict=False):
        assert next_lambda == pytest.approx(
            r["constraint/gold_floor/lambda"] + 2.0 * (0.95 - r["constraint/gold_floor/value"])
        )
        assert r["constraint/gold_floor/violation"] == pytest.approx(0.95 - r["constraint/gold_floor/value"])
    # The policy's reward is the objective's plus λ times the constraint's.
    last = whole[-1]
    assert last["objective/scores"] == pytest.approx(
        last["rewards/objective/mean"] + lambdas[-1] * last["rewards/constraint/gold_floor/mean"], rel=1e-5
    )
