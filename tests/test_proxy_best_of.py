"""A reward model judged by the use a study makes of it: best-of-N on the SFT base's samples picked by the RM,
scored by gold, beside the gold best-of-N ceilings (the reward-model factor's over-optimisation curve)."""

import numpy as np
from conftest import tiny_run_config

from jaxrl import evaluate, train


def test_best_of_n_by_a_proxy_on_hand_cases():
    gold = np.array([[0.0, 1.0, 2.0, 3.0]])
    perfect, reversed_ = gold.copy(), -gold
    assert evaluate.expected_best_of(gold, 1, by_PS=reversed_)[0] == 1.5  # n = 1: any proxy is the mean
    assert evaluate.expected_best_of(gold, 4, by_PS=perfect)[0] == 3.0
    assert evaluate.expected_best_of(gold, 4, by_PS=reversed_)[0] == 0.0  # the proxy picks the worst
    # n = 2 by gold: E[max of a random pair] = (1*1 + 2*2 + 3*3) / 6 = 14/6; by the reversed proxy: the min.
    np.testing.assert_allclose(evaluate.expected_best_of(gold, 2, by_PS=perfect), [14 / 6])
    by_reversed = evaluate.expected_best_of(gold, 2, by_PS=reversed_)
    np.testing.assert_allclose(by_reversed, [(3 * 0 + 2 * 1 + 1 * 2) / 6])
    assert evaluate.sample_ranking_accuracy(gold, perfect) == 1.0
    assert evaluate.sample_ranking_accuracy(gold, reversed_) == 0.0
    tied = np.array([[1.0, 1.0, 2.0]])  # the tied gold pair is left out
    assert evaluate.sample_ranking_accuracy(tied, np.array([[0.0, 5.0, 1.0]])) == 0.5


def test_a_reward_model_run_reports_its_proxy_best_of_n(tmp_path, sft_run):
    _, base = sft_run
    cfg = tiny_run_config(
        "rm",
        **{
            "train.init_from": str(base),
            "train.steps": 4,
            "data.eval_prompts_per_domain": 3,
            "data.eval_best_of": 4,
        },
    )
    summary = train.run(cfg, tmp_path / "rm", log=lambda *a, **k: None)
    ev = summary["eval"]
    assert {"proxy_best_of_1", "proxy_best_of_4", "best_of_4", "sample_ranking_accuracy"} <= set(ev)
    assert abs(ev["proxy_best_of_1"] - ev["best_of_1"]) < 1e-9  # one sample: nothing to pick
    assert ev["proxy_best_of_4"] <= ev["best_of_4"] + 1e-9  # no proxy beats picking by gold
    assert 0.0 <= ev["sample_ranking_accuracy"] <= 1.0
