"""Reward-model evaluation: RewardBench-style accuracy on a local preference file, and best-of-N on prompts.

`jaxrl eval-rm --model RM --data PREFS.jsonl --out DIR` scores every (prompt, chosen) and (prompt, rejected)
of a file in RewardBench's format (`prompt`, `chosen`, `rejected`, `subset`, optionally `id`; the prompt a
string or a list of chat messages) and reports accuracy (chosen scored strictly above rejected, as
RewardBench: a tie is wrong) per subset, per RewardBench section and overall. `--policy DIR --prompts FILE
--best-of N` samples N completions per prompt with jaxrl's sampler (through the "jaxrl" lm-eval backend, in
the policy's chat template), scores them with the RM and reports the mean RM score of the best sample against
the first one.

RM is a finished jaxrl run of the `rm` stage or an HF *ForSequenceClassification checkpoint directory (the
reward models jaxrl loads for RL, `jaxrl.rewards`). A pair is tokenised as jaxrl trains reward models
(`jaxrl.data.tokenize`): the prompt in the RM's chat template ending with its generation prompt, then the
assistant turn; the score is read at the completion's last token (its end-of-turn when it has one). Texts,
not token ids, cross from policy to RM, so the two may have different tokenizers. One process only.

The weighting follows RewardBench v1 (github.com/allenai/reward-bench): the subset -> section map and the
per-subset weights are `rewardbench/constants.py` (SUBSET_MAPPING, EXAMPLE_COUNTS); a section is the
EXAMPLE_COUNTS-weighted mean of its subsets' accuracies (`rewardbench/utils.py`,
calculate_scores_per_section), so math-prm (447 pairs) weighs 984, as much as the six HumanEvalPack languages
together, and Reasoning is half math, half code. "Prior Sets (0.5 weight)" is the plain mean of
anthropic_helpful, anthropic_hhh, shp and summarize (anthropic_harmless, mtbench_gpt4 and mtbench_human are
reported but not averaged), and the overall score weighs Chat, Chat Hard, Safety and Reasoning 2 each and
Prior Sets 1, over the sections present (`analysis/get_benchmark_results.py`, get_average_over_rewardbench).
A section with none of its subsets in the file is absent (RewardBench's helper reports 0); subsets RewardBench
does not know are reported alone. EXAMPLE_COUNTS are RewardBench's fixed weights, not the file's counts (its
xstest entries, 250 should-refuse and 154 should-respond, are the reverse of the filtered set's sizes; they
are kept as published, since the leaderboard's numbers use them).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxrl.config import ConfigError

# RewardBench v1, rewardbench/constants.py.
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,  # 447 pairs, weighted as the code subsets together
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250,
    "xstest-should-respond": 154,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
SUBSET_MAPPING = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
# allenai/pref-test-sets: all are reported; the leaderboard's "Prior Sets (0.5 weight)" averages PRIOR_SCORED.
PRIOR_SETS = (
    "anthropic_harmless",
    "anthropic_helpful",
    "anthropic_hhh",
    "mtbench_gpt4",
    "mtbench_human",
    "shp",
    "summarize",
)
PRIOR_SCORED = ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")
PRIOR_SECTION = "Prior Sets (0.5 weight)"
SECTION_WEIGHTS = {"Chat": 2, "Chat Hard": 2, "Safety": 2, "Reasoning": 2, PRIOR_SECTION: 1}

RESULTS_FILE = "rm_results.json"
SCORES_FILE = "rm_scores.jsonl"
BEST_OF_N_FILE = "best_of_n.samples.jsonl"
ROLES = ("system", "user", "assistant")


# Input files


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    id: str
    subset: str
    prompt: tuple  # of jaxrl.data.records.Message
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: tuple  # of Message


def _read_rows(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(row number from 1, object) of a JSONL file or a JSON list; one-line errors naming file and row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} {path}: not valid JSON ({e})") from e
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{what} {path} row {number}: not valid JSON ({e.msg})") from e
    if not rows:
        raise ConfigError(f"{what} {path}: no rows")
    for number, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"{what} {path} row {number}: a JSON object expected, got {type(row).__name__}")
    return rows


def _prompt(value: Any, where: str) -> tuple:
    """A prompt as messages: a string is one user turn; a list holds {"role", "content"} turns."""
    from jaxrl.data.records import Message

    if isinstance(value, str):
        return (Message("user", value),)
    if isinstance(value, list) and value:
        messages = []
        for k, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(
                    f"{where}, field 'prompt' turn {k}: needs a role ({', '.join(ROLES)}) and string content"
                )
            messages.append(Message(m["role"], m["content"]))
        if messages[-1].role == "assistant":
            raise ConfigError(f"{where}, field 'prompt': ends with an assistant turn")
        return tuple(messages)
    raise ConfigError(f"{where}, field 'prompt': a string or a non-empty list of chat messages expected")


def _field(row: dict, name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise ConfigError(f"{where}: missing field '{name}'")
    return row[name]


def read_preferences(path: str | Path, limit: int | None = None) -> list[PreferenceRow]:
    """Rows of a RewardBench-format file (JSONL or a JSON list): prompt, chosen, rejected, subset, id."""
    out = []
    for number, row in _read_rows(path, "preference data"):
        where = f"preference data {path} row {number}"
        prompt = _prompt(_field(row, "prompt", where), where)
        texts = {}
        for name in ("chosen", "rejected"):
            value = _field(row, name, where)
            if not isinstance(value, str):
                raise ConfigError(f"{where}, field '{name}': a string expected, got {type(value).__name__}")
            texts[name] = value
        subset = row.get("subset", "unlabelled")
        if not isinstance(subset, str) or not subset:
            raise ConfigError(f"{where}, field 'subset': a non-empty string expected")
        out.append(
            PreferenceRow(str(row.get("id", number)), subset, prompt, texts["chosen"], texts["rejected"])
        )
    return out[:limit] if limit else out


def read_prompts(path: str | Path, limit: int | None = None) -> list[PromptRow]:
    """Rows with `prompt` (a string or chat messages) and optionally `id` (JSONL or a JSON list)."""
    out = []
    for number, row in _read_rows(path, "prompt file"):
        where = f"prompt file {path} row {number}"
        out.append(PromptRow(str(row.get("id", number)), _prompt(_field(row, "prompt", where), where)))
    return out[:limit] if limit else out


# The reward model


def reward_tokenizer(source: Path):
    """The chat tokenizer (encode_prompt / encode_completion) of a reward-model run dir or HF checkpoint."""
    from jaxrl import config as config_lib
    from jaxrl.eval import model as model_lib
    from jaxrl.models.hf import is_hf_dir

    if is_hf_dir(source):
        tok = model_lib.tokenizer_from(source)
    else:
        run_cfg = config_lib.from_dict(json.loads((source / "config.json").read_text()))
        tok = model_lib.run_tokenizer(source, run_cfg)
    if tok is None:
        raise ConfigError(f"reward model {source}: no tokenizer.json")
    return tok.chat if hasattr(tok, "chat") else tok.tok


def check_reward_model_dir(source: str | Path) -> Path:
    """The directory of a finished `rm` run or an HF checkpoint, or a one-line error naming it."""
    from jaxrl import checkpoint
    from jaxrl.models.hf import is_hf_dir

    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"reward model {source}: no such directory")
    if not (source / "config.json").is_file():
        raise ConfigError(
            f"reward model {source} is neither a jaxrl run directory nor an HF checkpoint (no config.json)"
        )
    if not is_hf_dir(source) and not checkpoint.final_params_dir(source).exists():
        raise ConfigError(f"reward model {source}: the run has not finished (no final/params)")
    return source


def _bounded(tok, messages, keep: int, what: str) -> list[int]:
    """A prompt's last `keep` ids or a completion's first `keep`, tokenising only what can be kept when the
    tokenizer can (as jaxrl.data.tokenize does for training)."""
    bounded = getattr(tok, f"encode_{what}_bounded", None)
    ids = bounded(messages, keep)[0] if bounded is not None else getattr(tok, f"encode_{what}")(messages)
    return list(ids[-keep:] if what == "prompt" else ids[:keep])


class RewardScorer:
    """A reward model loaded once and placed on a mesh, scoring (prompt messages, response text) in batches of
    similar length (widths in multiples of `bucket`: one compile per width).

    Truncation as the `rm` stage's "truncate" policy: the prompt keeps its last `max_prompt_len` tokens, the
    completion its first `max_len` - prompt tokens (it then loses its end-of-turn token)."""

    def __init__(
        self,
        source: str | Path,
        *,
        mesh=None,
        preset: str = "fsdp",
        dtype: str | None = None,
        batch_size: int = 16,
        max_len: int = 4096,
        max_prompt_len: int = 2048,
        bucket: int = 64,
    ):
        from jaxrl import sharding
        from jaxrl.config import MeshConfig
        from jaxrl.models import init as model_init

        self.source = check_reward_model_dir(source)
        if max_prompt_len >= max_len:
            raise ConfigError(f"max_prompt_len {max_prompt_len} leaves no room for a response in {max_len}")
        self.mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig(preset=preset))
        self.preset = preset
        params, cfg = model_init.load_run_params(self.source, self.mesh, preset)
        if cfg.head != "scalar":
            raise ConfigError(f"reward model {self.source} is not a reward model (no scalar head)")
        if dtype:
            cfg = dataclasses.replace(cfg, dtype=dtype)
        self.params, self.config = params, dataclasses.replace(cfg, remat="none")
        self.graphdef, _ = model_init.abstract_model(self.config)
        self.tok = reward_tokenizer(self.source)
        divisor = sharding.batch_divisor(self.mesh, preset)
        self.batch_size = -(-max(1, batch_size) // divisor) * divisor
        self.placement = sharding.batch_sharding(self.mesh, preset)
        self.max_len, self.max_prompt_len, self.bucket = int(max_len), int(max_prompt_len), int(bucket)

    def encode(self, prompt, response: str) -> tuple[list[int], list[int], bool]:
        """(prompt ids, completion ids, truncated) as the RM reads them."""
        from jaxrl.data.records import Message

        prompt_ids = _bounded(self.tok, list(prompt), self.max_prompt_len + 1, "prompt")
        cut = len(prompt_ids) > self.max_prompt_len
        prompt_ids = prompt_ids[-self.max_prompt_len :]
        keep = self.max_len - len(prompt_ids)
        completion = _bounded(self.tok, [Message("assistant", response)], keep + 1, "completion")
        return prompt_ids, completion[:keep], cut or len(completion) > keep

    def score(self, prompts: list, responses: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(scores [N] float32, truncated [N] bool) of each (prompt messages, response text)."""
        import jax

        from jaxrl import sampling, sharding
        from jaxrl.data.pipeline import bucket_width
        from jaxrl.rewards import score_responses

        if jax.process_count() > 1:
            raise ConfigError("reward-model evaluation runs on one process")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        n = len(encoded)
        scores, truncated = np.zeros(n, np.float32), np.asarray([e[2] for e in encoded], bool)
        prompt_len = np.asarray([len(e[0]) for e in encoded], np.int64)
        completion_len = np.asarray([max(1, len(e[1])) for e in encoded], np.int64)
        order = np.argsort(-(prompt_len + completion_len), kind="stable")
        B, pad = self.batch_size, self.tok.pad_id
        pending = []
        for start in range(0, n, B):
            chunk = order[start : start + B]
            P = bucket_width(prompt_len, chunk, self.bucket, self.max_prompt_len)
            N = bucket_width(completion_len, chunk, self.bucket, self.max_len)
            rows = [encoded[i] for i in chunk] + [encoded[chunk[-1]]] * (B - len(chunk))  # filler, dropped
            ids, mask = sampling.left_pad([r[0] for r in rows], pad, width=P)
            response = np.full((B, N), pad, np.int32)
            response_mask = np.zeros((B, N), np.int32)
            for row, (_, completion, _) in enumerate(rows):
                response[row, : len(completion)], response_mask[row, : len(completion)] = completion, 1
            arrays = jax.device_put((ids, mask, response, response_mask), self.placement)
            with sharding.use_mesh(self.mesh, self.preset):
                pending.append((chunk, score_responses(self.graphdef, self.params, *arrays)))
        for chunk, out in pending:
            scores[chunk] = np.asarray(jax.device_get(out), np.float32)[: len(chunk)]
        return scores, truncated


# Accuracy on preference data


def section_scores(subset_accuracy: dict[str, float]) -> dict[str, float]:
    """RewardBench's sections (EXAMPLE_COUNTS-weighted means of the subsets present), Prior Sets (the mean of
    PRIOR_SCORED present) and the overall score (sections weighted 2, 2, 2, 2, 1 over those present)."""
    sections: dict[str, float] = {}
    for section, subsets in SUBSET_MAPPING.items():
        present = [s for s in subsets if s in subset_accuracy]
        if present:
            weights = [EXAMPLE_COUNTS[s] for s in present]
            sections[section] = float(np.average([subset_accuracy[s] for s in present], weights=weights))
    prior = [subset_accuracy[s] for s in PRIOR_SCORED if s in subset_accuracy]
    if prior:
        sections[PRIOR_SECTION] = float(np.mean(prior))
    if sections:
        weights = [SECTION_WEIGHTS[s] for s in sections]
        sections["Score"] = float(np.average(list(sections.values()), weights=weights))
    return sections


def preference_report(rows: list[PreferenceRow], chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """Per-subset accuracy (chosen > rejected strictly), pair counts, ties and score statistics; sections."""
    correct = chosen > rejected
    subsets: dict[str, dict] = {}
    names = [r.subset for r in rows]
    for name in sorted(set(names)):
        idx = np.asarray([s == name for s in names])
        margin = chosen[idx] - rejected[idx]
        subsets[name] = {
            "accuracy": float(correct[idx].mean()),
            "n": int(idx.sum()),
            "ties": int((margin == 0).sum()),
            "mean_margin": float(margin.mean()),
            "mean_chosen": float(chosen[idx].mean()),
            "mean_rejected": float(rejected[idx].mean()),
        }
    known = set(EXAMPLE_COUNTS) | set(PRIOR_SETS)
    return {
        "n": len(rows),
        "accuracy": float(correct.mean()) if len(rows) else float("nan"),
        "subsets": subsets,
        "sections": section_scores({k: v["accuracy"] for k, v in subsets.items()}),
        "unmapped_subsets": sorted(set(names) - known),
    }


def evaluate_preferences(scorer: RewardScorer, rows: list[PreferenceRow]) -> tuple[dict, list[dict]]:
    """(report, per-row scores) of a reward model on preference rows."""
    prompts = [r.prompt for r in rows]
    scores, truncated = scorer.score(prompts + prompts, [r.chosen for r in rows] + [r.rejected for r in rows])
    chosen, rejected = scores[: len(rows)], scores[len(rows) :]
    report = preference_report(rows, chosen, rejected)
    cut = truncated[: len(rows)] | truncated[len(rows) :]
    report["truncated_pairs"] = int(cut.sum())
    per_row = [
        {
            "id": r.id,
            "subset": r.subset,
            "chosen_score": float(c),
            "rejected_score": float(x),
            "correct": bool(c > x),
            "truncated": bool(t),
        }
        for r, c, x, t in zip(rows, chosen, rejected, cut, strict=True)
    ]
    return report, per_row


# Best-of-N


def best_of_n_report(scores_PN: np.ndarray) -> dict:
    """Mean RM score of each prompt's best sample against its first (and all samples), with the standard error
    of the gain, and the expected best of k (unbiased, k = 1, 2, 4, ... <= N)."""
    from jaxrl.evaluate import expected_best_of

    P, N = scores_PN.shape
    best, first = scores_PN.max(axis=1), scores_PN[:, 0]
    gain = best - first
    ks = [k for k in (2**i for i in range(int(math.log2(N)) + 1)) if k <= N]
    return {
        "n": int(N),
        "prompts": int(P),
        "best": float(best.mean()),
        "first": float(first.mean()),
        "mean": float(scores_PN.mean()),
        "gain": float(gain.mean()),
        "gain_se": float(gain.std(ddof=1) / math.sqrt(P)) if P > 1 else float("nan"),
        "expected_best_of": {str(k): float(expected_best_of(scores_PN, k).mean()) for k in ks},
    }


def sample_completions(
    policy: str | Path,
    prompts: list[PromptRow],
    n: int,
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    policy_args: dict | None = None,
) -> list[list[str]]:
    """n sampled completions [P][n] of each prompt, in the policy's chat template, by jaxrl's sampler."""
    from lm_eval.api.instance import Instance

    from jaxrl.eval.backend import JaxrlLM
    from jaxrl.eval.model import check_model_dir

    if n < 1:
        raise ConfigError(f"--best-of {n}: at least 1 sample per prompt")
    if temperature <= 0:
        raise ConfigError(f"--temperature {temperature}: best-of-N samples need a temperature > 0")
    check_model_dir(policy)
    lm = JaxrlLM(pretrained=str(policy), seed=seed, **(policy_args or {}))
    kwargs = {
        "until": [],
        "do_sample": True,
        "temperature": float(temperature),
        "max_gen_toks": max_new_tokens,
    }
    contexts = [
        lm.apply_chat_template([{"role": m.role, "content": m.content} for m in p.prompt]) for p in prompts
    ]
    requests = [
        Instance("generate_until", doc={}, arguments=(c, dict(kwargs)), idx=k)
        for c in contexts
        for k in range(n)
    ]
    texts = lm.generate_until(requests, disable_tqdm=True)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


# The command


def _write_json(path: Path, data) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def summary_lines(results: dict) -> list[str]:
    """One line per RewardBench section present (then Score), per subset no section holds, for best-of-N."""
    lines = []
    prefs = results.get("preferences")
    if prefs:
        subsets = prefs["subsets"]
        groups = dict(SUBSET_MAPPING) | {PRIOR_SECTION: list(PRIOR_SCORED)}
        for section, value in prefs["sections"].items():
            if section == "Score":
                continue
            present = [s for s in groups[section] if s in subsets]
            pairs = sum(subsets[s]["n"] for s in present)
            plural = "s" if len(present) > 1 else ""
            lines.append(f"{section}: {value:.4f} ({len(present)} subset{plural}, {pairs} pairs)")
        if "Score" in prefs["sections"]:
            lines.append(f"Score: {prefs['sections']['Score']:.4f} (RewardBench weighting)")
        in_sections = {s for v in groups.values() for s in v}
        for name, row in subsets.items():
            if name not in in_sections:
                note = "; a prior set RewardBench does not average" if name in PRIOR_SETS else ""
                lines.append(f"subset {name}: {row['accuracy']:.4f} ({row['n']} pairs{note})")
        lines.append(
            f"all pairs: {prefs['accuracy']:.4f} ({prefs['n']} pairs, {prefs['truncated_pairs']} truncated)"
        )
    bon = results.get("best_of_n")
    if bon:
        lines.append(
            f"best-of-{bon['n']}: best {bon['best']:.4f} vs first {bon['first']:.4f} "
            f"(gain {bon['gain']:+.4f} ± {bon['gain_se']:.4f}; mean {bon['mean']:.4f}; "
            f"{bon['prompts']} prompts)"
        )
    return lines


def run(
    model: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    policy: str | Path | None = None,
    prompts: str | Path | None = None,
    best_of: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 256,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 16,
    max_len: int = 4096,
    max_prompt_len: int = 2048,
    dtype: str | None = None,
    mesh: dict | None = None,
    policy_args: dict | None = None,
    log=print,
) -> dict:
    """Accuracy on `data` and/or best-of-N of `policy` on `prompts`, judged by the reward model `model`;
    writes <out>/rm_results.json (+ per-row scores and samples) and logs summary_lines."""
    from jaxrl import sharding
    from jaxrl.config import MeshConfig

    if data is None and policy is None:
        raise ConfigError("eval-rm needs --data FILE (preference accuracy) or --policy DIR --prompts FILE")
    if (policy is None) != (prompts is None):
        raise ConfigError("best-of-N needs both --policy DIR and --prompts FILE")
    # Inputs are read and checked before any model is loaded: a bad row fails in a second, not after loading.
    pref_rows = read_preferences(data, limit) if data is not None else None
    prompt_rows = read_prompts(prompts, limit) if prompts is not None else None
    mesh_cfg = MeshConfig(**(mesh or {}))
    check_reward_model_dir(model)
    scorer = RewardScorer(
        model,
        mesh=sharding.make_mesh(mesh_cfg),
        preset=mesh_cfg.preset,
        dtype=dtype,
        batch_size=batch_size,
        max_len=max_len,
        max_prompt_len=max_prompt_len,
    )
    out = Path(out)
    results: dict = {"model": str(model)}
    if pref_rows is not None:
        report, per_row = evaluate_preferences(scorer, pref_rows)
        results["preferences"] = {"data": str(data), **report}
        _write_jsonl(out / SCORES_FILE, per_row)
    if prompt_rows is not None:
        samples = sample_completions(
            policy,
            prompt_rows,
            best_of,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            policy_args={"mesh_preset": mesh_cfg.preset, **(policy_args or {})},
        )
        flat_prompts = [p.prompt for p in prompt_rows for _ in range(best_of)]
        flat_texts = [t for texts in samples for t in texts]
        scores, _ = scorer.score(flat_prompts, flat_texts)
        scores_PN = scores.reshape(len(prompt_rows), best_of)
        results["best_of_n"] = {
            "policy": str(policy),
            "prompts_file": str(prompts),
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            **best_of_n_report(scores_PN),
            "mean_length_chars": float(np.mean([len(t) for t in flat_texts])),
        }
        _write_jsonl(
            out / BEST_OF_N_FILE,
            [
                {
                    "id": p.id,
                    "samples": texts,
                    "scores": [float(s) for s in row],
                    "best": int(np.argmax(row)),
                }
                for p, texts, row in zip(prompt_rows, samples, scores_PN, strict=True)
            ],
        )
    _write_json(out / RESULTS_FILE, results)
    for line in summary_lines(results):
        log(line)
    log(f"results: {out / RESULTS_FILE}")
    return results
