"""The lm-eval backend "jaxrl" and `jaxrl eval`: per-request log-likelihoods against transformers' own on a
tiny random Llama checkpoint written here (float32, < 1e-4), greedy generations identical to transformers'
greedy generate, rolling log-likelihoods, chat templates, multi-process helpers, `jaxrl eval` end to end
on local task YAMLs over local JSONL files (nothing is downloaded), and parity with lm-eval's own `hf` backend
(HFLM) request for request and task for task, on one device and under an fsdp mesh."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lm_eval.api.instance import Instance  # noqa: E402
from tiny_hf import CORPUS, write_llama, write_reward_model  # noqa: E402

from jaxrl import cli  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(torch model, HF tokenizer, directory) of a tiny random Llama with its tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    model, tok = write_llama(directory, seed=0)
    return model, tok, directory


def _lm(directory, **kwargs):
    from jaxrl.eval.backend import JaxrlLM

    return JaxrlLM(pretrained=str(directory), dtype="float32", bucket=8, **kwargs)


@pytest.fixture(scope="module")
def lm(checkpoint):
    return _lm(checkpoint[2], batch_size=8)


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def _hf_loglikelihood(model, tok, context, continuation):
    """lm-eval's hf-backend recipe with transformers' tokenizer and forward: (sum log p, is_greedy)."""
    if context:
        n = len(context) - len(context.rstrip())
        context, continuation = (context[:-n], context[-n:] + continuation) if n else (context, continuation)
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        ctx, cont = ctx, whole[len(ctx) :]
    else:
        ctx, cont = [tok.bos_token_id], tok.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0, -len(cont) :]
    picked = logp[torch.arange(len(cont)), torch.tensor(cont)]
    return float(picked.sum()), bool((logp.argmax(-1) == torch.tensor(cont)).all())


REQUESTS = [
    ("the cat sat on", " a mat"),
    ("one two three", " four"),
    ("how many apples does tom have ?", " ten"),
    ("Q: 1 + 2 =", " 3"),
    ("the dog ran to the red", " house ; and the cat sat on a mat and the dog"),
    ("", "the cat sat"),
    ("question : what is", " five plus six "),
    ("a", " b c d e f g"),
    ("seven eight nine ten plus minus equals answer question : is what how many apples does tom", " have ?"),
]


@pytest.mark.parametrize("mesh", ["dp", "fsdp"])
def test_loglikelihood_matches_transformers(checkpoint, lm, mesh):
    model, tok, directory = checkpoint
    backend = (
        lm if mesh == "dp" else _lm(directory, batch_size=4, mesh_preset="fsdp", mesh_data=2, mesh_fsdp=4)
    )
    ours = backend.loglikelihood(_instances("loglikelihood", REQUESTS))
    theirs = [_hf_loglikelihood(model, tok, c, x) for c, x in REQUESTS]
    np.testing.assert_allclose([o[0] for o in ours], [t[0] for t in theirs], atol=TOL, rtol=0)
    assert [o[1] for o in ours] == [t[1] for t in theirs]
    assert all(np.isfinite(o[0]) and o[0] < 0 for o in ours)


def test_chunked_loglikelihood_matches_transformers(checkpoint, lm):
    """logprob_chunk=2: log-likelihoods and is_greedy over sequence chunks (no [B, T, V] logits), as
    unchunked within fp32 rounding of the sums (measured: 7.6e-6 on sums up to 173, 4e-8 relative) and as
    transformers."""
    model, tok, directory = checkpoint
    ids = torch.tensor([tok.encode("the cat sat on")])
    greedy = model.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=0)[0, ids.shape[1] :]
    requests = REQUESTS + [("the cat sat on", tok.decode(greedy))]
    ours = _lm(directory, batch_size=8, logprob_chunk=2).loglikelihood(_instances("loglikelihood", requests))
    whole = lm.loglikelihood(_instances("loglikelihood", requests))
    theirs = [_hf_loglikelihood(model, tok, c, x) for c, x in requests]
    np.testing.assert_allclose([o[0] for o in ours], [t[0] for t in theirs], atol=TOL, rtol=0)
    np.testing.assert_allclose([o[0] for o in ours], [w[0] for w in whole], atol=1e-6, rtol=1e-6)
    assert [o[1] for o in ours] == [t[1] for t in theirs] == [w[1] for w in whole]
    assert ours[-1][1]  # the greedy continuation (3 targets: over two chunks) is greedy


def test_greedy_continuation_is_greedy(checkpoint, lm):
    """is_greedy is True exactly for transformers' own greedy continuation."""
    model, tok, _ = checkpoint
    ids = torch.tensor([tok.encode("the cat sat on")])
    out = model.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=0)[0, ids.shape[1] :]
    continuation = tok.decode(out)
    ((logp, greedy),) = lm.loglikelihood(_instances("loglikelihood", [("the cat sat on", continuation)]))
    assert greedy and tok.encode("the cat sat on" + continuation)[-3:] == out.tolist()


def test_loglikelihood_rolling_matches_transformers(checkpoint):
    """Rolling windows over a text longer than max_length: each token scored once, as lm-eval's recipe."""
    model, tok, directory = checkpoint
    backend = _lm(directory, batch_size=4, max_length=16)
    text = " ".join(CORPUS[:6])
    (ours,) = backend.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    token_list = tok.encode(text)
    total = 0.0
    for context, continuation in map(
        lm_eval.utils.make_disjoint_window,
        lm_eval.utils.get_rolling_token_windows(
            token_list=token_list, prefix_token=tok.bos_token_id, max_seq_len=16, context_len=1
        ),
    ):
        ids = torch.tensor([(context + continuation)[-17:][:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0, -len(continuation) :]
        total += float(logp[torch.arange(len(continuation)), torch.tensor(continuation)].sum())
    assert len(token_list) > 16 * 2
    assert abs(ours - total) < TOL * 10


def _hf_greedy(model, tok, context, max_new, until):
    ids = torch.tensor([tok.encode(context)])
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new, pad_token_id=0)[0, ids.shape[1] :]
    text = tok.decode(out, skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


PROMPTS = [
    "the cat sat on",
    "one two three four",
    "Q: 1 + 2 =",
    "how many apples",
    "the",
    "red house ; the dog",
]


@pytest.mark.parametrize("mesh", ["dp", "fsdp"])
def test_greedy_generation_matches_transformers(checkpoint, lm, mesh):
    model, tok, directory = checkpoint
    backend = (
        lm if mesh == "dp" else _lm(directory, batch_size=4, mesh_preset="fsdp", mesh_data=2, mesh_fsdp=4)
    )
    kwargs = [
        {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
        {"until": [" the", ";"], "max_gen_toks": 7},
    ]
    args = [(p, dict(k)) for p in PROMPTS for k in kwargs]
    ours = backend.generate_until(_instances("generate_until", args))
    theirs = [_hf_greedy(model, tok, p, k["max_gen_toks"], k["until"]) for p, k in args]
    assert ours == theirs
    assert any(len(t) > 3 for t in theirs)


def test_sampled_generation(checkpoint):
    """do_sample draws from the model: reproducible for a seed, different across draws and seeds."""
    args = [("the cat", {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0})] * 6
    first, again, other = (
        _lm(checkpoint[2], batch_size=8, seed=seed).generate_until(_instances("generate_until", args))
        for seed in (0, 0, 1)
    )
    assert len(set(first)) > 1
    assert again == first and other != first


def test_chat_template(checkpoint, lm):
    """apply_chat_template renders the checkpoint's template (Tulu 2 format when it has none) and the rendered
    BOS is not doubled."""
    text = lm.apply_chat_template([{"role": "user", "content": "one two"}], add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n") and "one two" in text
    ids = lm.tok_encode(text)
    assert ids.count(checkpoint[1].bos_token_id) == 1


def test_allgather_objects_single_process():
    from jaxrl.eval.backend import allgather_objects

    assert allgather_objects({"a": [1, 2]}) == [{"a": [1, 2]}]


def _write_task(directory, name, data_file, body):
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        f"test_split: test\n{body}"
    )


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [
    {"question": "the cat sat on", "choices": ["a mat", "the dog", "seven"], "answer": 0},
    {"question": "one two three", "choices": ["four", "apples", "red house"], "answer": 0},
    {"question": "how many apples does tom have ?", "choices": ["ten", "the cat", "mat"], "answer": 0},
    {"question": "1 + 2 =", "choices": ["3", "9", "4"], "answer": 0},
]
GEN_PROMPTS = ["the cat sat on", "one two three", "Q: 1 + 2 =", "how many", "red house ;"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, checkpoint):
    """A directory of local task YAMLs: multiple choice, generation with a stop sequence (targets:
    transformers' greedy continuations for the first three rows), rolling perplexity."""
    model, tok, _ = checkpoint
    directory = tmp_path_factory.mktemp("tasks")
    _write_task(
        directory,
        "tiny_mc",
        _jsonl(directory / "mc.jsonl", MC_ROWS),
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
    )
    greedy = [_hf_greedy(model, tok, p, 6, ["\n", "</s>"]) for p in GEN_PROMPTS]
    rows = [
        {"prompt": p, "target": g if i < 3 else "no such answer"}
        for i, (p, g) in enumerate(zip(GEN_PROMPTS, greedy, strict=True))
    ]
    _write_task(
        directory,
        "tiny_gen",
        _jsonl(directory / "gen.jsonl", rows),
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    )
    _write_task(
        directory,
        "tiny_ppl",
        _jsonl(directory / "ppl.jsonl", [{"text": c} for c in CORPUS[:3]]),
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n",
    )
    _write_task(
        directory,
        "tiny_missing",
        directory / "absent.jsonl",
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "metric_list:\n  - metric: exact_match\n",
    )
    expected_gen = np.mean([g == r["target"] for g, r in zip(greedy, rows, strict=True)])
    return directory, greedy, expected_gen


def _mc_accuracy(model, tok):
    right = 0
    for row in MC_ROWS:
        scores = [_hf_loglikelihood(model, tok, row["question"], " " + c)[0] for c in row["choices"]]
        right += int(np.argmax(scores) == row["answer"])
    return right / len(MC_ROWS)


def _eval(capsys, model_dir, task_names, out, tasks_dir, *extra):
    code = cli.main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--tasks",
            task_names,
            "--out",
            str(out),
            "--include-path",
            str(tasks_dir),
            "--batch-size",
            "8",
            "--model-arg",
            "dtype=float32",
            "--model-arg",
            "bucket=8",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_jaxrl_eval_end_to_end(checkpoint, tasks, tmp_path, capsys):
    """Multiple choice, generation with a stop sequence and rolling perplexity through `jaxrl eval`: the task
    metrics equal those computed from transformers' own log-probs and greedy generations; a rerun skips
    finished tasks."""
    model, tok, directory = checkpoint
    tasks_dir, greedy, expected_gen = tasks
    code, out, err = _eval(
        capsys, directory, "tiny_mc,tiny_gen,tiny_ppl", tmp_path / "out", tasks_dir, "--log-samples"
    )
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(_mc_accuracy(model, tok))
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(expected_gen)
    assert 0 < expected_gen < 1
    samples = [
        json.loads(l)
        for l in (tmp_path / "out" / "tasks" / "tiny_gen.samples.jsonl").read_text().splitlines()
    ]
    assert sorted(s["resps"][0][0] for s in samples) == sorted(greedy)
    assert np.isfinite(results["results"]["tiny_ppl"]["word_perplexity,none"])
    lines = [l for l in out.splitlines() if l.startswith("tiny_")]
    assert len(lines) == 3 and lines[0].startswith("tiny_mc: acc=")
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "tasks").glob("*.json")}

    code, out, err = _eval(capsys, directory, "tiny_mc,tiny_gen,tiny_ppl", tmp_path / "out", tasks_dir)
    assert code == 0, err
    assert out.count("[already done]") == 3
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "tasks").glob("*.json")} == written


def test_jaxrl_eval_on_a_run_dir(checkpoint, tasks, tmp_path, capsys):
    """A jaxrl run directory (here converted from the HF checkpoint) evaluates to the same metrics."""
    from jaxrl.convert import hf_to_run

    model, tok, directory = checkpoint
    run = hf_to_run(directory, tmp_path / "run")
    code, out, err = _eval(capsys, run, "tiny_mc,tiny_gen", tmp_path / "out", tasks[0])
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(_mc_accuracy(model, tok))
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(tasks[2])


@pytest.mark.parametrize("case", ["unknown_task", "missing_data", "not_a_model", "no_model", "rm_as_policy"])
def test_jaxrl_eval_user_errors(checkpoint, tasks, reward_model, tmp_path, capsys, case):
    """Bad input is one line naming it and exit 2, not a traceback."""
    directory, tasks_dir = checkpoint[2], tasks[0]
    (tmp_path / "empty").mkdir()
    model, names, named = {
        "unknown_task": (directory, "tiny_mc,no_such_task", "no_such_task"),
        "missing_data": (directory, "tiny_missing", "absent.jsonl"),
        "not_a_model": (tmp_path / "empty", "tiny_mc", "empty"),
        "no_model": (tmp_path / "nowhere", "tiny_mc", "nowhere"),
        "rm_as_policy": (reward_model, "tiny_mc", "reward"),
    }[case]
    code, out, err = _eval(capsys, model, names, tmp_path / "out", tasks_dir)
    lines = [l for l in err.splitlines() if l.startswith("jaxrl eval: error:")]
    assert code == 2 and len(lines) == 1 and named in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, checkpoint):
    """A tiny random Llama reward model (sequence classification) with the same tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_reward")
    write_reward_model(directory, checkpoint[0], checkpoint[1], seed=1)
    return directory


def test_alpaca_eval_rm(checkpoint, reward_model, tmp_path, capsys):
    """The reward-model-judged win rate: a reference equal to the model's own answer is a tie (1/2), and the
    rate is the mean of wins computed from the judge's scores."""
    model, tok, directory = checkpoint
    instructions = ["one two three", "the cat sat on", "how many apples"]
    backend = _lm(directory, batch_size=8)
    chat_prompts = [backend.apply_chat_template([{"role": "user", "content": i}]) for i in instructions]
    own = backend.generate_until(
        _instances("generate_until", [(p, {"until": [], "max_gen_toks": 64}) for p in chat_prompts])
    )
    rows = [{"instruction": instructions[0], "output": own[0]}] + [
        {"instruction": i, "output": "the dog ran to the red house"} for i in instructions[1:]
    ]
    data = _jsonl(tmp_path / "alpaca.jsonl", rows)
    code = cli.main(
        [
            "eval",
            "--model",
            str(directory),
            "--tasks",
            "alpaca_eval_rm",
            "--out",
            str(tmp_path / "out"),
            "--judge",
            str(reward_model),
            "--alpaca-file",
            str(data),
            "--model-arg",
            "dtype=float32",
            "--log-samples",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["alpaca_eval_rm"]
    samples = [
        json.loads(l)
        for l in (tmp_path / "out" / "tasks" / "alpaca_eval_rm.samples.jsonl").read_text().splitlines()
    ]
    assert samples[0]["output"] == own[0] and samples[0]["reward"] == samples[0]["reference_reward"]
    wins = [
        1.0 if s["reward"] > s["reference_reward"] else 0.5 if s["reward"] == s["reference_reward"] else 0.0
        for s in samples
    ]
    assert result["win_rate,none"] == pytest.approx(np.mean(wins))


def test_tulu25_suite_settings():
    """The suite's settings live in one place and expand into tasks (HumanEval only on request)."""
    from jaxrl.eval import suites

    names = [t.task for t in suites.expand(["tulu25"])]
    assert names == ["gsm8k_cot", "mmlu", "bbh_cot_fewshot", "truthfulqa_mc2", "ifeval", "alpaca_eval_rm"]
    assert "humaneval" in [t.task for t in suites.expand(["tulu25"], with_optional=True)]
    by_name = {t.task: t for t in suites.TULU25}
    assert by_name["gsm8k_cot"].num_fewshot == 8 and by_name["bbh_cot_fewshot"].num_fewshot == 3
    assert by_name["mmlu"].num_fewshot == 0 and by_name["truthfulqa_mc2"].metric == "acc,none"
    from jaxrl.eval import harness

    known = set(harness.task_manager(None).all_tasks) | {"alpaca_eval_rm"}
    assert all(t.task in known for t in suites.TULU25)


def test_task_index_is_built_once_and_sees_edited_local_tasks(tmp_path):
    """The task index is built once per process for the same local tasks, and anew when a local task file is
    added (the new task is known) or edited."""
    from jaxrl.eval import harness

    data = _jsonl(tmp_path / "rows.jsonl", MC_ROWS)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    _write_task(tasks_dir, "cached_a", data, "output_type: multiple_choice\n")
    first = harness.task_manager([str(tasks_dir)])
    assert harness.task_manager([str(tasks_dir)]) is first
    assert "cached_a" in first.all_tasks and "cached_b" not in first.all_tasks
    _write_task(tasks_dir, "cached_b", data, "output_type: multiple_choice\n")
    second = harness.task_manager([str(tasks_dir)])
    assert second is not first and {"cached_a", "cached_b"} <= set(second.all_tasks)
    _write_task(tasks_dir, "cached_a", data, "output_type: multiple_choice\nnum_fewshot: 1\n")
    assert harness.task_manager([str(tasks_dir)]) is not second
    assert harness.task_manager(None) is harness.task_manager(None)
    assert "cached_a" not in harness.task_manager(None).all_tasks


# Parity with lm-eval's own `hf` backend (HFLM over the same checkpoint directory, needs accelerate): the same
# requests answered by both, request for request, and the same tasks scored by both through simple_evaluate.

PARITY_MAX_LENGTH = 32  # short, so the longest requests are left-truncated and rolling texts take windows
LONG_PROMPT = " ".join(CORPUS[:3])
ROLLING_TEXTS = [" ".join(CORPUS[:6]), CORPUS[7], "1 + 2 = 3 4 + 5 = 9 " * 5]


@pytest.fixture(scope="module")
def hflm(checkpoint):
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=str(checkpoint[2]),
        device="cpu",
        dtype="float32",
        batch_size=4,
        max_length=PARITY_MAX_LENGTH,
    )


def _parity_lm(directory, mesh):
    mesh_args = {"mesh_preset": "fsdp", "mesh_data": 2, "mesh_fsdp": 4} if mesh == "fsdp" else {}
    return _lm(directory, batch_size=4, max_length=PARITY_MAX_LENGTH, **mesh_args)


def _mc_requests():
    return [(row["question"], " " + c) for row in MC_ROWS for c in row["choices"]]


def _task_results(lm_obj, tasks_dir):
    from jaxrl.eval import harness

    out = lm_eval.simple_evaluate(
        model=lm_obj,
        tasks=["tiny_mc", "tiny_gen", "tiny_ppl"],
        task_manager=harness.task_manager([str(tasks_dir)]),
        log_samples=True,
        bootstrap_iters=0,
    )
    responses = {
        task: [(s["doc_id"], s["filtered_resps"]) for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in out["samples"].items()
    }
    return out["results"], responses


@pytest.mark.parametrize("mesh", ["dp", "fsdp"])
def test_parity_with_lm_eval_hf_backend(checkpoint, hflm, tasks, mesh):
    """The jaxrl backend answers every request as lm-eval's `hf` backend does: per-request log-likelihoods
    within 1e-4 and the same is_greedy (contexts longer than max_length left-truncated, the empty context
    scored after the prefix token), rolling log-likelihoods over several windows, greedy generations identical
    under two stop/max_gen_toks settings, and the local multiple-choice, generation and perplexity tasks score
    the same through simple_evaluate (the same responses per document)."""
    ours = _parity_lm(checkpoint[2], mesh)
    requests = REQUESTS + _mc_requests()
    assert max(len(ours.tok_encode(c + x)) for c, x in requests) > PARITY_MAX_LENGTH + 1
    mine = ours.loglikelihood(_instances("loglikelihood", requests))
    theirs = hflm.loglikelihood(_instances("loglikelihood", requests))
    np.testing.assert_allclose([m[0] for m in mine], [t[0] for t in theirs], atol=TOL, rtol=0)
    assert [m[1] for m in mine] == [t[1] for t in theirs]

    rolling = _instances("loglikelihood_rolling", [(t,) for t in ROLLING_TEXTS])
    assert len(hflm.tok_encode(ROLLING_TEXTS[0])) > 2 * PARITY_MAX_LENGTH
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(rolling), hflm.loglikelihood_rolling(rolling), atol=10 * TOL, rtol=0
    )

    kwargs = [
        {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
        {"until": [" the", ";"], "max_gen_toks": 7},
    ]
    args = [(p, dict(k)) for p in PROMPTS + [LONG_PROMPT] for k in kwargs]
    assert len(hflm.tok_encode(LONG_PROMPT)) > PARITY_MAX_LENGTH - 7  # left-truncated to fit max_gen_toks
    generated = ours.generate_until(_instances("generate_until", args))
    assert generated == hflm.generate_until(_instances("generate_until", args))
    assert any(len(g) > 3 for g in generated)

    mine_results, mine_responses = _task_results(ours, tasks[0])
    theirs_results, theirs_responses = _task_results(hflm, tasks[0])
    assert mine_responses["tiny_gen"] == theirs_responses["tiny_gen"]
    for (doc, mc), (doc_theirs, mc_theirs) in zip(
        mine_responses["tiny_mc"], theirs_responses["tiny_mc"], strict=True
    ):
        assert doc == doc_theirs and len(mc) == len(mc_theirs) == 3
        np.testing.assert_allclose([r[0] for r in mc], [r[0] for r in mc_theirs], atol=TOL, rtol=0)
    for task in ("tiny_mc", "tiny_gen", "tiny_ppl"):
        metrics = {k: v for k, v in theirs_results[task].items() if k != "alias"}
        assert metrics and set(metrics) == {k for k in mine_results[task] if k != "alias"}
        for key, value in metrics.items():
            if isinstance(value, float) and np.isfinite(value):
                assert mine_results[task][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, key)
            else:
                assert mine_results[task][key] == value, (task, key)


CHAT_TEMPLATES = {
    "with_system": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ '<|system|>\\n' + m['content'] }}{% elif m['role'] == 'user' %}"
        "{{ '<|user|>\\n' + m['content'] + '\\n' }}{% else %}"
        "{{ '<|assistant|>\\n' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "no_system": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% elif m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_chat_template_parity_with_lm_eval_hf_backend(checkpoint, tmp_path, template):
    """With the checkpoint's own chat template (one that emits BOS), apply_chat_template renders what
    lm-eval's `hf` backend renders: a multi-turn few-shot history with a generation prompt, without one (the
    final message continued, as for a task's gen_prefix), and with a system turn the template rejects
    (dropped, as lm-eval drops it); the rendered text tokenises to the same ids, BOS once."""
    pytest.importorskip("accelerate")
    import shutil

    from lm_eval.models.huggingface import HFLM

    directory = tmp_path / "chat_ckpt"
    shutil.copytree(checkpoint[2], directory)
    config_file = directory / "tokenizer_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "chat_template": CHAT_TEMPLATES[template]})
    )
    ours = _lm(directory, batch_size=8)
    theirs = HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=1)
    history = [
        {"role": "system", "content": "answer in words"},
        {"role": "user", "content": "one two"},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": "the cat sat on"},
    ]
    cases = [(history, True), (history, False), (history + [{"role": "assistant", "content": "A:"}], False)]
    for messages, add in cases:
        rendered = ours.apply_chat_template(messages, add_generation_prompt=add)
        assert rendered == theirs.apply_chat_template(messages, add_generation_prompt=add), (messages, add)
        assert rendered.startswith("<s>") and ours.tok_encode(rendered) == theirs.tok_encode(rendered)
        assert ours.tok_encode(rendered).count(checkpoint[1].bos_token_id) == 1
    assert ours.apply_chat_template(cases[2][0], add_generation_prompt=False).endswith("A:")
    assert ours.chat_template(True) == theirs.chat_template(True)


@pytest.mark.parametrize("model_type", ["word_level", "bpe"])
def test_decode_parity_with_lm_eval_hf_backend(checkpoint, tmp_path, model_type):
    """Generated ids decode to the text lm-eval's `hf` backend decodes them to, for a tokenizer whose config
    asks for clean_up_tokenization_spaces: transformers removes the space before punctuation and contractions
    for a word-level tokenizer and ignores the setting for a BPE one; encoding agrees too."""
    pytest.importorskip("accelerate")
    import shutil

    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    if model_type == "bpe" and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers < 5 cleans up BPE decodes too; the backend follows transformers >= 5")

    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint[2], directory)
    if model_type == "word_level":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).unlink(missing_ok=True)
        words = ["<pad>", "<s>", "</s>", "<unk>"] + "tom 's answer is 3 . n't it ? ,".split()
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
        fast.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "clean_up_tokenization_spaces": True})
    )
    ours = _lm(directory, batch_size=8)
    theirs = HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=1)
    text = "tom 's answer is 3 . is n't it ? 3 , 3"
    ids = theirs.tok_encode(text)
    assert ours.tok_encode(text) == ids
    decoded = ours.tok_decode(ids[1:] + [2, 0, 0])
    assert decoded == theirs.tok_decode(ids[1:] + [2, 0, 0])
    assert ("3." in decoded) == (model_type == "word_level")
