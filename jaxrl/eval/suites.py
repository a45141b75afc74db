"""Named evaluation suites: the one place their exact settings live (task, shots, chat format, generation
budget, the metric reported), next to the paper's numbers where ../shared/REFERENCE.md has them.

`jaxrl eval --tasks tulu25` expands a suite name into its tasks, each run with its own settings. Values
marked (verify) follow open-instruct's evaluation as far as could be checked here, not the paper's appendix.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    """One task of a suite and how it is run."""

    task: str  # an lm-eval task or group name (or "alpaca_eval_rm", jaxrl's reward-model-judged win rate)
    metric: str  # "metric,filter" of lm-eval's results that the suite reports
    num_fewshot: int | None = None  # None: the task's own default
    limit: int | None = None  # documents per (sub)task; None: all
    gen_kwargs: str | None = None  # lm-eval generation overrides, "max_gen_toks=512,..."
    chat: bool = True  # prompts in the model's chat template (the paper evaluates chat models so)
    optional: bool = False  # skipped unless named explicitly or `--with-optional`
    needs: str = ""  # what must be on the machine (lm-eval reads HF datasets from the local cache)
    paper: str = ""  # the setting in the paper, and its Tulu 2 13B SFT number where known


# Tulu 2.5 ("Unpacking DPO and PPO", Ivison et al. 2024), evaluated with open-instruct. Tulu 2 13B SFT in the
# paper: factuality (MMLU) 55.4, reasoning (GSM8k, BBH) 47.8, coding 45.1, truthfulness 56.6, safety 91.8,
# instruction following (AlpacaEval 1/2, IFEval) 44.2; average 56.8 (REFERENCE.md).
TULU25 = (
    SuiteTask(
        "gsm8k_cot",
        "exact_match,flexible-extract",
        num_fewshot=8,
        gen_kwargs="max_gen_toks=512",
        needs="openai/gsm8k (config main) in the HF datasets cache",
        paper="GSM8k 8-shot chain of thought, exact match of the last number; max 512 new tokens (verify)",
    ),
    SuiteTask(
        "mmlu",
        "acc,none",
        num_fewshot=0,
        needs="cais/mmlu (57 subjects) in the HF datasets cache",
        paper="MMLU 0-shot accuracy, averaged over subjects (lm-eval averages over questions: verify)",
    ),
    SuiteTask(
        "bbh_cot_fewshot",
        "exact_match,get-answer",
        num_fewshot=3,
        limit=40,
        gen_kwargs="max_gen_toks=512",
        needs="SaylorTwift/bbh (27 tasks) in the HF datasets cache",
        paper="BBH 3-shot chain of thought, exact match; 40 examples per task as open-instruct (verify)",
    ),
    SuiteTask(
        "truthfulqa_mc2",
        "acc,none",
        num_fewshot=0,
        chat=False,
        needs="truthfulqa/truthful_qa (multiple_choice) in the HF datasets cache",
        paper="TruthfulQA MC2 (the paper's truthfulness category; 56.6 for Tulu 2 13B SFT)",
    ),
    SuiteTask(
        "ifeval",
        "prompt_level_loose_acc,none",
        num_fewshot=0,
        needs="google/IFEval in the HF datasets cache; pip install langdetect immutabledict nltk",
        paper="IFEval prompt-level loose accuracy (verify: open-instruct reports loose)",
    ),
    SuiteTask(
        "alpaca_eval_rm",
        "win_rate,none",
        num_fewshot=0,
        needs="alpaca_eval.json (805 instructions + reference outputs) and a reward model (--judge DIR)",
        paper="AlpacaEval 1/2 win rate judged by GPT-4; here a reward model judges (see README); greedy "
        "answers of up to min(2048, max_length / 2) tokens",
    ),
    SuiteTask(
        "humaneval",
        "pass@1,create_test",
        num_fewshot=0,
        chat=False,
        optional=True,
        needs="openai/openai_humaneval in the HF datasets cache; HF_ALLOW_CODE_EVAL=1 (runs model code)",
        paper="Codex HumanEval pass@1 (the paper uses HumanEval+ and MBPP+: not in lm-eval's defaults)",
    ),
)

SUITES: dict[str, tuple[SuiteTask, ...]] = {"tulu25": TULU25}
_OWN_TASKS = {t.task: t for t in TULU25 if t.task == "alpaca_eval_rm"}


def expand(names: list[str], *, with_optional: bool = False) -> list[SuiteTask]:
    """Suite names replaced by their tasks (optional ones only with `with_optional`); other names kept as
    plain tasks with their own defaults. Order kept, duplicates dropped."""
    out: dict[str, SuiteTask] = {}
    for name in names:
        if name in SUITES:
            for t in SUITES[name]:
                if with_optional or not t.optional:
                    out.setdefault(t.task, t)
        elif (
            name in _OWN_TASKS
        ):  # jaxrl's own tasks have no lm-eval defaults: their suite settings are theirs
            out.setdefault(name, _OWN_TASKS[name])
        else:
            out.setdefault(name, SuiteTask(name, metric="", chat=False))
    return list(out.values())


def safe_name(task: str) -> str:
    """A task name as a file name (results land in <out>/tasks/<safe name>.json)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task)


def task_metrics(task: str, result: dict, metric: str = "") -> list[tuple[str, float, float | None]]:
    """(key, value, standard error) of each metric of a task's lm-eval results ("name,filter" keys), the
    suite's `metric` first, the rest by name."""
    row = result.get("groups", {}).get(task) or result.get("results", {}).get(task, {})
    keys = sorted(
        (k for k, v in row.items() if k != "alias" and "_stderr" not in k and isinstance(v, (int, float))),
        key=lambda k: (k != metric, k),
    )
    out = []
    for key in keys:
        name, _, filt = key.partition(",")
        stderr = row.get(f"{name}_stderr,{filt}")
        out.append((key, float(row[key]), float(stderr) if isinstance(stderr, (int, float)) else None))
    return out
