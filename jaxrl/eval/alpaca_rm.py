"""alpaca_eval_rm: an AlpacaEval-style win rate judged by a reward model, so a study runs end to end offline.

The model answers each AlpacaEval instruction (greedy, in its chat template); a reward model (a jaxrl `rm` run
or an HF *ForSequenceClassification checkpoint) scores that answer and the file's reference answer to the
same instruction; a win counts 1, a tie 1/2. This is NOT AlpacaEval: the paper's judge is GPT-4 (AlpacaEval 1
against text-davinci-003, AlpacaEval 2 against GPT-4 Turbo, length-controlled), and a reward model's
preferences, length bias included, are its own. Results are named `alpaca_eval_rm` so they are never mistaken
for AlpacaEval numbers. On several processes each generates its share of the answers, the answers are
gathered, and the judge scores them all on the mesh; process 0 returns the result (the others None, as
lm-eval's own tasks do).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxrl.config import ConfigError

TASK = "alpaca_eval_rm"
MAX_PROMPT_TOKENS = 2048
MAX_RESPONSE_TOKENS = 2048
MAX_NEW_TOKENS = (
    2048  # answers are cut at min(this, max_length / 2) tokens unless gen_kwargs set max_gen_toks
)


def read_alpaca(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows with `instruction` and `output` (the reference answer) from AlpacaEval's JSON list or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"alpaca_eval_rm data {path}: no such file")
    text = path.read_text()
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(l) for l in text.splitlines() if l.strip()]
        )
    except json.JSONDecodeError as e:
        raise ConfigError(f"alpaca_eval_rm data {path}: not JSON or JSONL ({e})") from e
    for i, row in enumerate(rows):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("instruction"), str)
            or not isinstance(row.get("output"), str)
        ):
            raise ConfigError(
                f"alpaca_eval_rm data {path}: row {i} needs string fields instruction and output"
            )
    return rows[:limit] if limit else rows


def judge_scores(
    judge: str | Path, mesh, preset: str, instructions: list[str], responses: list[str], batch_size: int = 16
) -> np.ndarray:
    """The reward model's score [N] of each (instruction, response), read at the response's last token."""
    from jaxrl.data.records import Message
    from jaxrl.eval.rm_scorer import RewardScorer

    scorer = RewardScorer(
        judge,
        mesh=mesh,
        preset=preset,
        batch_size=batch_size,
        max_len=MAX_PROMPT_TOKENS + MAX_RESPONSE_TOKENS,
        max_prompt_len=MAX_PROMPT_TOKENS,
    )
    return scorer.score([(Message("user", i),) for i in instructions], list(responses))[0]


def evaluate(
    lm,
    *,
    judge: str | None,
    data_file: str | None,
    limit: int | None = None,
    gen_kwargs: str | None = None,
    chat: bool = True,
) -> dict | None:
    """The win rate of `lm` (a JaxrlLM) against the file's reference answers, as an lm-eval-shaped result
    (on process 0; None on the others)."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import simple_parse_args_string

    if not judge:
        raise ConfigError("alpaca_eval_rm needs --judge DIR (a reward-model run dir or HF reward checkpoint)")
    if not data_file:
        raise ConfigError(
            "alpaca_eval_rm needs --alpaca-file FILE (AlpacaEval instructions and reference outputs)"
        )
    from jaxrl.eval.backend import allgather_objects
    from jaxrl.eval.rm_scorer import check_reward_model_dir

    check_reward_model_dir(judge)  # before generating: a wrong judge fails at once
    rows = read_alpaca(data_file, limit)
    kwargs = {"until": [], "do_sample": False, "max_gen_toks": min(MAX_NEW_TOKENS, lm.max_length // 2)}
    kwargs |= simple_parse_args_string(gen_kwargs or "")
    contexts = [
        lm.apply_chat_template([{"role": "user", "content": r["instruction"]}]) if chat else r["instruction"]
        for r in rows
    ]
    # Each process answers its share (rows rank, rank + world, ...); every process then holds every answer.
    mine = list(range(jax.process_index(), len(rows), jax.process_count()))
    answers = lm.generate_until(
        [Instance("generate_until", doc=rows[i], arguments=(contexts[i], dict(kwargs)), idx=0) for i in mine]
    )
    outputs: list[str] = [""] * len(rows)
    for share in allgather_objects(list(zip(mine, answers, strict=True))):
        for i, text in share:
            outputs[i] = text
    instructions = [r["instruction"] for r in rows]
    both = judge_scores(
        judge, lm.mesh, lm.mesh_preset, instructions + instructions, outputs + [r["output"] for r in rows]
    )
    if jax.process_index() != 0:
        return None
    policy, reference = both[: len(rows)], both[len(rows) :]
    wins = (policy > reference) + 0.5 * (policy == reference)
    n = len(rows)
    metrics = {
        "alias": TASK,
        "win_rate,none": float(wins.mean()) if n else float("nan"),
        "win_rate_stderr,none": float(wins.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "mean_reward,none": float(policy.mean()) if n else float("nan"),
        "reference_mean_reward,none": float(reference.mean()) if n else float("nan"),
        "length_chars,none": float(np.mean([len(o) for o in outputs])) if n else float("nan"),
        "reference_length_chars,none": float(np.mean([len(r["output"]) for r in rows]))
        if n
        else float("nan"),
    }
    return {
        "results": {TASK: metrics},
        "n-samples": {TASK: {"original": n, "effective": n}},
        "configs": {
            TASK: {
                "judge": str(judge),
                "data_file": str(data_file),
                "generation_kwargs": kwargs,
                "chat_template": chat,
            }
        },
        "versions": {TASK: 1},
        "n-shot": {TASK: 0},
        "samples": {
            TASK: [
                {
                    "instruction": r["instruction"],
                    "output": o,
                    "reference": r["output"],
                    "reward": float(p),
                    "reference_reward": float(q),
                }
                for r, o, p, q in zip(rows, outputs, policy, reference, strict=True)
            ]
        },
    }
