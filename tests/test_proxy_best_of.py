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
    # The same on the validation split (what a study selects reward-model recipes on), on other prompts.
    val = summary["val"]
    assert {"proxy_best_of_1", "proxy_best_of_4", "best_of_4", "sample_ranking_accuracy"} <= set(val)
    assert val["proxy_best_of_4"] <= val["best_of_4"] + 1e-9 and val["best_of_4"] != ev["best_of_4"]


def test_reward_models_score_their_base_s_stored_draws_as_if_sampled_again(tmp_path, monkeypatch):
    """An SFT base stores its best-of-N draws of both splits; a reward model trained from it scores those (no
    sampling, no read of the base's parameters) and reports exactly what sampling them again gives."""
    world = {
        "data.eval_prompts_per_domain": 3,
        "data.val_prompts_per_domain": 2,
        "data.eval_best_of": 4,
        "data.eval_samples": 2,
    }
    base = tmp_path / "sft"
    train.run(tiny_run_config("sft", **{"train.steps": 4, **world}), base, log=lambda *a, **k: None)
    stored = evaluate.draws_path(base, "test")
    assert stored == base.absolute() / "final" / evaluate.DRAWS_FILE and stored.exists()
    stored_val = evaluate.draws_path(base, "validation")
    assert stored_val.exists()

    sampled = []
    generate = evaluate._generate
    monkeypatch.setattr(evaluate, "_generate", lambda *a, **k: sampled.append(1) or generate(*a, **k))
    from jaxrl.models import init as model_init

    loads = []
    load_run_params = model_init.load_run_params
    monkeypatch.setattr(
        model_init, "load_run_params", lambda *a, **k: loads.append(a[0]) or load_run_params(*a, **k)
    )
    rm = tiny_run_config("rm", **{"train.init_from": str(base), "train.steps": 4, **world})
    reused = train.run(rm, tmp_path / "rm_reused", log=lambda *a, **k: None)
    assert sampled == []  # the proxy curves read the base's draws
    assert loads.count(str(base)) == 1  # init_from's own read; the proxy evaluation never loads the base

    stored.rename(tmp_path / "moved.npz")  # now the reward model must sample the base again
    stored_val.rename(tmp_path / "moved_val.npz")
    fresh = train.run(rm, tmp_path / "rm_fresh", log=lambda *a, **k: None)
    assert sampled
    for split in ("eval", "val"):
        keys = [k for k in fresh[split] if "best_of" in k or k == "sample_ranking_accuracy"]
        assert len(keys) >= 5
        assert {k: reused[split][k] for k in keys} == {k: fresh[split][k] for k in keys}


def test_stored_draws_answer_only_for_the_same_prompts_and_sampling(tmp_path):
    from types import SimpleNamespace

    tok = SimpleNamespace(vocab_size=256, pad_id=0, eos_id=1)
    prompts = [SimpleNamespace(prompt="a"), SimpleNamespace(prompt="b")]
    cfg = tiny_run_config("sft", **{"data.eval_best_of": 4})
    path = tmp_path / "draws.npz"
    batch = (
        np.zeros((2, 3), np.int32),
        np.ones((2, 3), bool),
        np.zeros((2, 5), np.int32),
        np.ones((2, 5), bool),
        2,
    )
    many = {"gold": np.arange(8.0).reshape(2, 4)}
    evaluate._write_draws(path, evaluate._draws_key(cfg, tok, prompts), many, [batch])
    got, batches = evaluate._read_draws(path, evaluate._draws_key(cfg, tok, prompts))
    np.testing.assert_array_equal(got["gold"], many["gold"])
    assert batches[0][4] == 2 and batches[0][2].shape == (2, 5)
    for other in (
        evaluate._draws_key(tiny_run_config("sft", **{"data.eval_best_of": 8}), tok, prompts),
        evaluate._draws_key(
            tiny_run_config("sft", **{"data.eval_best_of": 4, "data.eval_temperature": 0.5}), tok, prompts
        ),
        evaluate._draws_key(cfg, tok, prompts[::-1]),
        evaluate._draws_key(cfg, SimpleNamespace(vocab_size=300, pad_id=0, eos_id=1), prompts),
    ):
        assert evaluate._read_draws(path, other) is None
    assert evaluate._read_draws(tmp_path / "absent.npz", evaluate._draws_key(cfg, tok, prompts)) is None
