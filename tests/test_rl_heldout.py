"""Held-out evaluation of online RL on a prompts file: the held-out prompts are never trained on, the
config refuses what cannot work, and the metrics average a prompt's samples before the standard error."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("transformers")

from tiny_hf import CORPUS, write_tokenizer  # noqa: E402

from jaxrl.config import Config, ConfigError, DataConfig, RLConfig  # noqa: E402
from jaxrl.data import pipeline  # noqa: E402
from jaxrl.rl import context, heldout  # noqa: E402
from jaxrl.validate import validate  # noqa: E402


def prompts_file(path, n):
    path.write_text(
        "".join(json.dumps({"prompt": f"{CORPUS[i % len(CORPUS)]} #{i}"}) + "\n" for i in range(n))
    )
    return str(path)


def config(tmp_path, **rl):
    write_tokenizer(tmp_path / "tok")
    data = DataConfig(tokenizer=str(tmp_path / "tok"), max_prompt_len=32, max_len=48)
    return Config(stage="ppo", data=data, rl=RLConfig(rollout_batch=4, minibatch=4, **rl))


def numbers(records):
    """The #i each prompt text ends with (its row in the file)."""
    return [int(re.search(r"#(\d+)", str(r.prompt)).group(1)) for r in records]


def test_held_out_prompts_are_the_files_last_and_never_trained_on(tmp_path):
    path = prompts_file(tmp_path / "p.jsonl", 20)
    cfg = config(tmp_path, prompt_set=path, num_prompts=100, eval_prompts=4)
    tok = pipeline.load_tokenizer(cfg)
    train, _, _, _ = context.prompt_set(cfg, tok)
    held, report = heldout.load(cfg, tok)
    assert numbers(train) == list(range(16))
    assert numbers(held.records) == [16, 17, 18, 19]
    assert held.ids.shape == (4, 32) and "4 of 4 kept" in report[0]
    # num_prompts below the rest: training takes its first num_prompts, the held-out ones stay the last.
    fewer = config(tmp_path, prompt_set=path, num_prompts=8, eval_prompts=4)
    assert len(context.prompt_set(fewer, tok)[0]) == 8
    assert numbers(heldout.load(fewer, tok)[0].records) == [16, 17, 18, 19]
    # Off by default: training reads the whole file, as before.
    assert len(context.prompt_set(config(tmp_path, prompt_set=path, num_prompts=100), tok)[0]) == 20
    assert heldout.load(config(tmp_path, prompt_set=path), tok) == (None, [])


def test_a_held_out_file_leaves_the_training_prompts_alone(tmp_path):
    path = prompts_file(tmp_path / "p.jsonl", 12)
    other = prompts_file(tmp_path / "q.jsonl", 6)
    cfg = config(tmp_path, prompt_set=path, num_prompts=100, eval_prompts=5, eval_prompt_set=other)
    tok = pipeline.load_tokenizer(cfg)
    assert len(context.prompt_set(cfg, tok)[0]) == 12
    assert numbers(heldout.load(cfg, tok)[0].records) == [0, 1, 2, 3, 4]


def test_what_cannot_work_is_refused(tmp_path):
    gold_ppo = lambda **rl: Config(stage="ppo", rl=RLConfig(verifiable="gold", value_init="policy", **rl))
    with pytest.raises(ConfigError, match="synthetic world evaluates with its gold reward"):
        validate(gold_ppo(prompt_set="in_domain", eval_prompts=8))
    with pytest.raises(ConfigError, match="rl.eval_prompts is 0"):
        validate(gold_ppo(eval_prompt_set="/x.jsonl"))
    with pytest.raises(ConfigError, match="rl.eval_prompts"):
        validate(gold_ppo(eval_prompts=-1))
    path = prompts_file(tmp_path / "p.jsonl", 4)
    cfg = config(tmp_path, prompt_set=path, eval_prompts=4)
    with pytest.raises(ConfigError, match="only 4 prompts, none would be left to train on"):
        heldout.load(cfg, pipeline.load_tokenizer(cfg))


def test_summary_averages_a_prompts_samples_before_the_standard_error():
    values = {
        "score": np.array([1.0, 3.0, 0.0, 0.0, 5.0, 7.0]),
        "kl": np.array([0.1, 0.3, 0.2, 0.2, 0.0, 0.4]),
        "prompt": np.array([0, 0, 1, 1, 2, 2]),
    }
    out = heldout.summarize(values)
    per_prompt = np.array([2.0, 0.0, 6.0])
    assert out["score"] == pytest.approx(16 / 6) and out["kl"] == pytest.approx(0.2)
    assert out["score_se"] == pytest.approx(np.std(per_prompt, ddof=1) / np.sqrt(3))
