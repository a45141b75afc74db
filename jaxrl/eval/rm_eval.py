"""Reward-model evaluation: RewardBench-style accuracy on a local preference file, and best-of-N on prompts.

`jaxrl eval-rm --model RM --data PREFS.jsonl --out DIR` scores every (prompt, chosen) and (prompt, rejected)
of a file in RewardBench's format (`prompt`, `chosen`, `rejected`, `subset`, optionally `id`; the prompt a
string or a list of chat messages) and reports accuracy (chosen scored strictly above rejected, as
RewardBench: a tie is wrong) per subset, per RewardBench section and overall. `--policy DIR --prompts FILE
--best-of N` samples N completions per prompt with jaxrl's sampler (through the "jaxrl" lm-eval backend, in
the policy's chat template), scores them with the RM and reports the mean RM score of the best sample against
the first one.

The files are read by `jaxrl.eval.rm_data`, the RM scores them through `jaxrl.eval.rm_scorer` (which says
how a pair is tokenised) and `jaxrl.eval.rewardbench` weighs the accuracies as RewardBench v1 does. Texts, not
token ids, cross from policy to RM, so the two may have different tokenizers.

Multi-host (joined by `jaxrl.distributed`, as `jaxrl train` is): every process reads the same files and scores
every pair through one sharded forward, feeding the rows its devices hold; best-of-N prompts are shared out
among the processes for sampling and the samples gathered, so every process scores them all. Every process
gets every score; process 0 alone writes the files and logs the summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxrl.config import ConfigError
from jaxrl.eval.rewardbench import PRIOR_SCORED, PRIOR_SECTION, PRIOR_SETS, SUBSET_MAPPING, preference_report
from jaxrl.eval.rm_data import PreferenceRow, PromptRow, read_preferences, read_prompts
from jaxrl.eval.rm_scorer import RewardScorer, check_reward_model_dir

RESULTS_FILE = "rm_results.json"
SCORES_FILE = "rm_scores.jsonl"
BEST_OF_N_FILE = "best_of_n.samples.jsonl"


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
    """n sampled completions [P][n] of each prompt, in the policy's chat template, by jaxrl's sampler; with
    several processes each samples a contiguous share of the prompts and every process gets all samples."""
    import jax
    from lm_eval.api.instance import Instance

    from jaxrl.eval.backend import JaxrlLM, allgather_objects
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
    rank, world = jax.process_index(), jax.process_count()
    share = prompts[rank * len(prompts) // world : (rank + 1) * len(prompts) // world]
    contexts = [
        lm.apply_chat_template([{"role": m.role, "content": m.content} for m in p.prompt]) for p in share
    ]
    requests = [
        Instance("generate_until", doc={}, arguments=(c, dict(kwargs)), idx=k)
        for c in contexts
        for k in range(n)
    ]
    # Every process runs generate_until, even on an empty share: its batches are collective calls.
    texts = lm.generate_until(requests, disable_tqdm=True)
    mine = [texts[i * n : (i + 1) * n] for i in range(len(share))]
    return [samples for shares in allgather_objects(mine) for samples in shares]


def _write_json(path: Path, data) -> None:
    from jaxrl import files

    path.parent.mkdir(parents=True, exist_ok=True)
    with files.replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True) + "\n")


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
    writes <out>/rm_results.json (+ per-row scores and samples) and logs summary_lines, from process 0 only;
    every process returns the results."""
    from jaxrl import distributed, sharding
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
    distributed.initialize()  # joins the other processes of a multi-host job; a no-op for one process
    primary, log = distributed.is_primary(), distributed.primary_log(log)
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
        if primary:
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
        if primary:
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
    if primary:
        _write_json(out / RESULTS_FILE, results)
    for line in summary_lines(results):
        log(line)
    log(f"results: {out / RESULTS_FILE}")
    return results
