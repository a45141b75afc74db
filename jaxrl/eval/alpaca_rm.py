"""alpaca_eval_rm: an AlpacaEval-style win rate judged by a reward model, so a study runs end to end offline.

The model answers each AlpacaEval instruction (greedy, in its chat template); a reward model (a jaxrl `rm` run
or an HF *ForSequenceClassification checkpoint) scores that answer and the file's reference answer to the
same instruction; a win counts 1, a tie 1/2. This is NOT AlpacaEval: the paper's judge is GPT-4 (AlpacaEval 1
against text-davinci-003, AlpacaEval 2 against GPT-4 Turbo, length-controlled), and a reward model's
preferences, length bias included, are its own. Results are named `alpaca_eval_rm` so they are never mistaken
for AlpacaEval numbers. One process only (multi-host evaluation of this task is not supported).
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


def _judge_tokenizer(judge: Path):
    from jaxrl.eval import model as model_lib
    from jaxrl.models.hf import is_hf_dir

    if is_hf_dir(judge):
        tok = model_lib.tokenizer_from(judge)
    else:
        from jaxrl import config as config_lib

        tok = model_lib.run_tokenizer(
            judge, config_lib.from_dict(json.loads((judge / "config.json").read_text()))
        )
    if tok is None:
        raise ConfigError(f"judge {judge}: no tokenizer.json")
    return (
        tok.chat if hasattr(tok, "chat") else tok.tok
    )  # the chat tokenizer: encode_prompt / encode_completion


def judge_scores(
    judge: str | Path, mesh, preset: str, instructions: list[str], responses: list[str], batch_size: int = 16
) -> np.ndarray:
    """The reward model's score [N] of each (instruction, response), read at the response's last token."""
    from jaxrl import sampling, sharding
    from jaxrl.data.records import Message
    from jaxrl.models import init as model_init
    from jaxrl.rewards import score_responses

    judge = Path(judge)
    if not (judge / "config.json").is_file():
        raise FileNotFoundError(
            f"judge {judge}: not a reward-model run dir or HF checkpoint (no config.json)"
        )
    params, cfg = model_init.load_run_params(judge, mesh, preset)
    if cfg.head != "scalar":
        raise ConfigError(f"judge {judge} is not a reward model (no scalar head)")
    graphdef, _ = model_init.abstract_model(cfg)
    tok = _judge_tokenizer(judge)
    divisor = sharding.batch_divisor(mesh, preset)
    batch_size = -(-batch_size // divisor) * divisor
    placement = sharding.batch_sharding(mesh, preset)
    scores = []
    for start in range(0, len(instructions), batch_size):
        prompts, completions = [], []
        for instruction, response in zip(
            instructions[start : start + batch_size], responses[start : start + batch_size], strict=True
        ):
            prompts.append(tok.encode_prompt([Message("user", instruction)])[-MAX_PROMPT_TOKENS:])
            completions.append(tok.encode_completion([Message("assistant", response)])[:MAX_RESPONSE_TOKENS])
        n = len(prompts)
        prompts += [prompts[-1]] * (batch_size - n)
        completions += [completions[-1]] * (batch_size - n)
        ids, mask = sampling.left_pad(prompts, tok.pad_id)
        width = max(len(c) for c in completions)
        response = np.full((batch_size, width), tok.pad_id, np.int32)
        response_mask = np.zeros((batch_size, width), np.int32)
        for row, c in enumerate(completions):
            response[row, : len(c)], response_mask[row, : len(c)] = c, 1
        arrays = jax.device_put((ids, mask, response, response_mask), placement)
        with sharding.use_mesh(mesh, preset):
            scores.append(np.asarray(jax.device_get(score_responses(graphdef, params, *arrays)))[:n])
    return np.concatenate(scores) if scores else np.zeros((0,), np.float32)


def evaluate(
    lm,
    *,
    judge: str | None,
    data_file: str | None,
    limit: int | None = None,
    gen_kwargs: str | None = None,
    chat: bool = True,
) -> dict:
    """The win rate of `lm` (a JaxrlLM) against the file's reference answers, as an lm-eval-shaped result."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import simple_parse_args_string

    if not judge:
        raise ConfigError("alpaca_eval_rm needs --judge DIR (a reward-model run dir or HF reward checkpoint)")
    if not data_file:
        raise ConfigError(
            "alpaca_eval_rm needs --alpaca-file FILE (AlpacaEval instructions and reference outputs)"
        )
    if jax.process_count() > 1:
        raise ConfigError(
            "alpaca_eval_rm runs on one process; run it separately from a multi-host evaluation"
        )
    rows = read_alpaca(data_file, limit)
    kwargs = {"until": [], "do_sample": False, "max_gen_toks": min(MAX_NEW_TOKENS, lm.max_length // 2)}
    kwargs |= simple_parse_args_string(gen_kwargs or "")
    contexts = [
        lm.apply_chat_template([{"role": "user", "content": r["instruction"]}]) if chat else r["instruction"]
        for r in rows
    ]
    outputs = lm.generate_until(
        [
            Instance("generate_until", doc=r, arguments=(c, dict(kwargs)), idx=0)
            for r, c in zip(rows, contexts, strict=True)
        ]
    )
    instructions = [r["instruction"] for r in rows]
    policy = judge_scores(judge, lm.mesh, lm.mesh_preset, instructions, outputs)
    reference = judge_scores(judge, lm.mesh, lm.mesh_preset, instructions, [r["output"] for r in rows])
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
