"""Listwise preference optimisation end to end: ranked lists made by the synthetic world's labeller and read
whole from files, tokenised into [N, K, T] batches with masks, trained by the listwise losses, and the same
lists binarised for the pairwise ones."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_config

from jaxrl import config as config_lib
from jaxrl import group, synthetic, train
from jaxrl.data import binarize, pipeline, tokenize
from jaxrl.data.records import RatedCompletions, messages
from jaxrl.synthetic.labels import rank_list

QUIET = lambda *a, **k: None  # noqa: E731


def test_rank_list_generalises_the_pairwise_labeller():
    rng = np.random.default_rng(0)
    rewards, lengths = [0.2, 0.9, 0.5, 0.1], [3, 3, 3, 3]
    assert list(rank_list(rng, rewards, lengths, temperature=0.0)) == [2, 0, 1, 3]
    assert list(rank_list(rng, rewards, lengths, temperature=0.0, flip=1.0)) == [1, 3, 2, 0]
    # K = 2 at a temperature: P(a first) is the Bradley-Terry sigmoid((r_a - r_b) / temperature).
    draws = [rank_list(rng, [0.1, 0.0], [1, 1], temperature=0.1)[0] == 0 for _ in range(4000)]
    assert abs(np.mean(draws) - 1 / (1 + np.exp(-1.0))) < 0.03


def test_ranked_dataset_states_its_noise():
    clean = synthetic.make_ranked_dataset("clean", 200, seed=0, k=4)
    noisy = synthetic.make_ranked_dataset("noisy", 200, seed=0, k=4)
    assert len(clean) == 200 and all(len(r.completions) == 4 for r in clean)
    assert sorted(clean[0].ratings) == [0.0, 1 / 3, 2 / 3, 1.0]
    assert clean.stats["pair_flip_rate"] < 0.05 < 0.2 < noisy.stats["pair_flip_rate"]
    assert [r.prompt for r in clean] == [r.prompt for r in noisy]  # one content stream: only labels differ
    gold = synthetic.make_gold_lists(20, seed=0, k=3)
    assert all(len(set(r.completions)) == 3 for r in gold)


def rated(n_completions: int, ratings=None, id="x") -> RatedCompletions:
    ratings = ratings or tuple(float(i) for i in range(n_completions))
    return RatedCompletions(
        messages(("user", "Name an animal.")),
        tuple(messages(("assistant", f"animal {i}")) for i in range(n_completions)),
        tuple(ratings),
        id=id,
    )


def test_lists_are_kept_whole_cut_and_masked_and_counted():
    records = [rated(2, id="a"), rated(5, id="b"), rated(3, (1.0, None, 0.0), id="c"), rated(1, id="d")]
    lists, counts = binarize.to_lists(records, 4, seed=0)
    assert counts == {"cut_to_k": 1, "unrated_completion": 1, "too_few_rated": 1}
    assert len(lists) + counts["too_few_rated"] == len(records)  # lists read = used + dropped
    by_id = {r.id: scored for r, scored in lists}
    assert len(by_id["b"]) == 4 and 4 in [i for i, _ in by_id["b"]]  # the best always stays
    assert [i for i, _ in by_id["c"]] == [0, 2]
    tok = synthetic.SyntheticTokenizer()
    arrays, stats = tokenize.encode_lists(lists, tok, k=4, max_len=24, max_prompt_len=12)
    assert arrays["tokens"].shape == (3, 4, 24) and arrays["scores"].shape == (3, 4)
    np.testing.assert_array_equal(arrays["list_mask"], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert np.all(arrays["loss_mask"][arrays["list_mask"] == 0] == 0)
    assert stats.kept == 3 and stats.seen == 3
    # Pairs derived from the same lists are today's binarisation.
    pairs, _ = binarize.binarize(records, "best_vs_random", seed=0)
    assert len(pairs) == 3


def test_synthetic_lists_feed_listwise_and_pairwise_losses():
    listwise = tiny_run_config("dpo", **{"loss.name": "lipo_lambda", "data.list_size": 3})
    data = pipeline.build_stage_data(listwise)
    assert data.train["tokens"].shape[1:] == (3, 48) and data.eval["scores"].shape[1] == 3
    assert any("ranked lists: 128 of 3" in line for line in data.report)
    pairwise = config_lib.override(listwise, {"loss.name": "dpo"})
    pairs = pipeline.build_stage_data(pairwise)
    assert pairs.train["tokens"].shape[1:] == (2, 48)
    assert any("binarised (best_vs_random)" in line for line in pairs.report)


def test_listwise_loss_needs_lists():
    with pytest.raises(config_lib.ConfigError, match="data.list_size"):
        train.resolve(tiny_run_config("dpo", **{"loss.name": "pl_dpo"}))
    with pytest.raises(config_lib.ConfigError, match="listwise"):
        train.resolve(tiny_run_config("dpo", **{"loss.name": "no_such_loss"}))


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_lists_of_two_train_exactly_as_dpo(tmp_path, sft_run):
    """With K = 2 the Plackett-Luce loss is DPO's, and the lists are the pairs binarisation makes of them:
    the two runs log the same losses step by step."""
    _, base = sft_run
    common = {"data.list_size": 2, "train.init_from": str(base), "train.steps": 4, "loss.beta": 0.3}
    as_lists = tiny_run_config("dpo", **common, **{"loss.name": "pl_dpo"})
    as_pairs = tiny_run_config("dpo", **common, **{"loss.name": "dpo"})
    train.run(as_lists, tmp_path / "lists", log=QUIET)
    train.run(as_pairs, tmp_path / "pairs", log=QUIET)
    a, b = rows(tmp_path / "lists"), rows(tmp_path / "pairs")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train/loss", "eval/loss", "train/rewards/margins", "train/grad_norm"):
            if key in ra:
                np.testing.assert_allclose(ra[key], rb[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_nectar_lists_are_read_whole(tmp_path):
    """A Nectar file (7 ranked answers per prompt) read whole into lists of 4 for a listwise loss."""
    from chat_fixtures import word_tokenizer
    from test_readers import NECTAR_ROWS

    path = tmp_path / "nectar.jsonl"
    row = dict(NECTAR_ROWS[0], prompt="\n\nHuman: name an animal\n\nAssistant:")
    row["answers"] = [dict(a, answer=f"a {a['rank']} cat") for a in row["answers"]]
    path.write_text("\n".join(json.dumps(row) for _ in range(16)) + "\n")
    tok = word_tokenizer(tmp_path / "tok", ["name", "an", "animal", "a", "cat", *"1234567"])
    cfg = tiny_run_config(
        "dpo",
        **{
            "loss.name": "list_mle",
            "data.source": str(path),
            "data.format": "nectar",
            "data.list_size": 4,
            "data.num_eval": 0,
            "data.tokenizer": str(tok),
            "model.vocab_size": 64,
        },
    )
    data = pipeline.build_stage_data(train.resolve(cfg))
    assert data.train["tokens"].shape[:2] == (16, 4)
    np.testing.assert_array_equal(data.train["list_mask"], 1.0)
    assert np.all(data.train["scores"].max(axis=1) == -1.0)  # rank 1 (the best) is always kept
    assert any("kept as 16 ranked lists of up to 4 (16 cut to 4)" in line for line in data.report)


def test_listwise_runs_group_only_with_their_own_loss():
    a = tiny_run_config("dpo", **{"loss.name": "pl_dpo", "data.list_size": 3})
    assert group.group_key(a) == group.group_key(config_lib.override(a, {"seed": 1, "loss.beta": 0.5}))
    assert group.group_key(a) != group.group_key(config_lib.override(a, {"loss.name": "list_mle"}))
