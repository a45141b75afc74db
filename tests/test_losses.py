"""Losses against closed forms, gradient signs, an independent numpy reference and accumulation invariance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl import losses, pairwise
from jaxrl.pairwise import LossHParams, SeqLogps

PAIRED = ["dpo", "cdpo", "robust", "ipo", "ipo_mean", "hinge", "dpo_norm", "rpo", "simpo", "orpo"]
ALL_LOSSES = PAIRED + ["kto"]
LOG2 = math.log(2.0)


def seq(
    chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_len=None, rejected_len=None, desirable=None
):
    f = lambda x: jnp.asarray(x, jnp.float32)
    chosen = f(chosen)
    fill = lambda x, v: jnp.full(chosen.shape, v, jnp.float32) if x is None else f(x)
    return SeqLogps(
        chosen=chosen,
        rejected=f(rejected),
        ref_chosen=fill(ref_chosen, 0.0),
        ref_rejected=fill(ref_rejected, 0.0),
        chosen_len=fill(chosen_len, 1.0),
        rejected_len=fill(rejected_len, 1.0),
        desirable=None if desirable is None else f(desirable),
    )


def run(name, lp, **hp):
    return losses.get_preference_loss(name).fn(lp, LossHParams.create(**hp))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# h = (-5 - -6) - (-7 - -8) = 0: equal log-ratio margins.
EQUAL_MARGINS = dict(
    chosen=[-5.0, -20.0], rejected=[-7.0, -3.0], ref_chosen=[-6.0, -21.5], ref_rejected=[-8.0, -4.5]
)


@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust", "dpo_norm"])
def test_dpo_like_losses_are_log2_at_equal_margins(name):
    lengths = dict(chosen_len=[3.0, 4.0], rejected_len=[3.0, 4.0])
    loss_B, _ = run(name, seq(**EQUAL_MARGINS, **lengths), beta=0.3, label_smoothing=0.2)
    np.testing.assert_allclose(loss_B, [LOG2, LOG2], rtol=1e-6)


def test_rpo_is_log2_plus_weighted_chosen_nll_at_equal_margins():
    lp = seq(**EQUAL_MARGINS, chosen_len=[2.0, 8.0], rejected_len=[1.0, 1.0])
    loss_B, metrics = run("rpo", lp, beta=0.3, nll_alpha=0.5)
    # NLL = -s_w / |y_w| = 5/2 and 20/8.
    np.testing.assert_allclose(loss_B, [LOG2 + 0.5 * 2.5, LOG2 + 0.5 * 2.5], rtol=1e-6)
    np.testing.assert_allclose(metrics["nll_loss"], [2.5, 2.5], rtol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_at_zero_margin_is_inverse_two_beta_squared(beta):
    for name in ["ipo", "ipo_mean"]:
        loss_B, _ = run(name, seq(**EQUAL_MARGINS), beta=beta)
        np.testing.assert_allclose(loss_B, [1 / (2 * beta) ** 2] * 2, rtol=1e-6)


def test_hinge_closed_form():
    loss_B, _ = run("hinge", seq(**EQUAL_MARGINS), beta=0.5)
    np.testing.assert_allclose(loss_B, [1.0, 1.0], rtol=1e-6)
    # h = 1 and h = 3: 1 - 0.5 = 0.5, and clipped at 0 once beta*h > 1.
    loss_B, _ = run("hinge", seq([1.0, 3.0], [0.0, 0.0]), beta=0.5)
    np.testing.assert_allclose(loss_B, [0.5, 0.0], atol=1e-7)


def test_simpo_closed_form():
    # beta*s_w/|y_w| = 2*-4/2 = -4, beta*s_l/|y_l| = 2*-9/3 = -6, logit = -4 + 6 - 0.5 = 1.5.
    lp = seq([-4.0], [-9.0], ref_chosen=[123.0], ref_rejected=[-77.0], chosen_len=[2.0], rejected_len=[3.0])
    loss_B, metrics = run("simpo", lp, beta=2.0, gamma=0.5)
    np.testing.assert_allclose(loss_B, [math.log1p(math.exp(-1.5))], rtol=1e-6)
    loss_B, metrics = run("simpo", lp, beta=2.0, gamma=0.5, nll_alpha=0.3)
    np.testing.assert_allclose(loss_B, [math.log1p(math.exp(-1.5)) + 0.3 * 2.0], rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], [-4.0])
    np.testing.assert_allclose(metrics["rewards/rejected"], [-6.0])
    np.testing.assert_allclose(metrics["rewards/margins"], [2.0])
    np.testing.assert_allclose(metrics["rewards/accuracies"], [1.0])
    np.testing.assert_allclose(metrics["nll_loss"], [2.0])


def test_orpo_closed_form():
    # p_w = exp(-2/4), p_l = exp(-6/3); odds computed directly as p/(1-p).
    p_w, p_l = math.exp(-0.5), math.exp(-2.0)
    log_odds = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    log_odds_ratio = -math.log1p(math.exp(-log_odds))
    lp = seq([-2.0], [-6.0], ref_chosen=[50.0], ref_rejected=[-50.0], chosen_len=[4.0], rejected_len=[3.0])
    loss_B, metrics = run("orpo", lp, beta=0.25)
    np.testing.assert_allclose(loss_B, [0.5 - 0.25 * log_odds_ratio], rtol=1e-6)
    np.testing.assert_allclose(metrics["log_odds_chosen"], [log_odds], rtol=1e-6)
    np.testing.assert_allclose(metrics["log_odds_ratio"], [log_odds_ratio], rtol=1e-6)
    np.testing.assert_allclose(metrics["nll_loss"], [0.5], rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], [0.25 * -2.0], rtol=1e-6)


def test_orpo_is_finite_at_probability_one_and_tiny_probabilities():
    lp = seq(
        [0.0, -1e-9, -3000.0], [-1e-7, -5.0, 0.0], chosen_len=[5.0, 1.0, 3.0], rejected_len=[1.0, 2.0, 1.0]
    )
    loss_B, metrics = run("orpo", lp, beta=0.1)
    grads = jax.grad(lambda c: jnp.sum(run("orpo", lp.replace(chosen=c), beta=0.1)[0]))(lp.chosen)
    assert np.all(np.isfinite(loss_B)) and np.all(np.isfinite(grads))
    assert np.all(np.isfinite(metrics["log_odds_chosen"]))


def test_kto_closed_form():
    # r = chosen - ref = [1, -1, 0]; mismatched ratios [1, 0, 0.5] -> z = 0.5.
    lp = seq(
        [-3.0, -5.0, -4.0],
        [-10.0, -12.0, -8.0],
        ref_chosen=[-4.0, -4.0, -4.0],
        ref_rejected=[-11.0, -12.0, -8.5],
        desirable=[1.0, 0.0, 1.0],
    )
    loss_B, metrics = run("kto", lp, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    expected = [
        1 - sigmoid(0.5 * (1 - 0.5)),
        1.5 * (1 - sigmoid(0.5 * (0.5 + 1))),
        1 - sigmoid(0.5 * (0 - 0.5)),
    ]
    np.testing.assert_allclose(loss_B, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(metrics["rewards/desirable"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(metrics["rewards/undesirable"], [0.0, -0.5, 0.0])
    np.testing.assert_allclose(metrics["count/desirable"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(metrics["count/undesirable"], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(metrics["logps/chosen"], [-3.0, -5.0, -4.0])


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    # Mismatched ratios average to -2, so z = 0.
    lp = seq(
        [-3.0, -5.0], [-10.0, -12.0], ref_chosen=[-4.0, -4.0], ref_rejected=[-9.0, -9.0], desirable=[1.0, 0.0]
    )
    loss_B, metrics = run("kto", lp, beta=0.5)
    np.testing.assert_allclose(loss_B, [1 - sigmoid(0.5), 1 - sigmoid(0.5)], rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], [0.0, 0.0])
    lp = lp.replace(ref_rejected=jnp.asarray([-14.0, -14.0]))
    grad_rejected = jax.grad(lambda r: jnp.sum(run("kto", lp.replace(rejected=r), beta=0.5)[0]))(lp.rejected)
    np.testing.assert_array_equal(grad_rejected, [0.0, 0.0])


def test_kto_requires_labels():
    with pytest.raises(ValueError, match="desirable"):
        run("kto", seq([-1.0], [-2.0]))


def neutral_point():
    return seq(
        [-10.0], [-10.0], ref_chosen=[-10.0], ref_rejected=[-10.0], chosen_len=[5.0], rejected_len=[5.0]
    )


def grads_wrt_logps(name, lp, **hp):
    def total(chosen, rejected):
        return jnp.sum(run(name, lp.replace(chosen=chosen, rejected=rejected), **hp)[0])

    return jax.grad(total, argnums=(0, 1))(lp.chosen, lp.rejected)


@pytest.mark.parametrize("name", PAIRED)
def test_paired_gradients_raise_chosen_and_lower_rejected_at_neutral_point(name):
    g_chosen, g_rejected = grads_wrt_logps(
        name, neutral_point(), beta=0.1, label_smoothing=0.1, nll_alpha=0.5
    )
    assert float(g_chosen[0]) < 0.0
    assert float(g_rejected[0]) > 0.0


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_ignore_the_reference(name):
    lp = neutral_point()
    g = jax.grad(lambda ref: jnp.sum(run(name, lp.replace(ref_chosen=ref, ref_rejected=ref))[0]))(
        lp.ref_chosen
    )
    np.testing.assert_array_equal(g, [0.0])


def test_cdpo_gradient_flips_past_the_label_smoothing_optimum():
    eps, beta = 0.1, 1.0
    # sigma(beta*h) = 1 - eps at h = log(9); take h = 5 (sigma ~ 0.993), well past it.
    lp = seq([5.0], [0.0])
    g_chosen, g_rejected = grads_wrt_logps("cdpo", lp, beta=beta, label_smoothing=eps)
    assert float(g_chosen[0]) > 0.0 and float(g_rejected[0]) < 0.0
    np.testing.assert_allclose(g_chosen, [beta * (sigmoid(5.0) - (1 - eps))], rtol=1e-5)
    # DPO keeps pushing the margin at the same point.
    g_chosen, _ = grads_wrt_logps("dpo", lp, beta=beta)
    assert float(g_chosen[0]) < 0.0


@pytest.mark.parametrize("h", [-3.0, 0.0, 2.0, 8.0])
def test_robust_gradient_matches_its_formula(h):
    eps, beta = 0.2, 0.7
    g_chosen, g_rejected = grads_wrt_logps("robust", seq([h], [0.0]), beta=beta, label_smoothing=eps)
    # d/dh [(1-e)l(h) - e l(-h)]/(1-2e) with l(h) = -log sigma(beta h).
    expected = (-(1 - eps) * beta * sigmoid(-beta * h) - eps * beta * sigmoid(beta * h)) / (1 - 2 * eps)
    np.testing.assert_allclose(g_chosen, [expected], rtol=1e-5)
    np.testing.assert_allclose(g_rejected, [-expected], rtol=1e-5)
    assert expected < 0.0


def test_kto_gradient_signs():
    lp = seq(
        [-10.0, -10.0],
        [-10.0, -10.0],
        ref_chosen=[-10.0, -10.0],
        ref_rejected=[-10.0, -10.0],
        desirable=[1.0, 0.0],
    )
    g = jax.grad(lambda c: jnp.sum(run("kto", lp.replace(chosen=c))[0]))(lp.chosen)
    assert float(g[0]) < 0.0
    assert float(g[1]) > 0.0


def random_pairs(seed, n=16):
    rng = np.random.default_rng(seed)
    chosen_len = rng.integers(1, 30, n).astype(np.float32)
    rejected_len = rng.integers(1, 30, n).astype(np.float32)
    logps = [
        (-rng.uniform(0.05, 3.0, n) * length).astype(np.float32) for length in (chosen_len, rejected_len)
    ]
    refs = [(lp + rng.normal(0, 2.0, n)).astype(np.float32) for lp in logps]
    return logps[0], logps[1], refs[0], refs[1], chosen_len, rejected_len


def numpy_reference(
    name, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta, eps, gamma
):
    c, r, rc, rr, lc, lr = (
        np.asarray(x, np.float64)
        for x in (chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)
    )
    h = (c - rc) - (r - rr)
    if name == "dpo":
        return -log_sigmoid(beta * h)
    if name == "cdpo":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if name == "robust":
        return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if name == "simpo":
        return -log_sigmoid(beta * c / lc - beta * r / lr - gamma)
    if name == "orpo":
        p_c, p_r = np.exp(c / lc), np.exp(r / lr)
        log_odds = np.log(p_c / (1 - p_c)) - np.log(p_r / (1 - p_r))
        return -c / lc - beta * log_sigmoid(log_odds)
    raise ValueError(name)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust", "ipo", "simpo", "orpo"])
def test_against_numpy_reference(name, seed):
    arrays = random_pairs(seed)
    beta, eps, gamma = [(0.1, 0.1, 0.5), (0.5, 0.3, 1.0), (2.0, 0.05, 0.0)][seed]
    loss_B, _ = run(name, seq(*arrays), beta=beta, label_smoothing=eps, gamma=gamma)
    expected = numpy_reference(name, *arrays, beta, eps, gamma)
    np.testing.assert_allclose(loss_B, expected, rtol=1e-5, atol=1e-5)


def test_zero_smoothing_cdpo_and_robust_equal_dpo():
    lp = seq(*random_pairs(3))
    dpo_B, dpo_metrics = run("dpo", lp, beta=0.2)
    for name in ["cdpo", "robust"]:
        loss_B, metrics = run(name, lp, beta=0.2, label_smoothing=0.0)
        np.testing.assert_allclose(loss_B, dpo_B, rtol=1e-6)
        for key, value in dpo_metrics.items():
            np.testing.assert_allclose(metrics[key], value, rtol=1e-6)


def test_ipo_and_ipo_mean_differ_with_lengths_and_agree_without():
    chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len = random_pairs(4)
    lp = seq(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)
    differs = np.abs(np.asarray(run("ipo", lp)[0]) - np.asarray(run("ipo_mean", lp)[0]))
    assert np.all(differs[(chosen_len > 1) | (rejected_len > 1)] > 1e-3)
    lp = seq(chosen, rejected, ref_chosen, ref_rejected)
    np.testing.assert_allclose(run("ipo", lp)[0], run("ipo_mean", lp)[0], rtol=1e-6)


def test_dpo_metrics_schema_and_values():
    lp = seq([-5.0, -9.0], [-7.0, -8.0], ref_chosen=[-6.0, -8.0], ref_rejected=[-6.0, -9.0])
    _, metrics = run("dpo", lp, beta=0.5)
    np.testing.assert_allclose(metrics["rewards/chosen"], [0.5, -0.5])
    np.testing.assert_allclose(metrics["rewards/rejected"], [-0.5, 0.5])
    np.testing.assert_allclose(metrics["rewards/margins"], [1.0, -1.0])
    np.testing.assert_allclose(metrics["rewards/accuracies"], [1.0, 0.0])
    np.testing.assert_allclose(metrics["logps/chosen"], [-5.0, -9.0])
    np.testing.assert_allclose(metrics["logps/rejected"], [-7.0, -8.0])


COMMON_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_loss_jits_and_returns_per_example_values(name):
    arrays = random_pairs(5, n=6)
    lp = seq(*arrays, desirable=[1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    loss_B, metrics = jax.jit(losses.get_preference_loss(name).fn)(
        lp, LossHParams.create(label_smoothing=0.1)
    )
    eager_B, _ = run(name, lp, label_smoothing=0.1)
    np.testing.assert_allclose(loss_B, eager_B, rtol=1e-5)
    assert loss_B.shape == (6,) and loss_B.dtype == jnp.float32
    assert all(v.shape == (6,) for v in metrics.values()), {k: v.shape for k, v in metrics.items()}
    if name == "kto":
        assert {"rewards/desirable", "rewards/undesirable", "count/desirable", "kl", "logps/chosen"} <= set(
            metrics
        )
    else:
        assert COMMON_METRICS <= set(metrics)
    if name in ("rpo", "orpo", "simpo"):
        assert "nll_loss" in metrics


def test_registry_flags_and_errors():
    assert set(ALL_LOSSES) <= set(losses.PREFERENCE_LOSSES)
    for name in ALL_LOSSES:
        spec = losses.get_preference_loss(name)
        assert spec.needs_reference == (name not in ("simpo", "orpo")), name
        assert spec.paired == (name != "kto"), name
    with pytest.raises(KeyError) as info:
        losses.get_preference_loss("dpoo")
    assert "dpoo" in str(info.value) and all(name in str(info.value) for name in ALL_LOSSES)
    with pytest.raises(ValueError, match="already registered"):
        losses.register_preference_loss("dpo")(lambda lp, hp: (lp.chosen, {}))


def test_register_a_new_loss():
    @losses.register_preference_loss("test_only_zero", needs_reference=False)
    def zero(lp, hp):
        return jnp.zeros_like(lp.chosen), {}

    try:
        spec = losses.get_preference_loss("test_only_zero")
        assert spec.fn is zero and not spec.needs_reference and spec.paired
        np.testing.assert_array_equal(
            losses.preference_loss("test_only_zero", [-1.0, -2.0], [-3.0, -4.0])[0], [0, 0]
        )
    finally:
        losses.PREFERENCE_LOSSES.pop("test_only_zero")


def test_preference_loss_entry_point():
    loss_B, metrics = losses.preference_loss("dpo", -5.0, -7.0, -6.0, -8.0, beta=0.3)
    assert loss_B.shape == (1,)
    np.testing.assert_allclose(loss_B, [LOG2], rtol=1e-6)
    chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len = random_pairs(6)
    loss_B, _ = losses.preference_loss(
        "simpo",
        chosen,
        rejected,
        chosen_lengths=chosen_len,
        rejected_lengths=rejected_len,
        beta=2.0,
        gamma=0.5,
    )
    expected = numpy_reference("simpo", chosen, rejected, 0, 0, chosen_len, rejected_len, 2.0, 0.0, 0.5)
    np.testing.assert_allclose(loss_B, expected, rtol=1e-5, atol=1e-6)
    # Missing lengths are ones: simpo then uses the summed log-probs.
    loss_B, _ = losses.preference_loss("simpo", [-1.0], [-3.0], beta=1.0)
    np.testing.assert_allclose(loss_B, [math.log1p(math.exp(-2.0))], rtol=1e-6)
    with pytest.raises(ValueError, match="ref"):
        losses.preference_loss("dpo", chosen, rejected)
    loss_B, _ = losses.preference_loss(
        "kto", [-3.0, -5.0], [-9.0, -9.0], [-4.0, -4.0], [-9.0, -9.0], desirable=[1, 0]
    )
    np.testing.assert_allclose(loss_B, [1 - sigmoid(0.1), 1 - sigmoid(0.1)], rtol=1e-6)


def test_hparams_create():
    hp = LossHParams.create(beta=0.5, gamma=1)
    assert hp.beta.dtype == jnp.float32 and hp.beta.shape == ()
    np.testing.assert_allclose(
        [hp.beta, hp.gamma, hp.label_smoothing, hp.desirable_weight], [0.5, 1.0, 0.0, 1.0]
    )
    with pytest.raises(TypeError) as info:
        LossHParams.create(betta=0.5)
    assert "betta" in str(info.value) and "label_smoothing" in str(info.value)


@pytest.mark.parametrize("name", ["dpo", "ipo_mean", "simpo"])
def test_vmap_over_a_stack_of_betas(name):
    lp = seq(*random_pairs(7, n=5))
    betas = jnp.asarray([0.03, 0.1, 0.3, 1.0])
    hps = jax.vmap(lambda b: LossHParams.create(beta=b))(betas)
    fn = losses.get_preference_loss(name).fn
    loss_NB, metrics = jax.vmap(fn, in_axes=(None, 0))(lp, hps)
    assert loss_NB.shape == (4, 5) and metrics["rewards/chosen"].shape == (4, 5)
    for i, beta in enumerate([0.03, 0.1, 0.3, 1.0]):
        np.testing.assert_allclose(loss_NB[i], run(name, lp, beta=beta)[0], rtol=1e-5)


SFT_LOGP = [[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]]
SFT_MASK = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_sft_token_mean_hand_value():
    logp, mask = jnp.asarray(SFT_LOGP), jnp.asarray(SFT_MASK)
    denominator = losses.sft_denominator(mask, "token_mean")
    np.testing.assert_allclose(denominator, 3.0)
    loss = losses.sft_token_loss(logp, mask, aggregation="token_mean", denominator=denominator)
    np.testing.assert_allclose(loss, (1 + 2 + 4) / 3, rtol=1e-6)


def test_sft_sequence_mean_hand_value_ignores_fully_masked_rows():
    logp, mask = jnp.asarray(SFT_LOGP), jnp.asarray(SFT_MASK)
    denominator = losses.sft_denominator(mask, "sequence_mean")
    np.testing.assert_allclose(denominator, 2.0)
    loss = losses.sft_token_loss(logp, mask, aggregation="sequence_mean", denominator=denominator)
    np.testing.assert_allclose(loss, ((1 + 2) / 2 + 4 / 1) / 2, rtol=1e-6)
    loss_without = losses.sft_token_loss(
        logp[:2], mask[:2], aggregation="sequence_mean", denominator=denominator
    )
    np.testing.assert_allclose(loss, loss_without, rtol=1e-7)


def test_sft_all_masked_batch_is_zero_not_nan():
    mask = jnp.zeros((2, 3))
    for aggregation in losses.SFT_AGGREGATIONS:
        denominator = losses.sft_denominator(mask, aggregation)
        assert (
            float(
                losses.sft_token_loss(
                    -jnp.ones((2, 3)), mask, aggregation=aggregation, denominator=denominator
                )
            )
            == 0
        )


def test_sft_unknown_aggregation():
    with pytest.raises(ValueError, match="token_mean"):
        losses.sft_denominator(jnp.ones((1, 2)), "mean")
    with pytest.raises(ValueError, match="sequence_mean"):
        losses.sft_token_loss(jnp.ones((1, 2)), jnp.ones((1, 2)), aggregation="mean", denominator=1.0)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("n_micro", [2, 4])
def test_sft_microbatches_sum_to_the_whole_batch(aggregation, n_micro):
    rng = np.random.default_rng(8)
    logp = jnp.asarray(-rng.uniform(0.1, 5.0, (8, 12)), jnp.float32)
    lengths = np.array([12, 1, 0, 7, 3, 12, 9, 5])
    mask = jnp.asarray(np.arange(12)[None, :] < lengths[:, None], jnp.float32)
    denominator = losses.sft_denominator(mask, aggregation)
    whole = losses.sft_token_loss(logp, mask, aggregation=aggregation, denominator=denominator)
    micro = [
        losses.sft_token_loss(lp, m, aggregation=aggregation, denominator=denominator)
        for lp, m in zip(jnp.split(logp, n_micro), jnp.split(mask, n_micro), strict=True)
    ]
    np.testing.assert_allclose(sum(micro), whole, rtol=1e-6)
    # Local denominators would not add up: the data are uneven enough for the test to bite.
    local = [
        losses.sft_token_loss(
            lp, m, aggregation=aggregation, denominator=losses.sft_denominator(m, aggregation)
        )
        for lp, m in zip(jnp.split(logp, n_micro), jnp.split(mask, n_micro), strict=True)
    ]
    assert abs(float(np.mean(local)) - float(whole)) > 1e-3


def test_reward_model_loss():
    hp = LossHParams.create()
    loss_B, metrics = losses.reward_model_loss(jnp.asarray([0.7, -2.0]), jnp.asarray([0.7, -2.0]), None, hp)
    np.testing.assert_allclose(loss_B, [LOG2, LOG2], rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], [0.0, 0.0])
    # The margin comes off the reward gap: gap 2, margin 1 -> -log σ(1); gap 0.5, margin 0.5 -> log 2.
    chosen, rejected, margin = (
        jnp.asarray([2.0, 1.0, 0.0]),
        jnp.asarray([0.0, 0.5, 1.0]),
        jnp.asarray([1.0, 0.5, -2.0]),
    )
    loss_B, metrics = losses.reward_model_loss(chosen, rejected, margin, hp)
    np.testing.assert_allclose(
        loss_B, [math.log1p(math.exp(-1.0)), LOG2, math.log1p(math.exp(-1.0))], rtol=1e-6
    )
    np.testing.assert_allclose(metrics["accuracy"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(metrics["margin"], [2.0, 0.5, -1.0])
    np.testing.assert_allclose(metrics["rewards/chosen"], [2.0, 1.0, 0.0])
    np.testing.assert_allclose(metrics["rewards/rejected"], [0.0, 0.5, 1.0])
    centered_B, _ = losses.reward_model_loss(chosen, rejected, margin, LossHParams.create(rm_center=0.01))
    np.testing.assert_allclose(centered_B - loss_B, [0.01 * 4.0, 0.01 * 2.25, 0.01 * 1.0], rtol=1e-5)


def test_reward_model_gradient_signs():
    hp = LossHParams.create(rm_center=0.01)
    g_chosen, g_rejected = jax.grad(
        lambda c, r: jnp.sum(losses.reward_model_loss(c, r, None, hp)[0]), argnums=(0, 1)
    )(jnp.asarray([0.0]), jnp.asarray([0.0]))
    np.testing.assert_allclose(g_chosen, [-0.5], rtol=1e-6)
    np.testing.assert_allclose(g_rejected, [0.5], rtol=1e-6)


# TRL's other pairwise losses: nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, exo_pair.
NEW_PAIRED = ["nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "exo_pair"]


def ratios(r_w, r_l):
    """Pairs whose policy/reference log ratios are r_w and r_l (the reference log-probs are not zero)."""
    r_w, r_l = np.atleast_1d(np.asarray(r_w, np.float32)), np.atleast_1d(np.asarray(r_l, np.float32))
    ref_w, ref_l = np.full_like(r_w, -7.0), np.full_like(r_l, -9.0)
    return seq(ref_w + r_w, ref_l + r_l, ref_chosen=ref_w, ref_rejected=ref_l)


def test_new_pairwise_closed_forms():
    # beta 0.5, r_w = 2, r_l = -1: beta*r_w = 1, beta*r_l = -0.5, beta*h = 1.5.
    lp, s = ratios(2.0, -1.0), sigmoid
    expected = {
        "nca_pair": -math.log(s(1.0)) - 0.5 * math.log(s(-1.0)) - 0.5 * math.log(s(0.5)),
        "bco_pair": -math.log(s(1.0)) - math.log(s(0.5)),
        "sppo_hard": (2.0 - 1.0) ** 2 + (-1.0 + 1.0) ** 2,
        "apo_zero": (1 - s(1.0)) + s(-0.5),
        "apo_down": s(1.0) + (1 - s(1.5)),
        "exo_pair": s(1.5) * math.log(s(1.5) / 0.9) + s(-1.5) * math.log(s(-1.5) / 0.1),
    }
    for name, value in expected.items():
        loss_B, metrics = run(name, lp, beta=0.5, label_smoothing=0.1)
        np.testing.assert_allclose(loss_B, [value], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(metrics["rewards/chosen"], [1.0], rtol=1e-6)
        np.testing.assert_allclose(metrics["rewards/rejected"], [-0.5], rtol=1e-6)
        np.testing.assert_allclose(metrics["rewards/margins"], [1.5], rtol=1e-6)
        np.testing.assert_allclose(metrics["rewards/accuracies"], [1.0])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_new_pairwise_values_at_the_neutral_point(beta):
    # r_w = r_l = 0 (policy = reference): every sigmoid is 1/2.
    expected = {
        "nca_pair": 2 * LOG2,
        "bco_pair": 2 * LOG2,
        "sppo_hard": 2 * (1 / (2 * beta)) ** 2,
        "apo_zero": 1.0,
        "apo_down": 1.0,
        "exo_pair": -LOG2 - 0.5 * math.log(0.2 * 0.8),
    }
    for name, value in expected.items():
        loss_B, _ = run(name, ratios([0.0, 0.0], [0.0, 0.0]), beta=beta, label_smoothing=0.2)
        np.testing.assert_allclose(loss_B, [value, value], rtol=1e-6, err_msg=name)


def test_exo_depends_on_the_margin_only_and_is_its_kl_at_equal_margins():
    eps = 0.05
    loss_B, _ = run("exo_pair", seq(**EQUAL_MARGINS), beta=0.3, label_smoothing=eps)
    np.testing.assert_allclose(loss_B, [-LOG2 - 0.5 * math.log(eps * (1 - eps))] * 2, rtol=1e-6)


@pytest.mark.parametrize("name", ["nca_pair", "bco_pair", "sppo_hard", "apo_zero", "exo_pair"])
def test_new_pairwise_gradients_raise_chosen_and_lower_rejected_at_neutral_point(name):
    g_chosen, g_rejected = grads_wrt_logps(name, neutral_point(), beta=0.1, label_smoothing=0.1)
    assert float(g_chosen[0]) < 0.0
    assert float(g_rejected[0]) > 0.0


def test_apo_down_lowers_both_likelihoods():
    beta = 0.5
    # At the neutral point the chosen pull cancels: β[σ'(βr_w) - σ'(βh)] = 0.
    g_chosen, g_rejected = grads_wrt_logps("apo_down", neutral_point(), beta=beta)
    np.testing.assert_allclose(g_chosen, [0.0], atol=1e-7)
    assert float(g_rejected[0]) > 0.0
    # r_w = 0, r_l = -2: descent lowers both (positive gradients), with the formula's values.
    g_chosen, g_rejected = grads_wrt_logps("apo_down", ratios(0.0, -2.0), beta=beta)
    dsig = lambda x: sigmoid(x) * (1 - sigmoid(x))
    np.testing.assert_allclose(g_chosen, [beta * (dsig(0.0) - dsig(1.0))], rtol=1e-5)
    np.testing.assert_allclose(g_rejected, [beta * dsig(1.0)], rtol=1e-5)
    assert float(g_chosen[0]) > 0.0 and float(g_rejected[0]) > 0.0
    # APO-zero at the same point raises chosen and lowers rejected.
    g_chosen, g_rejected = grads_wrt_logps("apo_zero", ratios(0.0, -2.0), beta=beta)
    assert float(g_chosen[0]) < 0.0 and float(g_rejected[0]) > 0.0


def test_nca_targets_an_absolute_chosen_reward_and_always_lowers_rejected():
    beta = 0.4
    # d/dr_w = -βσ(-βr_w) + ½βσ(βr_w) vanishes at σ(βr_w) = 2/3: βr_w = log 2; past it the chosen falls.
    for r_w, sign in [(0.0, -1), (LOG2 / beta, 0), (5.0, 1)]:
        g_chosen, g_rejected = grads_wrt_logps("nca_pair", ratios(r_w, 3.0), beta=beta)
        expected = -beta * sigmoid(-beta * r_w) + 0.5 * beta * sigmoid(beta * r_w)
        np.testing.assert_allclose(g_chosen, [expected], rtol=1e-5, atol=1e-7)
        assert np.sign(round(float(g_chosen[0]), 6)) == sign
        np.testing.assert_allclose(g_rejected, [0.5 * beta * sigmoid(beta * 3.0)], rtol=1e-5)


def test_sppo_hard_targets_plus_and_minus_half_over_beta():
    beta = 0.25
    loss_B, _ = run("sppo_hard", ratios(2.0, -2.0), beta=beta)
    np.testing.assert_allclose(loss_B, [0.0], atol=1e-10)
    g_chosen, g_rejected = grads_wrt_logps("sppo_hard", ratios(3.0, 1.0), beta=beta)
    np.testing.assert_allclose(g_chosen, [2 * (3.0 - 2.0)], rtol=1e-6)
    np.testing.assert_allclose(g_rejected, [2 * (1.0 + 2.0)], rtol=1e-6)


@pytest.mark.parametrize("h", [-3.0, 0.0, 1.0, 6.0])
def test_exo_gradient_matches_its_formula(h):
    eps, beta = 0.1, 0.7
    g_chosen, g_rejected = grads_wrt_logps("exo_pair", ratios(h, 0.0), beta=beta, label_smoothing=eps)
    q = sigmoid(beta * h)
    # d/dh KL(q || p) = β q (1 - q) (βh - log((1-ε)/ε)).
    expected = beta * q * (1 - q) * (beta * h - math.log((1 - eps) / eps))
    np.testing.assert_allclose(g_chosen, [expected], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_rejected, [-expected], rtol=1e-4, atol=1e-7)


def test_exo_is_a_kl_zero_at_the_smoothed_label():
    eps, beta = 0.2, 0.5
    h_star = math.log((1 - eps) / eps) / beta  # σ(βh*) = 1 - ε
    loss_B, _ = run("exo_pair", ratios([h_star, -2.0, 0.0, 9.0], [0.0] * 4), beta=beta, label_smoothing=eps)
    np.testing.assert_allclose(loss_B[0], 0.0, atol=1e-6)
    assert np.all(np.asarray(loss_B) >= -1e-7)
    g_chosen, _ = grads_wrt_logps("exo_pair", ratios(h_star, 0.0), beta=beta, label_smoothing=eps)
    np.testing.assert_allclose(g_chosen, [0.0], atol=1e-6)


def test_exo_zero_smoothing_means_the_papers_epsilon():
    lp = seq(*random_pairs(9))
    default_B, _ = run("exo_pair", lp, beta=0.2, label_smoothing=0.0)
    explicit_B, _ = run("exo_pair", lp, beta=0.2, label_smoothing=pairwise.EXO_DEFAULT_EPSILON)
    np.testing.assert_array_equal(default_B, explicit_B)
    assert pairwise.EXO_DEFAULT_EPSILON == 1e-3 and np.all(np.isfinite(default_B))


def test_bco_shift_moves_the_classifier_threshold():
    beta, delta = 0.5, 0.3
    lp = ratios([2.0, -4.0], [-1.0, 1.0])
    loss_B, metrics = pairwise.bco_pair_loss(lp, LossHParams.create(beta=beta), delta=delta)
    expected = [
        -math.log(sigmoid(1.0 - delta)) - math.log(sigmoid(0.5 + delta)),
        -math.log(sigmoid(-2.0 - delta)) - math.log(sigmoid(-0.5 + delta)),
    ]
    np.testing.assert_allclose(loss_B, expected, rtol=1e-6)
    # The rewards stay unshifted; a shift δ is a reference moved by δ/β.
    np.testing.assert_allclose(metrics["rewards/chosen"], [1.0, -2.0], rtol=1e-6)
    moved = lp.replace(ref_chosen=lp.ref_chosen + delta / beta, ref_rejected=lp.ref_rejected + delta / beta)
    np.testing.assert_allclose(run("bco_pair", moved, beta=beta)[0], loss_B, rtol=1e-5)
    # δ enters detached, traces under jit (no recompile per value) and through the spec with delta=.
    g = jax.grad(lambda d: jnp.sum(pairwise.bco_pair_loss(lp, LossHParams.create(beta=beta), delta=d)[0]))(
        0.3
    )
    assert float(g) == 0.0
    spec = losses.get_preference_loss("bco_pair")
    jitted = jax.jit(lambda lp, hp, d: spec.fn(lp, hp, delta=d))
    jitted_B, _ = jitted(lp, LossHParams.create(beta=beta), jnp.float32(delta))
    np.testing.assert_allclose(jitted_B, loss_B, rtol=1e-6)
    entry_B, _ = losses.preference_loss(
        "bco_pair", lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, beta=beta, delta=delta
    )
    np.testing.assert_allclose(entry_B, loss_B, rtol=1e-6)
    with pytest.raises(ValueError, match="shift"):
        losses.preference_loss("dpo", -1.0, -2.0, -1.0, -2.0, delta=0.1)


def trl_running_moments_mean(batch_means, counts):
    """TRL's RunningMoments mean arithmetic (mean 0 and count 1e-24 to start), in float64."""
    mean, count = 0.0, 1e-24
    for x, n in zip(batch_means, counts, strict=True):
        tot = count + n
        mean += (x - mean) * n / tot
        count = tot
    return mean


def test_running_mean_update():
    rng = np.random.default_rng(10)
    xs = rng.normal(0.0, 2.0, 7).astype(np.float32)
    counts = rng.integers(1, 9, 7).astype(np.float32)
    running = losses.RunningMean.create()
    assert float(running.mean) == 0.0 and float(running.count) == 0.0
    update = jax.jit(losses.update_running_mean)
    equal, weighted = running, running
    for x, n in zip(xs, counts, strict=True):
        equal = update(equal, x)
        weighted = update(weighted, x, n)
    # weight 1: the mean of the step means (TRL's DPO bco_pair); weight n: of every reward (BCOTrainer).
    np.testing.assert_allclose(equal.mean, np.mean(xs), rtol=1e-5)
    np.testing.assert_allclose(equal.mean, trl_running_moments_mean(xs, np.ones(7)), rtol=1e-5)
    np.testing.assert_allclose(weighted.mean, np.sum(xs * counts) / np.sum(counts), rtol=1e-5)
    np.testing.assert_allclose(weighted.mean, trl_running_moments_mean(xs, counts), rtol=1e-5)
    np.testing.assert_allclose(weighted.count, np.sum(counts))
    # The first update takes the batch mean whole; a zero weight changes nothing, even from empty.
    np.testing.assert_allclose(update(running, 2.5).mean, 2.5)
    same = update(weighted, 100.0, 0.0)
    np.testing.assert_array_equal(same.mean, weighted.mean)
    assert float(update(running, 7.0, 0.0).mean) == 0.0
    # The batch mean enters detached.
    g = jax.grad(lambda x: losses.update_running_mean(equal, x).mean)(1.0)
    assert float(g) == 0.0


def test_bco_running_shift_over_steps_matches_trl_arithmetic():
    """Three steps: δ_t is the running mean of earlier steps' mean rewards (β·r over chosen and rejected)."""
    beta, hp = 0.2, LossHParams.create(beta=0.2)
    running, deltas, batch_means = losses.RunningMean.create(), [], []
    for seed in range(3):
        lp = seq(*random_pairs(20 + seed, n=8))
        deltas.append(float(running.mean))
        loss_B, metrics = pairwise.bco_pair_loss(lp, hp, delta=running.mean)
        r_w = beta * (np.asarray(lp.chosen, np.float64) - np.asarray(lp.ref_chosen, np.float64))
        r_l = beta * (np.asarray(lp.rejected, np.float64) - np.asarray(lp.ref_rejected, np.float64))
        expected = -log_sigmoid(r_w - deltas[-1]) - log_sigmoid(-(r_l - deltas[-1]))
        np.testing.assert_allclose(loss_B, expected, rtol=1e-5)
        batch_mean = (jnp.mean(metrics["rewards/chosen"]) + jnp.mean(metrics["rewards/rejected"])) / 2
        np.testing.assert_allclose(batch_mean, np.mean(np.concatenate([r_w, r_l])), rtol=1e-4, atol=1e-6)
        batch_means.append(float(batch_mean))
        running = losses.update_running_mean(running, batch_mean)
    assert deltas[0] == 0.0
    np.testing.assert_allclose(deltas[1:], [batch_means[0], np.mean(batch_means[:2])], rtol=1e-6)


def new_numpy_reference(name, chosen, rejected, ref_chosen, ref_rejected, beta, eps, delta=0.0):
    c, r, rc, rr = (np.asarray(x, np.float64) for x in (chosen, rejected, ref_chosen, ref_rejected))
    r_w, r_l = c - rc, r - rr
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    if name == "nca_pair":
        return -log_sigmoid(beta * r_w) - 0.5 * log_sigmoid(-beta * r_w) - 0.5 * log_sigmoid(-beta * r_l)
    if name == "bco_pair":
        return -log_sigmoid(beta * r_w - delta) - log_sigmoid(delta - beta * r_l)
    if name == "sppo_hard":
        return (r_w - 1 / (2 * beta)) ** 2 + (r_l + 1 / (2 * beta)) ** 2
    if name == "apo_zero":
        return 1 - sig(beta * r_w) + sig(beta * r_l)
    if name == "apo_down":
        return sig(beta * r_w) + 1 - sig(beta * (r_w - r_l))
    if name == "exo_pair":
        q = sig(beta * (r_w - r_l))
        return q * (np.log(q) - np.log(1 - eps)) + (1 - q) * (np.log(1 - q) - np.log(eps))
    raise ValueError(name)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", NEW_PAIRED)
def test_new_pairwise_against_numpy_reference(name, seed):
    arrays = random_pairs(seed)
    # Small betas keep σ(βh) away from 0 and 1, where the float64 reference's log(1 - q) loses digits.
    beta, eps = [(0.1, 0.1), (0.05, 0.3), (0.02, 0.001)][seed]
    loss_B, _ = run(name, seq(*arrays), beta=beta, label_smoothing=eps)
    expected = new_numpy_reference(name, *arrays[:4], beta, eps)
    np.testing.assert_allclose(loss_B, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NEW_PAIRED)
def test_new_pairwise_jit_metrics_and_registry(name):
    lp = seq(*random_pairs(5, n=6))
    spec = losses.get_preference_loss(name)
    assert spec.needs_reference and spec.paired and spec.running_shift == (name == "bco_pair")
    loss_B, metrics = jax.jit(spec.fn)(lp, LossHParams.create(label_smoothing=0.1))
    eager_B, eager_metrics = run(name, lp, label_smoothing=0.1)
    np.testing.assert_allclose(loss_B, eager_B, rtol=1e-5)
    assert loss_B.shape == (6,) and loss_B.dtype == jnp.float32
    assert set(metrics) == COMMON_METRICS and all(v.shape == (6,) for v in metrics.values())
    _, dpo_metrics = run("dpo", lp, label_smoothing=0.1)
    for key, value in dpo_metrics.items():
        np.testing.assert_array_equal(eager_metrics[key], value)


def test_trl_aliases():
    assert losses.PREFERENCE_LOSS_ALIASES == {"sigmoid": "dpo", "sigmoid_norm": "dpo_norm"}
    lp = seq(*random_pairs(11))
    for alias, name in losses.PREFERENCE_LOSS_ALIASES.items():
        assert losses.get_preference_loss(alias) is losses.get_preference_loss(name)
        np.testing.assert_array_equal(run(alias, lp, beta=0.3)[0], run(name, lp, beta=0.3)[0])
    with pytest.raises(ValueError, match="already registered"):
        losses.register_preference_loss_alias("dpo", "ipo")
    with pytest.raises(KeyError, match="dpoo"):
        losses.register_preference_loss_alias("test_only_alias", "dpoo")
    assert "test_only_alias" not in losses.PREFERENCE_LOSSES


@pytest.mark.parametrize("name", NEW_PAIRED)
def test_new_pairwise_losses_are_finite_at_extreme_margins(name):
    lp = ratios([400.0, -400.0, 0.0, 400.0], [-400.0, 400.0, 0.0, 400.0])
    loss_B, metrics = run(name, lp, beta=0.5, label_smoothing=0.1)
    g_chosen, g_rejected = grads_wrt_logps(name, lp, beta=0.5, label_smoothing=0.1)
    assert np.all(np.isfinite(loss_B)) and np.all(np.isfinite(g_chosen)) and np.all(np.isfinite(g_rejected))
    assert all(np.all(np.isfinite(v)) for v in metrics.values())
