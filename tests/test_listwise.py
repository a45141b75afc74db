"""Listwise losses: K = 2 reduces to the pairwise losses, closed forms, an independent numpy reference (sorts
and loops), permutation invariance, and masked entries with no effect and no gradient."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl import listwise, losses, pairwise
from jaxrl.listwise import ListLogps
from jaxrl.pairwise import LossHParams, SeqLogps

NAMES = ["pl_dpo", "list_mle", "lipo_lambda"]
# LiPO-λ's weight for positions 1 and 2 and gains 1 and 0: (2^1 - 1 - 0)(1/log2 2 - 1/log2 3).
LAMBDA_12 = 1.0 - 1.0 / math.log2(3.0)


def lists(logps, ref_logps, scores, mask=None):
    f = lambda x: jnp.asarray(x, jnp.float32)
    logps = f(logps)
    return ListLogps(
        logps=logps,
        ref_logps=f(ref_logps),
        scores=f(scores),
        mask=jnp.ones(logps.shape, jnp.float32) if mask is None else f(mask),
    )


def run(name, ll, **hp):
    return listwise.get_listwise_loss(name).fn(ll, LossHParams.create(**hp))


def grads(name, ll, **hp):
    return jax.grad(lambda x: jnp.sum(run(name, ll.replace(logps=x), **hp)[0]))(ll.logps)


def random_lists(seed, B=6, K=5, ties=False, min_len=1):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(1.0, 40.0, (B, K)).astype(np.float32)
    ref = (logps + rng.normal(0.0, 3.0, (B, K))).astype(np.float32)
    scores = rng.integers(0, 3, (B, K)) / 2.0 if ties else rng.permutation(K * B).reshape(B, K) / (K * B)
    lengths = rng.integers(min_len, K + 1, B)
    mask = (np.arange(K)[None, :] < lengths[:, None]).astype(np.float32)
    # Shuffle each row so that padding is not always at the end.
    for b in range(B):
        order = rng.permutation(K)
        logps[b], ref[b], scores[b], mask[b] = (
            logps[b, order],
            ref[b, order],
            scores[b, order],
            mask[b, order],
        )
    return logps, ref, scores.astype(np.float32), mask


# An independent reference: float64, explicit sorting and loops over the present responses of each list.


def np_log_sum_exp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def np_reference(name, logps, ref, scores, mask, beta):
    out = []
    for lp, rf, sc, mk in zip(logps, ref, scores, mask, strict=True):
        keep = [k for k in range(len(mk)) if mk[k] > 0]
        u = [beta * (float(lp[k]) - float(rf[k])) for k in keep]
        y = [float(sc[k]) for k in keep]
        n = len(keep)
        total = 0.0
        if name in ("pl_dpo", "list_mle"):
            order = sorted(range(n), key=lambda i: -y[i])  # best first
            for pos, i in enumerate(order):
                if name == "pl_dpo":  # the rest of the ranking, with ties to i kept in (Breslow)
                    rest = [j for j in range(n) if y[j] <= y[i]]
                else:  # the rest of the ranking after i's tie group, and i itself
                    rest = [i] + [j for j in order[pos + 1 :] if y[j] < y[i]]
                total -= u[i] - np_log_sum_exp([u[j] for j in rest])
        else:
            # Positions: sort by reward, then score, descending; full ties share the mean position.
            key = [(u[i], y[i]) for i in range(n)]
            tau = [
                1
                + sum(key[j] > key[i] for j in range(n))
                + 0.5 * sum(key[j] == key[i] for j in range(n) if j != i)
                for i in range(n)
            ]
            gain = [2.0 ** y[i] - 1 for i in range(n)]
            for i, j in itertools.permutations(range(n), 2):
                if y[i] > y[j]:
                    weight = abs(gain[i] - gain[j]) * abs(
                        1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j])
                    )
                    total += weight * math.log1p(math.exp(-(u[i] - u[j])))
        out.append(total)
    return np.asarray(out)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_against_numpy_reference(name, ties):
    for seed, beta in [(0, 0.1), (1, 0.5)]:
        logps, ref, scores, mask = random_lists(seed, ties=ties)
        loss_B, _ = run(name, lists(logps, ref, scores, mask), beta=beta)
        np.testing.assert_allclose(
            loss_B, np_reference(name, logps, ref, scores, mask, beta), rtol=1e-5, atol=1e-5
        )


def pairs_as_lists(chosen_first: bool, seed=3, n=8):
    rng = np.random.default_rng(seed)
    chosen, rejected = -rng.uniform(1, 30, n), -rng.uniform(1, 30, n)
    ref_chosen, ref_rejected = chosen + rng.normal(0, 3, n), rejected + rng.normal(0, 3, n)
    seq = SeqLogps(
        *(
            jnp.asarray(x, jnp.float32)
            for x in (chosen, rejected, ref_chosen, ref_rejected, np.ones(n), np.ones(n))
        )
    )
    col = lambda a, b: np.stack([a, b] if chosen_first else [b, a], axis=1)
    ll = lists(col(chosen, rejected), col(ref_chosen, ref_rejected), col(np.ones(n), np.zeros(n)))
    return seq, ll


@pytest.mark.parametrize("chosen_first", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_two_responses_reduce_to_dpo(name, chosen_first):
    seq, ll = pairs_as_lists(chosen_first)
    hp = LossHParams.create(beta=0.3)
    dpo_B, dpo_metrics = pairwise.dpo_loss(seq, hp)
    loss_B, metrics = run(name, ll, beta=0.3)
    scale = LAMBDA_12 if name == "lipo_lambda" else 1.0
    np.testing.assert_allclose(loss_B, scale * np.asarray(dpo_B), rtol=1e-6, atol=1e-7)
    for key, value in dpo_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    # Gradients too: d/d(chosen, rejected) of DPO, in the list's column order.
    g_chosen, g_rejected = jax.grad(
        lambda c, r: jnp.sum(pairwise.dpo_loss(seq.replace(chosen=c, rejected=r), hp)[0]), argnums=(0, 1)
    )(seq.chosen, seq.rejected)
    g = np.asarray(grads(name, ll, beta=0.3))
    expected = np.stack([g_chosen, g_rejected] if chosen_first else [g_rejected, g_chosen], axis=1)
    np.testing.assert_allclose(g, scale * expected, rtol=1e-5, atol=1e-7)


def test_closed_form_three_responses_distinct_scores():
    # β = 1, u = (0, 1, -1) with scores (1, 0.5, 0): the labeller's order is 0 > 1 > 2.
    u, lse = [0.0, 1.0, -1.0], np_log_sum_exp
    ll = lists([[-10.0, -9.0, -11.0]], [[-10.0] * 3], [[1.0, 0.5, 0.0]])
    pl = -(u[0] - lse(u)) - (u[1] - lse(u[1:]))
    for name in ["pl_dpo", "list_mle"]:
        np.testing.assert_allclose(run(name, ll, beta=1.0)[0], [pl], rtol=1e-6)
    # By reward the positions are τ = (2, 1, 3); gains G = (1, √2 - 1, 0); 1/D = 1/log2(1 + τ).
    inv_d = [1 / math.log2(3), 1.0, 1 / math.log2(4)]
    gain = [1.0, math.sqrt(2) - 1, 0.0]
    weight = lambda i, j: abs(gain[i] - gain[j]) * abs(inv_d[i] - inv_d[j])
    nll = lambda x: math.log1p(math.exp(-x))
    lipo = weight(0, 1) * nll(u[0] - u[1]) + weight(0, 2) * nll(u[0] - u[2]) + weight(1, 2) * nll(u[1] - u[2])
    np.testing.assert_allclose(run("lipo_lambda", ll, beta=1.0)[0], [lipo], rtol=1e-6)
    np.testing.assert_allclose(
        listwise.rank_positions(ll.mask > 0, jnp.asarray([u]), ll.scores), [[2.0, 1.0, 3.0]]
    )


def test_closed_form_ties():
    # Scores (2, 1, 1): responses 1 and 2 tie below response 0.
    u, lse = [0.5, -0.2, 1.0], np_log_sum_exp
    ll = lists([[v - 5.0 for v in u]], [[-5.0] * 3], [[2.0, 1.0, 1.0]])
    breslow = -(u[0] - lse(u)) - (u[1] - lse(u[1:])) - (u[2] - lse(u[1:]))
    np.testing.assert_allclose(run("pl_dpo", ll, beta=1.0)[0], [breslow], rtol=1e-6)
    # ListMLE ranks only across the tie: the tied pair costs nothing.
    np.testing.assert_allclose(run("list_mle", ll, beta=1.0)[0], [-(u[0] - lse(u))], rtol=1e-6)
    # A list that ties throughout: nothing to learn for list_mle and lipo; pl_dpo pulls the rewards together.
    flat = ll.replace(scores=jnp.ones((1, 3)))
    np.testing.assert_allclose(run("list_mle", flat)[0], [0.0], atol=1e-7)
    np.testing.assert_allclose(run("lipo_lambda", flat)[0], [0.0], atol=1e-7)
    g = grads("pl_dpo", flat, beta=1.0)
    assert float(g[0, 2]) > 0.0 > float(g[0, 1])  # the highest reward is pushed down, the lowest up
    _, metrics = run("pl_dpo", ll, beta=1.0)
    np.testing.assert_allclose(metrics["rewards/chosen"], [0.5], rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], [0.4], rtol=1e-6)  # mean over the tied bottom
    np.testing.assert_allclose(metrics["rewards/accuracies"], [0.5])  # 0 > 2 is wrong, 0 > 1 right


def test_lipo_positions_at_equal_rewards_follow_the_labels():
    # Policy = reference: every reward is 0, positions fall back on the scores, full ties share them.
    ll = lists([[-3.0, -4.0, -5.0, -6.0]], [[-3.0, -4.0, -5.0, -6.0]], [[0.2, 0.9, 0.2, 0.5]])
    mask, u = ll.mask > 0, jnp.zeros((1, 4))
    np.testing.assert_allclose(listwise.rank_positions(mask, u, ll.scores), [[3.5, 1.0, 3.5, 2.0]])
    weights = listwise.lambda_weights(mask, u, ll.scores)
    np.testing.assert_allclose(weights, np.swapaxes(weights, 1, 2))
    # Response 1 (top) vs 3 (second): |2^0.9 - 2^0.5| |1 - 1/log2 3|.
    np.testing.assert_allclose(weights[0, 1, 3], abs(2**0.9 - 2**0.5) * LAMBDA_12, rtol=1e-6)
    # Responses 0 and 2 tie in score and reward: no weight between them.
    assert float(weights[0, 0, 2]) == 0.0
    g = grads("lipo_lambda", ll, beta=0.1)
    assert float(g[0, 1]) < 0.0 and float(g[0, 0]) > 0.0 and float(g[0, 2]) > 0.0


@pytest.mark.parametrize("name", NAMES)
def test_gradients_raise_the_best_and_lower_the_worst_at_the_reference(name):
    logps = np.asarray([[-5.0, -8.0, -3.0, -9.0]], np.float32)
    ll = lists(logps, logps, [[0.3, 1.0, 0.0, 0.6]])
    g = np.asarray(grads(name, ll, beta=0.1))[0]
    assert g[1] < 0.0 and g[2] > 0.0, g
    np.testing.assert_allclose(np.sum(g), 0.0, atol=1e-7)  # a common shift of the rewards changes nothing


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariance(name, ties):
    logps, ref, scores, mask = random_lists(4, ties=ties)
    ll = lists(logps, ref, scores, mask)
    loss_B, metrics = run(name, ll, beta=0.2)
    g = np.asarray(grads(name, ll, beta=0.2))
    rng = np.random.default_rng(5)
    for _ in range(3):
        perm = rng.permutation(logps.shape[1])
        permuted = lists(logps[:, perm], ref[:, perm], scores[:, perm], mask[:, perm])
        p_loss_B, p_metrics = run(name, permuted, beta=0.2)
        np.testing.assert_allclose(p_loss_B, loss_B, rtol=1e-6, atol=1e-6)
        for key, value in metrics.items():
            np.testing.assert_allclose(p_metrics[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(grads(name, permuted, beta=0.2), g[:, perm], rtol=1e-5, atol=1e-6)


def test_lipo_permutation_invariance_at_equal_rewards():
    # At the start of training every reward is 0: positions must not come from the input order.
    logps, _, scores, mask = random_lists(6, ties=True)
    ll = lists(logps, logps, scores, mask)
    perm = np.asarray([3, 0, 4, 2, 1])
    permuted = lists(logps[:, perm], logps[:, perm], scores[:, perm], mask[:, perm])
    np.testing.assert_allclose(run("lipo_lambda", permuted)[0], run("lipo_lambda", ll)[0], rtol=1e-6)
    np.testing.assert_allclose(
        grads("lipo_lambda", permuted), np.asarray(grads("lipo_lambda", ll))[:, perm], rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("name", NAMES)
def test_masked_entries_have_no_effect_and_no_gradient(name):
    logps, ref, scores, mask = random_lists(7, K=4, min_len=4)
    short = lists(logps[:, :3], ref[:, :3], scores[:, :3])
    expected_B, expected_metrics = run(name, short, beta=0.2)
    expected_g = np.asarray(grads(name, short, beta=0.2))
    for garbage in [0.0, np.nan, -np.inf, 1e30]:
        for where in [3, 0]:  # the padding at the end, or first
            cols = [c for c in range(3)]
            cols.insert(where, 3)
            lp, rf, sc = logps[:, cols].copy(), ref[:, cols].copy(), scores[:, cols].copy()
            lp[:, where], rf[:, where], sc[:, where] = garbage, -garbage, garbage
            m = np.ones_like(lp)
            m[:, where] = 0.0
            ll = lists(lp, rf, sc, m)
            loss_B, metrics = run(name, ll, beta=0.2)
            np.testing.assert_allclose(loss_B, expected_B, rtol=1e-6, atol=1e-6)
            for key, value in expected_metrics.items():
                np.testing.assert_allclose(metrics[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
            g = np.asarray(grads(name, ll, beta=0.2))
            np.testing.assert_array_equal(g[:, where], 0.0)
            np.testing.assert_allclose(np.delete(g, where, axis=1), expected_g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_empty_and_single_response_lists_cost_nothing(name):
    ll = lists(
        [[-3.0, np.nan], [-2.0, -4.0]],
        [[-1.0, 0.0], [-2.5, -1.0]],
        [[1.0, 0.0], [0.0, 1.0]],
        [[1, 0], [0, 0]],
    )
    loss_B, metrics = run(name, ll)
    np.testing.assert_array_equal(loss_B, [0.0, 0.0])
    assert all(np.all(np.isfinite(v)) for v in metrics.values())
    np.testing.assert_array_equal(metrics["rewards/accuracies"], [0.0, 0.0])
    np.testing.assert_allclose(metrics["rewards/chosen"], [0.1 * -2.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(grads(name, ll), np.zeros((2, 2)))


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_and_metric_names(name):
    logps, ref, scores, mask = random_lists(8)
    ll = lists(logps, ref, scores, mask)
    fn = listwise.get_listwise_loss(name).fn
    loss_B, metrics = jax.jit(fn)(ll, LossHParams.create(beta=0.2))
    np.testing.assert_allclose(loss_B, run(name, ll, beta=0.2)[0], rtol=1e-5)
    assert loss_B.shape == (6,) and loss_B.dtype == jnp.float32
    pairwise_names = set(pairwise.dpo_loss(SeqLogps(*[jnp.zeros(1)] * 6), LossHParams.create())[1])
    assert set(metrics) == pairwise_names and all(v.shape == (6,) for v in metrics.values())
    hps = jax.vmap(lambda b: LossHParams.create(beta=b))(jnp.asarray([0.1, 0.5]))
    loss_NB, _ = jax.vmap(fn, in_axes=(None, 0))(ll, hps)
    np.testing.assert_allclose(loss_NB[1], run(name, ll, beta=0.5)[0], rtol=1e-5)


def test_scores_from_ranks():
    ranks = [[1, 2, 3, 0], [2, 1, 2, 9], [1, 0, 0, 0]]
    mask = [[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
    np.testing.assert_allclose(
        listwise.scores_from_ranks(ranks, mask),
        [[1.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]],
    )
    # Only the order matters to pl_dpo and list_mle: ranks given as scores or as negated ranks agree.
    ll = lists(
        [[-3.0, -1.0, -7.0]], [[-2.0, -2.0, -2.0]], listwise.scores_from_ranks([[2, 1, 3]], [[1, 1, 1]])
    )
    for name in ["pl_dpo", "list_mle"]:
        np.testing.assert_allclose(
            run(name, ll)[0], run(name, ll.replace(scores=-jnp.asarray([[2.0, 1.0, 3.0]])))[0]
        )


def test_registry_and_entry_point():
    assert set(NAMES) <= set(listwise.LISTWISE_LOSSES)
    assert not set(listwise.LISTWISE_LOSSES) & set(losses.PREFERENCE_LOSSES)
    assert all(listwise.get_listwise_loss(n).needs_reference for n in NAMES)
    with pytest.raises(KeyError, match="pl_dpo"):
        listwise.get_listwise_loss("pl_dpoo")
    with pytest.raises(ValueError, match="already registered"):
        listwise.register_listwise_loss("pl_dpo")(lambda ll, hp: (ll.logps[:, 0], {}))
    loss_B, _ = listwise.listwise_loss("pl_dpo", [-5.0, -7.0], [-6.0, -8.0], scores=[1.0, 0.0], beta=0.3)
    np.testing.assert_allclose(loss_B, [math.log(2.0)], rtol=1e-6)
    with pytest.raises(ValueError, match="scores"):
        listwise.listwise_loss("pl_dpo", [-5.0, -7.0], [-6.0, -8.0])
    with pytest.raises(ValueError, match="ref"):
        listwise.listwise_loss("lipo_lambda", [-5.0, -7.0], scores=[1.0, 0.0])
