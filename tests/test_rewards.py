"""Rewards: verifiable rewards, ensembles and transforms on hand values, shaping (EOS / length penalties,
normalisation), reward-model scoring under the sampler's left-pad convention (equal to the RM training
convention), ensembles of run directories, cached reference scores and the tokenizer check."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl import checkpoint, rewards, sharding, steps
from jaxrl import config as config_lib
from jaxrl.config import Config, ConfigError, MeshConfig, ModelConfig
from jaxrl.data.records import PromptRecord, messages
from jaxrl.models import init as model_init
from jaxrl.synthetic import SyntheticTokenizer, gold_reward, make_prompt_set

TINY = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, dtype="float32")
PRESET = "fsdp"
EOS = 2


@functools.cache
def mesh1():
    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, preset=PRESET), devices=jax.devices()[:1])


def make_rm_run(workdir, seed: int, tokenizer=None):
    """A finished scalar-head run directory with random parameters."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save(Config(stage="rm", model=TINY, seed=seed), workdir / "config.json")
    model_cfg = model_init.stage_model_config(Config(stage="rm", model=TINY))
    checkpoint.save_params(
        checkpoint.final_params_dir(workdir), model_init.init_params(model_cfg, seed, mesh1(), PRESET)
    )
    if tokenizer is not None:
        tokenizer.save(workdir / "tokenizer.json")
    return workdir


def prompt_batch(B=4, P=6, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, P + 1, B)
    prompts = [list(rng.integers(4, TINY.vocab_size, n)) for n in lengths]
    ids, mask = np.zeros((B, P), np.int32), np.zeros((B, P), np.int32)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :], mask[i, P - len(p) :] = p, 1
    records = [
        PromptRecord(messages(("user", f"q{i}")), ground_truth=f"answer {i}", id=str(i)) for i in range(B)
    ]
    return rewards.PromptBatch(records, ids, mask), prompts


def responses(B=4, N=5, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, TINY.vocab_size, (B, N)).astype(np.int32)
    lengths = rng.integers(1, N + 1, B)
    lengths[0] = N
    mask = np.arange(N)[None, :] < lengths[:, None]
    for i in range(1, B):  # the sampler's responses end with EOS inside their mask, then pad
        tokens[i, lengths[i] - 1] = EOS
    tokens[~mask] = 0
    return tokens, mask


def test_gold_and_exact_match():
    records = make_prompt_set("in_domain", 8, seed=0)
    texts = ["the answer is 4", "sorry i can not help with that", "", "ok"] * 2
    batch = rewards.PromptBatch(records, np.zeros((8, 1), np.int32), np.ones((8, 1), np.int32))
    np.testing.assert_allclose(
        rewards.gold_scores(batch, None, None, texts),
        [gold_reward(r, t) for r, t in zip(records, texts, strict=True)],
    )
    prompts, _ = prompt_batch()
    scores = rewards.exact_match_scores(prompts, None, None, ["Answer  0", "answer 2", "x", " answer 3 "])
    np.testing.assert_array_equal(scores, [1.0, 0.0, 0.0, 1.0])
    no_truth = rewards.PromptBatch([PromptRecord(messages(("user", "q")))], None, None)
    with pytest.raises(ValueError, match="ground_truth"):
        rewards.exact_match_scores(no_truth, None, None, ["a"])


def test_ensembles_and_transforms_on_hand_values():
    scores = np.asarray([[1.0, 0.0, 3.0], [3.0, 0.0, -1.0]])
    np.testing.assert_allclose(rewards.ENSEMBLES["mean"](scores, 1.0), [2.0, 0.0, 1.0])
    np.testing.assert_allclose(rewards.ENSEMBLES["min"](scores, 1.0), [1.0, 0.0, -1.0])
    np.testing.assert_allclose(rewards.ENSEMBLES["uncertainty"](scores, 0.5), [1.5, 0.0, 0.0])
    out = rewards.log_sigmoid_centered(np.asarray([0.0, 2.0, -50.0, 50.0]), np.asarray([0.0, 0.0, 0.0, 0.0]))
    np.testing.assert_allclose(out, [math.log(0.5), math.log(1 / (1 + math.exp(-2))), -50.0, 0.0], atol=1e-6)


def test_shaping_penalties_and_normalisation():
    prompts, _ = prompt_batch()
    tokens, mask = responses()
    reward = rewards.CompositeReward(
        verifiable="exact_match", missing_eos_penalty=-10.0, length_penalty=0.1, eos_id=EOS
    )
    texts = ["answer 0", "no", "answer 2", "no"]
    parts = reward.components(prompts, tokens, mask, texts)
    # Row 0 fills the budget without EOS; the others end with EOS.
    np.testing.assert_array_equal(parts["missing_eos_penalty"], [-10.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(parts["length_penalty"], -0.1 * mask.sum(-1))
    np.testing.assert_allclose(
        parts["score"], np.asarray([1.0, 0.0, 1.0, 0.0]) - [10, 0, 0, 0] - 0.1 * mask.sum(-1), rtol=1e-6
    )
    np.testing.assert_allclose(reward(prompts, tokens, mask, texts), parts["score"])
    normalised = rewards.CompositeReward(verifiable="exact_match", normalize="batch", eos_id=EOS)
    eos_tokens = np.where(mask, tokens, 0)
    eos_tokens[0, -1] = EOS
    score = normalised(prompts, eos_tokens, mask, texts)
    assert abs(score.mean()) < 1e-6 and abs(score.std() - 1.0) < 1e-5
    with pytest.raises(ConfigError, match="needs a reward model"):
        rewards.CompositeReward()
    with pytest.raises(ConfigError, match="log_sigmoid_centered"):
        rewards.CompositeReward(verifiable="gold", transform="log_sigmoid_centered")


def test_reward_model_scores_at_the_last_response_token_as_in_rm_training(tmp_path):
    rm = rewards.RewardModel(make_rm_run(tmp_path / "rm", seed=0), mesh=mesh1(), preset=PRESET)
    prompts, raw_prompts = prompt_batch()
    tokens, mask = responses()
    scores = rm(prompts, tokens, mask)
    # The RM training convention: one unpadded row (positions 0..), reward at the last completion token.
    model = nnx.merge(rm.graphdef, rm.params)
    for i, prompt in enumerate(raw_prompts):
        row = np.asarray(prompt + list(tokens[i, : mask[i].sum()]), np.int32)[None]
        loss_mask = np.zeros_like(row)
        loss_mask[0, len(prompt) :] = 1
        expected = model.scores(model.hidden(jnp.asarray(row)))[0, int(steps.last_token_index(loss_mask)[0])]
        assert float(scores[i]) == pytest.approx(float(expected), abs=1e-5)
    # Padding after the response (the sampler's pads past EOS) does not change the score.
    padded_tokens = np.pad(tokens, ((0, 0), (0, 3)))
    np.testing.assert_allclose(rm(prompts, padded_tokens, np.pad(mask, ((0, 0), (0, 3)))), scores, atol=1e-5)


def test_reward_model_scores_in_the_run_layout_on_a_mesh(tmp_path):
    """On a mesh of 8 devices the scoring program is traced in the run's layout (its activations constrained
    to the batch's sharding, as a policy pass is) and scores as on one device."""
    source = make_rm_run(tmp_path / "rm", seed=0)
    mesh8 = sharding.make_mesh(MeshConfig(data=2, fsdp=4, preset=PRESET))
    rm8, rm1 = (rewards.RewardModel(source, mesh=m, preset=PRESET) for m in (mesh8, mesh1()))
    prompts, _ = prompt_batch(B=8)
    tokens, mask = responses(B=8)
    np.testing.assert_allclose(rm8(prompts, tokens, mask), rm1(prompts, tokens, mask), rtol=1e-5, atol=1e-6)
    arrays = (prompts.ids_BP, prompts.mask_BP, tokens, mask.astype(np.int32))

    def constraints(**static):
        text = rewards.score_responses.lower(rm8.graphdef, rm8.params, *arrays, **static).as_text()
        return text.count("sharding_constraint") + text.count("@Sharding")

    assert rm8.active_mesh == (mesh8, PRESET)
    assert constraints(active_mesh=rm8.active_mesh) > 0 and constraints() == 0


def test_ensemble_of_run_directories_and_offload(tmp_path):
    a, b = make_rm_run(tmp_path / "a", seed=0), make_rm_run(tmp_path / "b", seed=1)
    prompts, _ = prompt_batch()
    tokens, mask = responses()
    texts = [""] * 4
    single = [rewards.RewardModel(p, mesh=mesh1(), preset=PRESET)(prompts, tokens, mask) for p in (a, b)]
    rl = config_lib.RLConfig(
        reward_model=f"{a},{b}", ensemble="min", missing_eos_penalty=0.0, offload_frozen=True
    )
    tok = SyntheticTokenizer()
    reward = rewards.make_reward_fn(rl, tokenizer=_SmallTokenizer(tok), mesh=mesh1(), preset=PRESET)
    parts = reward.components(prompts, tokens, mask, texts)
    np.testing.assert_allclose(parts["rm0"], single[0], atol=1e-6)
    np.testing.assert_allclose(parts["rm1"], single[1], atol=1e-6)
    np.testing.assert_allclose(parts["score"], np.minimum(*single), atol=1e-6)


class _SmallTokenizer:
    """The synthetic tokenizer's ids, claiming a vocab that fits TINY (the RM checks only the size)."""

    def __init__(self, tok):
        self.eos_id, self.vocab_size = tok.eos_id, TINY.vocab_size


def test_log_sigmoid_centered_uses_cached_reference_scores(tmp_path):
    rm = rewards.RewardModel(make_rm_run(tmp_path / "rm", seed=0), mesh=mesh1(), preset=PRESET)
    prompts, _ = prompt_batch()
    tokens, mask = responses()
    reference_tokens, reference_mask = responses(seed=7)
    calls = []

    def responder(batch):
        calls.append(len(batch.records))
        return reference_tokens, reference_mask, [""] * len(batch.records)

    reward = rewards.CompositeReward(
        models=[rm],
        transform="log_sigmoid_centered",
        reference_responder=responder,
        missing_eos_penalty=0.0,
        eos_id=EOS,
    )
    parts = reward.components(prompts, tokens, mask, [""] * 4)
    expected = rewards.log_sigmoid_centered(
        rm(prompts, tokens, mask), rm(prompts, reference_tokens, reference_mask)
    )
    np.testing.assert_allclose(parts["score"], expected, atol=1e-6)
    reward.components(prompts, tokens, mask, [""] * 4)
    assert calls == [4]  # the second batch of the same prompts reuses the cached reference scores
    assert np.all(parts["score"] <= 0)


def test_reward_model_with_another_tokenizer_is_refused(tmp_path):
    other = SyntheticTokenizer(SyntheticTokenizer().vocab[:20])
    source = make_rm_run(tmp_path / "rm", seed=0, tokenizer=other)
    with pytest.raises(ConfigError, match="different tokenizer"):
        rewards.RewardModel(source, mesh=mesh1(), preset=PRESET, tokenizer=SyntheticTokenizer())
    not_rm = tmp_path / "lm"
    not_rm.mkdir()
    config_lib.save(Config(stage="sft", model=TINY), not_rm / "config.json")
    model_cfg = model_init.stage_model_config(Config(stage="sft", model=TINY))
    checkpoint.save_params(
        checkpoint.final_params_dir(not_rm), model_init.init_params(model_cfg, 0, mesh1(), PRESET)
    )
    with pytest.raises(ConfigError, match="scalar-head"):
        rewards.RewardModel(not_rm, mesh=mesh1(), preset=PRESET)


def test_constraint_rewards_compose_with_ensembles_and_transforms(tmp_path):
    # The objective: one RM; a constraint: an ensemble of two RMs under the run's ensemble and transform
    # (min of log σ(r − r_ref), each centred on its own reference scores); a second one: the gold reward.
    objective, a, b = (make_rm_run(tmp_path / name, seed=s) for name, s in (("obj", 0), ("a", 1), ("b", 2)))
    prompts, _ = prompt_batch()
    tokens, mask = responses()
    reference_tokens, reference_mask = responses(seed=7)
    calls = []

    def responder(batch):
        calls.append(len(batch.records))
        return reference_tokens, reference_mask, [""] * len(batch.records)

    rl = config_lib.RLConfig(
        reward_model=str(objective),
        ensemble="min",
        reward_transform="log_sigmoid_centered",
        missing_eos_penalty=-1.0,
        constraints=f'[{{"reward_model": "{a},{b}", "threshold": -0.7, "name": "ab"}}, '
        f'{{"verifiable": "exact_match", "threshold": 0.5}}]',
    )
    reward = rewards.make_reward_fn(
        rl,
        tokenizer=_SmallTokenizer(SyntheticTokenizer()),
        mesh=mesh1(),
        preset=PRESET,
        reference_responder=responder,
    )
    assert [m.source for m in reward.all_models] == [objective, a, b]  # the order of the reward programs
    texts = ["answer 0", "no", "answer 2", "x"]
    parts = reward.components(prompts, tokens, mask, texts)
    single = {p: rewards.RewardModel(p, mesh=mesh1(), preset=PRESET) for p in (objective, a, b)}

    def centred(path):
        rm = single[path]
        return rewards.log_sigmoid_centered(
            rm(prompts, tokens, mask), rm(prompts, reference_tokens, reference_mask)
        )

    np.testing.assert_allclose(parts["constraint/ab"], np.minimum(centred(a), centred(b)), atol=1e-6)
    np.testing.assert_array_equal(parts["constraint/exact_match"], [1.0, 0.0, 1.0, 0.0])
    # The objective's score is its own: the constraints are components beside it, not in it.
    eos_penalty = np.where(rewards.missing_eos(tokens, mask, EOS), -1.0, 0.0)
    np.testing.assert_allclose(parts["score"], centred(objective) + eos_penalty, atol=1e-6)
    reward.components(prompts, tokens, mask, texts)
    assert calls == [4, 4]  # the objective's and the constraint's reference scores, each cached once
