"""`jaxrl eval-rm`: reward-model accuracy on a RewardBench-format file (scores against transformers' own
sequence-classification forward on the same rendered conversation, RewardBench's section weighting), best-of-N
with jaxrl's sampler, and one-line errors for bad input. Tiny random checkpoints written here."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from tiny_hf import write_llama, write_reward_model  # noqa: E402

from jaxrl import cli  # noqa: E402
from jaxrl.eval import rewardbench, rm_eval  # noqa: E402

TOL = 1e-4


def test_sections_follow_rewardbench_weighting():
    """A section is the EXAMPLE_COUNTS-weighted mean of the subsets present (math-prm weighs 984, as the six
    code subsets together), Prior Sets the plain mean of four prior sets (anthropic_harmless not among them),
    the score weighs the sections present 2 and Prior Sets 1; absent sections are left out."""
    acc = {
        "alpacaeval-easy": 1.0,
        "mt-bench-easy": 0.5,
        "math-prm": 1.0,
        "hep-python": 0.0,
        "anthropic_helpful": 0.6,
        "shp": 0.8,
        "anthropic_harmless": 0.0,
        "my-own-subset": 0.0,
    }
    sections = rewardbench.section_scores(acc)
    chat, reasoning, prior = (100 + 0.5 * 28) / 128, 984 / (984 + 164), 0.7
    assert set(sections) == {"Chat", "Reasoning", rewardbench.PRIOR_SECTION, "Score"}
    assert sections["Chat"] == pytest.approx(chat) and sections["Reasoning"] == pytest.approx(reasoning)
    assert sections[rewardbench.PRIOR_SECTION] == pytest.approx(prior)
    assert sections["Score"] == pytest.approx((2 * chat + 2 * reasoning + prior) / 5)
    # The whole benchmark: Reasoning is half math, half the mean of the code languages.
    full = {s: 0.0 for s in rewardbench.EXAMPLE_COUNTS} | {"math-prm": 1.0, "hep-go": 0.6}
    assert rewardbench.section_scores(full)["Reasoning"] == pytest.approx(0.5 + 0.5 * 0.1)
    assert {s for v in rewardbench.SUBSET_MAPPING.values() for s in v} == set(rewardbench.EXAMPLE_COUNTS)
    assert sum(rewardbench.EXAMPLE_COUNTS[s] for s in rewardbench.SUBSET_MAPPING["Reasoning"]) == 2 * 984


def write_models(policy_dir, rm_dir):
    """(torch reward model, HF tokenizer): a tiny random Llama policy in `policy_dir` and a reward model of
    its shape in `rm_dir` (also used by tests/test_multihost.py)."""
    model, tok = write_llama(policy_dir, seed=0)
    return write_reward_model(rm_dir, model, tok, seed=1), tok


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy dir, reward-model dir, torch reward model, HF tokenizer): tiny random Llamas."""
    policy_dir, rm_dir = tmp_path_factory.mktemp("policy"), tmp_path_factory.mktemp("rm")
    rm, tok = write_models(policy_dir, rm_dir)
    return policy_dir, rm_dir, rm, tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PREFS = [
    {"prompt": "the cat sat on", "chosen": "a mat", "rejected": "the dog", "subset": "alpacaeval-easy"},
    {"prompt": "one two three", "chosen": "four five", "rejected": "apples", "subset": "alpacaeval-easy"},
    {"prompt": "how many apples", "chosen": "ten", "rejected": "seven eight nine", "subset": "mt-bench-med"},
    {"prompt": "what is 1 + 2", "chosen": "3", "rejected": "3", "subset": "mt-bench-med", "id": "tie"},
    {"prompt": "1 + 2 =", "chosen": "3", "rejected": "9", "subset": "math-prm"},
    {"prompt": "4 + 5 =", "chosen": "9", "rejected": "4 + 5 = 9 4 + 5", "subset": "math-prm"},
    {"prompt": "the red house", "chosen": "and the dog", "rejected": "minus", "subset": "hep-python"},
    {"prompt": "is what", "chosen": "answer question", "rejected": "plus", "subset": "refusals-dangerous"},
    {"prompt": "tom have ?", "chosen": "ten apples", "rejected": "the mat", "subset": "llmbar-natural"},
    {"prompt": "the dog ran", "chosen": "to the red house", "rejected": "on a mat", "subset": "shp"},
    {"prompt": "a mat and", "chosen": "the dog", "rejected": "one", "subset": "anthropic_helpful"},
    {"prompt": "seven", "chosen": "eight", "rejected": "two", "subset": "anthropic_harmless"},
    {
        "prompt": [
            {"role": "user", "content": "one two"},
            {"role": "assistant", "content": "three"},
            {"role": "user", "content": "four five"},
        ],
        "chosen": "six seven",
        "rejected": "the cat",
        "subset": "my-own-subset",
    },
]


def _messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def reference_scores(rm, tok, rows, field, max_len=4096, max_prompt_len=2048):
    """transformers' own: the conversation rendered by transformers' apply_chat_template (the Tulu 2 template
    jaxrl falls back to), cut as the rm stage cuts, scored by LlamaForSequenceClassification at its last
    token."""
    from jaxrl.data.chat import TULU2_TEMPLATE_WITH_BOS

    out = []
    for row in rows:
        messages = _messages(row["prompt"])
        full = tok.apply_chat_template(
            messages + [{"role": "assistant", "content": row[field]}],
            chat_template=TULU2_TEMPLATE_WITH_BOS,
            tokenize=False,
        )
        head = tok.apply_chat_template(
            messages, chat_template=TULU2_TEMPLATE_WITH_BOS, tokenize=False, add_generation_prompt=True
        )
        full_ids, head_ids = (
            tok.encode(full, add_special_tokens=False),
            tok.encode(head, add_special_tokens=False),
        )
        assert full_ids[: len(head_ids)] == head_ids
        prompt, completion = head_ids[-max_prompt_len:], full_ids[len(head_ids) :]
        ids = prompt + completion[: max_len - len(prompt)]
        with torch.no_grad():
            out.append(float(rm(torch.tensor([ids])).logits[0, 0]))
    return np.asarray(out)


def _eval_rm(capsys, *args):
    code = cli.main(["eval-rm", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("mesh", ["dp", "fsdp"])
def test_rm_accuracy_matches_transformers(models, tmp_path, capsys, mesh):
    """Per-pair scores equal transformers' forward of the same rendered conversation within 1e-4 (the HF
    checkpoint on 8-way data parallelism with the default lengths; the same RM as a jaxrl `rm` run directory
    under an fsdp mesh, prompts and responses truncated), a tie counts wrong, and accuracies per subset,
    section and overall follow from those scores as RewardBench computes them; one summary line per section
    present, then the score, the subsets no section holds and all pairs."""
    _, rm_dir, rm, tok = models
    if mesh == "fsdp":
        from jaxrl.convert import hf_to_run

        rm_dir = hf_to_run(rm_dir, tmp_path / "rm_run")
        assert json.loads((rm_dir / "config.json").read_text())["stage"] == "rm"
    data = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    limits = {} if mesh == "dp" else {"max_len": 12, "max_prompt_len": 8}
    flags = ["--batch-size", "4"]
    if mesh == "fsdp":
        flags += ["--mesh-data", "2", "--mesh-fsdp", "4", "--max-len", "12", "--max-prompt-len", "8"]
        flags += ["--dtype", "float32"]  # the run's own compute dtype is bfloat16
    code, out, err = _eval_rm(capsys, "--model", rm_dir, "--data", data, "--out", tmp_path / "out", *flags)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / rm_eval.RESULTS_FILE).read_text())["preferences"]
    per_row = [json.loads(line) for line in (tmp_path / "out" / rm_eval.SCORES_FILE).read_text().splitlines()]
    chosen = reference_scores(rm, tok, PREFS, "chosen", **limits)
    rejected = reference_scores(rm, tok, PREFS, "rejected", **limits)
    np.testing.assert_allclose([r["chosen_score"] for r in per_row], chosen, atol=TOL, rtol=0)
    np.testing.assert_allclose([r["rejected_score"] for r in per_row], rejected, atol=TOL, rtol=0)
    assert len(set(np.round(chosen, 3))) > len(PREFS) // 2  # the scores tell the texts apart
    tie = next(r for r in per_row if r["id"] == "tie")
    assert tie["chosen_score"] == tie["rejected_score"] and not tie["correct"]
    assert results["subsets"]["mt-bench-med"]["ties"] == 1
    assert (results["truncated_pairs"] > 0) == (mesh == "fsdp")

    correct = chosen > rejected
    correct[3] = False
    by_subset = {}
    for row, ok in zip(PREFS, correct, strict=True):
        by_subset.setdefault(row["subset"], []).append(ok)
    expected = {name: float(np.mean(v)) for name, v in by_subset.items()}
    assert {k: v["accuracy"] for k, v in results["subsets"].items()} == pytest.approx(expected)
    assert results["sections"] == pytest.approx(rewardbench.section_scores(expected))
    assert set(results["sections"]) == {
        "Chat",
        "Chat Hard",
        "Safety",
        "Reasoning",
        rewardbench.PRIOR_SECTION,
        "Score",
    }
    assert results["accuracy"] == pytest.approx(correct.mean()) and results["unmapped_subsets"] == [
        "my-own-subset"
    ]
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:6]] == [
        "Chat",
        "Chat Hard",
        "Safety",
        "Reasoning",
        rewardbench.PRIOR_SECTION,
        "Score",
    ]
    assert lines[0] == f"Chat: {results['sections']['Chat']:.4f} (2 subsets, 4 pairs)"
    assert any(line.startswith("subset my-own-subset: ") for line in lines)


def test_best_of_n(models, tmp_path, capsys):
    """N samples per prompt from the policy (jaxrl's sampler, sampled), scored by the RM as transformers
    scores them; the report's best is the mean of each prompt's maximum, first the mean of its first
    sample."""
    policy_dir, rm_dir, rm, tok = models
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "the cat sat on", "id": "a"}, {"prompt": "one two three"}, {"prompt": "how many apples"}],
    )
    code, out, err = _eval_rm(
        capsys,
        "--model",
        rm_dir,
        "--policy",
        policy_dir,
        "--prompts",
        prompts,
        "--best-of",
        "4",
        "--temperature",
        "1.0",
        "--max-new-tokens",
        "6",
        "--out",
        tmp_path / "out",
        "--policy-arg",
        "dtype=float32",
        "--policy-arg",
        "bucket=8",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "out" / rm_eval.RESULTS_FILE).read_text())["best_of_n"]
    samples = [
        json.loads(line) for line in (tmp_path / "out" / rm_eval.BEST_OF_N_FILE).read_text().splitlines()
    ]
    assert [s["id"] for s in samples] == ["a", "2", "3"] and all(len(s["samples"]) == 4 for s in samples)
    assert any(len(set(s["samples"])) > 1 for s in samples)  # sampled, not greedy
    prompts_text = ["the cat sat on", "one two three", "how many apples"]
    rows = [
        {"prompt": p, "text": t} for p, s in zip(prompts_text, samples, strict=True) for t in s["samples"]
    ]
    reference = reference_scores(rm, tok, rows, "text").reshape(3, 4)
    scores = np.asarray([s["scores"] for s in samples])
    np.testing.assert_allclose(scores, reference, atol=TOL, rtol=0)
    assert [s["best"] for s in samples] == list(np.argmax(scores, axis=1))
    assert report["best"] == pytest.approx(scores.max(axis=1).mean())
    assert report["first"] == pytest.approx(scores[:, 0].mean())
    assert report["expected_best_of"]["1"] == pytest.approx(scores.mean())
    assert report["expected_best_of"]["4"] == pytest.approx(report["best"])
    assert report["expected_best_of"]["1"] <= report["expected_best_of"]["2"] <= report["best"]
    assert out.splitlines()[0].startswith("best-of-4: best ")


@pytest.mark.parametrize(
    "case",
    ["missing_file", "no_chosen", "bad_json", "bad_prompt", "empty_dir", "no_dir", "lm_as_rm", "no_input"],
)
def test_eval_rm_user_errors(models, tmp_path, capsys, case):
    """Bad input is one line naming the file, row and field (or the model directory), exit 2, no traceback."""
    policy_dir, rm_dir, _, _ = models
    good = dict(PREFS[0])
    rows = {
        "no_chosen": [good, {k: v for k, v in good.items() if k != "chosen"}],
        "bad_prompt": [good, good, {**good, "prompt": 3}],
    }.get(case, [good])
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    if case == "bad_json":
        data.write_text(json.dumps(good) + "\n{not json\n")
    (tmp_path / "empty").mkdir()
    model, data_arg, named = {
        "missing_file": (rm_dir, tmp_path / "absent.jsonl", ["absent.jsonl"]),
        "no_chosen": (rm_dir, data, ["prefs.jsonl", "row 2", "'chosen'"]),
        "bad_json": (rm_dir, data, ["prefs.jsonl", "row 2", "JSON"]),
        "bad_prompt": (rm_dir, data, ["prefs.jsonl", "row 3", "'prompt'"]),
        "empty_dir": (tmp_path / "empty", data, ["empty", "neither"]),
        "no_dir": (tmp_path / "nowhere", data, ["nowhere"]),
        "lm_as_rm": (policy_dir, data, [str(policy_dir), "scalar head"]),
        "no_input": (rm_dir, None, ["--data"]),
    }[case]
    args = ["--model", model, "--out", tmp_path / "out"] + (["--data", data_arg] if data_arg else [])
    code, out, err = _eval_rm(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("jaxrl eval-rm: error:")]
    assert code == 2 and len(lines) == 1 and all(n in lines[0] for n in named), err
    assert "Traceback" not in err
