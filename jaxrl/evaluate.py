"""Evaluation in the synthetic world: the mean gold reward of sampled responses (several per prompt) with its
standard error, greedy gold beside it, KL to the reference from the same samples, response length, best-of-N
ceilings, and the policy's ranking accuracy on held-out gold-labelled pairs.

Every domain counts equally: a metric is the mean over domains of the mean over that domain's prompts, and its
standard error is sqrt(sum_d var_d / n_d) / D over per-prompt means (which already average the samples). Every
run of a study scores the same prompts with the same sampling keys, so differences between runs can be paired
prompt by prompt (`paired_difference`)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl import sampling


def _placement(params):
    """Where the evaluation puts its host arrays: replicated over the devices of `params` (what jit would do
    with them, done explicitly so that no hidden copy happens), else where `params` live (None: the default
    device, for host parameters)."""
    leaf_sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(leaf_sharding, NamedSharding):
        return NamedSharding(leaf_sharding.mesh, PartitionSpec())
    return leaf_sharding


@jax.jit
def _fold_key(seed_and_data):
    """fold_in(PRNGKey(seed), data) of a device pair [2] int32 (built on device: no host-made key)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed_and_data[0]), seed_and_data[1])


def _generate(
    graphdef, params, tok, prompts, *, temperature: float, max_new: int, seed: int, batch_size: int
):
    """Responses (token ids, per-token log-probs, masks) for every prompt record, in batches."""
    out = []
    placement = _placement(params)
    temperature_d = jax.device_put(np.float32(temperature), placement)
    batch_size = min(batch_size, len(prompts))
    width = max(len(tok.encode_prompt(r.prompt)) for r in prompts)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        # Every batch has the same shape (the last one is filled with repeats, dropped below): one compile.
        encoded = [tok.encode_prompt(r.prompt) for r in chunk]
        encoded += [encoded[-1]] * (batch_size - len(chunk))
        ids, mask = sampling.left_pad(encoded, tok.pad_id, width=width)
        key = _fold_key(jax.device_put(np.asarray([seed, start], np.int32), placement))
        tokens, logps, resp_mask = jax.device_get(
            sampling.sample(
                graphdef,
                params,
                *jax.device_put((ids, mask), placement),
                key,
                temperature_d,
                max_new=max_new,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
            )
        )
        out.append((ids, mask, np.asarray(tokens), np.asarray(logps), np.asarray(resp_mask), len(chunk)))
    return out


def sample_texts(
    graphdef, params, tok, prompts, *, temperature: float, max_new: int, seed: int, batch_size: int = 256
) -> list[str]:
    """One sampled response text per prompt record."""
    texts = []
    for _, _, tokens, _, resp_mask, n in _generate(
        graphdef,
        params,
        tok,
        prompts,
        temperature=temperature,
        max_new=max_new,
        seed=seed,
        batch_size=batch_size,
    ):
        texts += [tok.decode(tokens[row, : int(resp_mask[row].sum())].tolist()) for row in range(n)]
    return texts


def score_samples(
    graphdef,
    params,
    ref_params,
    tok,
    prompts,
    *,
    samples: int,
    temperature: float,
    max_new: int,
    seed: int = 0,
    batch_size: int = 256,
    reward_model=None,
    record: list | None = None,
) -> dict[str, np.ndarray]:
    """Per prompt and sample [P, S]: gold reward, log-ratio to the reference (teacher-forced on both sides
    under the distributions sampled from, both at `temperature`, so its mean is KL(policy_T || reference_T)
    per response; zeros without a reference), length in tokens and whether the response ended with EOS; with
    `reward_model` (graphdef, params) of a scalar-head model, its score of each response as "rm". `record`:
    a list that gets each batch's (prompt ids, prompt mask, response tokens, response mask, rows used)."""
    from jaxrl.synthetic import gold_reward

    expanded = [record for record in prompts for _ in range(samples)]
    placement = _placement(params)
    logp_temperature = jax.device_put(np.float32(temperature or 1.0), placement)
    gold, kl, length, eos, rm = [], [], [], [], []
    index = 0
    for ids, mask, tokens, _, resp_mask, n in _generate(
        graphdef,
        params,
        tok,
        expanded,
        temperature=temperature,
        max_new=max_new,
        seed=seed,
        batch_size=batch_size,
    ):
        if record is not None:
            record.append((ids, mask, tokens, resp_mask, n))
        if ref_params is not None:
            arrays = jax.device_put((ids, mask, tokens, resp_mask), placement)
            policy, ref = (
                np.asarray(
                    jax.device_get(
                        sampling.response_logps(graphdef, p, *arrays, temperature=logp_temperature)
                    )
                )
                for p in (params, ref_params)
            )
            kl += list(np.sum((policy - ref) * resp_mask, axis=1)[:n])
        else:
            kl += [0.0] * n
        if reward_model is not None:
            rm += list(_rm_scores(reward_model, ids, mask, tokens, resp_mask)[:n])
        for row in range(n):
            size = int(resp_mask[row].sum())
            gold.append(gold_reward(expanded[index], tok.decode(tokens[row, :size].tolist())))
            length.append(size)
            eos.append(bool(size and tokens[row, size - 1] == tok.eos_id))
            index += 1
    shape = (len(prompts), samples)
    out = {
        "gold": np.reshape(gold, shape),
        "kl": np.reshape(kl, shape),
        "length": np.reshape(length, shape),
        "eos": np.reshape(eos, shape).astype(np.float64),
    }
    if reward_model is not None:
        out["rm"] = np.reshape(rm, shape)
    return out


def _rm_scores(reward_model, ids, mask, tokens, resp_mask) -> np.ndarray:
    """A reward model's (graphdef, params) scores of one batch of responses [B]."""
    from jaxrl.rewards import score_responses

    rm_graphdef, rm_params = reward_model
    arrays = jax.device_put((ids, mask, tokens, resp_mask), _placement(rm_params))
    return np.asarray(jax.device_get(_score_jit(rm_graphdef, score_responses)(rm_params, *arrays)))


@functools.lru_cache(maxsize=8)
def _score_jit(graphdef, score_fn):
    """One jitted reward-model scorer per model (graphdef): built once, not per batch."""
    return jax.jit(functools.partial(score_fn, graphdef))


def domain_mean(values_P: np.ndarray, domains: list[str]) -> tuple[float, float]:
    """(mean over domains of the per-domain mean, its standard error) of per-prompt values."""
    values_P = np.asarray(values_P, np.float64)
    names = sorted(set(domains))
    groups = [values_P[[d == name for d in domains]] for name in names]
    mean = float(np.mean([g.mean() for g in groups]))
    variance = sum(g.var(ddof=1) / len(g) if len(g) > 1 else 0.0 for g in groups) / len(groups) ** 2
    return mean, math.sqrt(variance)


def expected_best_of(gold_PS: np.ndarray, n: int, by_PS: np.ndarray | None = None) -> np.ndarray:
    """Per prompt, the expected gold of the best of n responses drawn without replacement from the S sampled
    (the unbiased order-statistics estimator of best-of-n) [P]; "best" by gold, or with `by_PS` by that score
    (a reward model's: best-of-n against a proxy, whose gold is what the proxy's pick is worth)."""
    S = gold_PS.shape[1]
    ranks = np.arange(1, S + 1)
    # P(the i-th smallest of S is the max of a random n-subset) = C(i-1, n-1) / C(S, n).
    weights = np.array([math.comb(i - 1, n - 1) for i in ranks], np.float64) / math.comb(S, n)
    if by_PS is None:
        return np.sort(gold_PS, axis=1) @ weights
    order_PS = np.argsort(by_PS, axis=1, kind="stable")
    return np.take_along_axis(gold_PS, order_PS, axis=1) @ weights


def sample_ranking_accuracy(gold_PS: np.ndarray, by_PS: np.ndarray) -> float:
    """The fraction of same-prompt sample pairs with different gold that `by` (a reward model's scores) orders
    as gold does: the proxy's accuracy on the policy's own samples."""
    agree = total = 0
    for gold_S, by_S in zip(gold_PS, by_PS, strict=True):
        dg = gold_S[:, None] - gold_S[None, :]
        db = by_S[:, None] - by_S[None, :]
        untied = np.abs(dg) > 1e-9
        agree += int(np.sum(untied & (np.sign(dg) == np.sign(db))))
        total += int(np.sum(untied))
    return agree / total if total else float("nan")


def proxy_best_of(
    cfg, policy, rm_graphdef, rm_params, tok, *, split: str = "test", draws=None
) -> dict[str, float]:
    """A reward model judged by the use a study makes of it: best-of-N on the policy's samples of a split
    picked by the RM, scored by gold (proxy_best_of_<n>, beside the policy's gold best-of-N ceilings: the same
    draws, the SFT base's seed), and the RM's accuracy on those samples' pairs. N runs to data.eval_best_of.
    `policy`: a function returning the policy's (graphdef, params), called only if the draws are sampled;
    `draws`: the policy run's stored draws of the split (`draws_path`), scored instead of sampled again when
    they are these draws."""
    prompts = eval_prompts(cfg, split)
    domains = [r.source for r in prompts]
    many, ns = best_of_draws(cfg, policy, tok, prompts, (rm_graphdef, rm_params), load=draws)
    metrics = {"sample_ranking_accuracy": sample_ranking_accuracy(many["gold"], many["rm"])}
    for n in ns:
        metrics[f"proxy_best_of_{n}"], metrics[f"proxy_best_of_{n}_se"] = domain_mean(
            expected_best_of(many["gold"], n, by_PS=many["rm"]), domains
        )
        metrics[f"best_of_{n}"] = domain_mean(expected_best_of(many["gold"], n), domains)[0]
    return metrics


DRAWS_FILE = "best_of_draws.npz"  # an SFT base's test-split best-of-N draws, in its final/ dir


def draws_path(run_dir, split: str = "test"):
    """Where a run stores its best-of-N draws of a split (an SFT base's, for the reward models trained from
    it): DRAWS_FILE for test, best_of_draws_<split>.npz otherwise, in the run's final/ dir."""
    from pathlib import Path

    name = DRAWS_FILE if split == "test" else f"best_of_draws_{split}.npz"
    return Path(run_dir).absolute() / "final" / name


_DRAWS_SEED = 1


def _draws_key(cfg, tok, prompts) -> str:
    """What makes two runs' best-of-N draws the same draws (given the same policy parameters)."""
    d = cfg.data
    spec = {
        "prompts": hashlib.sha256(repr(list(prompts)).encode()).hexdigest(),  # the records gold reads
        "samples": d.eval_best_of,
        "temperature": d.eval_temperature,
        "max_new": d.eval_max_new,
        "seed": _DRAWS_SEED,
        "tokenizer": [type(tok).__name__, tok.vocab_size, tok.pad_id, tok.eos_id],
    }
    return json.dumps(spec, sort_keys=True)


def best_of_draws(
    cfg, policy, tok, prompts, reward_model=None, *, save=None, load=None
) -> tuple[dict, tuple[int, ...]]:
    """data.eval_best_of samples per prompt for the best-of-N curves (score_samples' arrays) and the N that
    fit in them. Drawn with their own seed, apart from the primary samples (which stay the same draws for
    every run), and the same for a base's gold ceilings and a reward model's proxy curve on that base.

    `save`: a file to store the draws in (an SFT base's, for the reward models trained from it); `load`: such
    a file, whose responses are scored (gold as stored, `reward_model` on the stored tokens, batch by batch
    as drawn) instead of sampling the policy again, when it holds these draws (same prompts and sampling
    settings); otherwise they are sampled from `policy()`, the policy's (graphdef, params) (a function, so
    that a replay never reads the policy's parameters)."""
    d = cfg.data
    ns = tuple(n for n in (1, 4, 16, 64, 256) if n <= d.eval_best_of)
    key = _draws_key(cfg, tok, prompts)
    if jax.process_count() > 1:
        save = load = None  # every process must take the same path through the sampler's collectives
    stored = _read_draws(load, key) if load is not None else None
    if stored is not None:
        many, batches = stored
        if reward_model is not None:
            scores = [_rm_scores(reward_model, *batch[:4])[: batch[4]] for batch in batches]
            many["rm"] = np.concatenate(scores).reshape(many["gold"].shape)
        return many, ns
    batches = [] if save is not None else None
    graphdef, params = policy()
    many = score_samples(
        graphdef,
        params,
        None,
        tok,
        prompts,
        samples=d.eval_best_of,
        temperature=d.eval_temperature,
        max_new=d.eval_max_new,
        seed=_DRAWS_SEED,
        reward_model=reward_model,
        record=batches,
    )
    if save is not None:
        _write_draws(save, key, many, batches)
    return many, ns


def _write_draws(path, key: str, many: dict, batches: list) -> None:
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"batch_{name}": np.stack([b[i] for b in batches]) for i, name in enumerate(_BATCH_FIELDS)}
    arrays["batch_rows"] = np.asarray([b[4] for b in batches], np.int64)
    arrays |= {f"score_{k}": v for k, v in many.items() if k != "rm"}
    from jaxrl.files import replacing

    with replacing(path) as tmp:
        np.savez_compressed(tmp, key=np.asarray(key), **arrays)


_BATCH_FIELDS = ("ids", "mask", "tokens", "resp_mask")


def _read_draws(path, key: str):
    """(score arrays, batches) of a stored draws file that holds the draws `key` names; None otherwise."""
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        if str(f["key"]) != key:
            return None
        fields = [f[f"batch_{name}"] for name in _BATCH_FIELDS]
        rows = f["batch_rows"]
        batches = [(*(x[i] for x in fields), int(rows[i])) for i in range(len(rows))]
        many = {k.removeprefix("score_"): f[k] for k in f.files if k.startswith("score_")}
    return many, batches


def summarize(scores: dict[str, np.ndarray], domains: list[str], *, best_of=()) -> dict[str, float]:
    """Metrics of score_samples' arrays: gold_reward (+ _se, per domain), kl (+ _se), length, eos_rate and,
    for each n in best_of (<= samples), best_of_<n> on gold with its KL bound log n - (n - 1) / n."""
    metrics: dict[str, float] = {}
    gold_P = scores["gold"].mean(axis=1)
    metrics["gold_reward"], metrics["gold_reward_se"] = domain_mean(gold_P, domains)
    for name in sorted(set(domains)):
        metrics[f"gold_reward/{name}"] = float(gold_P[[d == name for d in domains]].mean())
    metrics["kl"], metrics["kl_se"] = domain_mean(scores["kl"].mean(axis=1), domains)
    metrics["length"] = float(scores["length"].mean())
    metrics["eos_rate"] = float(scores["eos"].mean())
    for n in best_of:
        if n <= scores["gold"].shape[1]:
            metrics[f"best_of_{n}"], metrics[f"best_of_{n}_se"] = domain_mean(
                expected_best_of(scores["gold"], n), domains
            )
            metrics[f"best_of_{n}_kl_bound"] = math.log(n) - (n - 1) / n
    return metrics


def greedy_gold(graphdef, params, tok, prompts, *, max_new: int, batch_size: int = 256) -> dict[str, float]:
    """gold_reward_greedy (+ per domain) of greedy responses."""
    scores = score_samples(
        graphdef,
        params,
        None,
        tok,
        prompts,
        samples=1,
        temperature=0.0,
        max_new=max_new,
        batch_size=batch_size,
    )
    domains = [r.source for r in prompts]
    gold_P = scores["gold"][:, 0]
    metrics = {"gold_reward_greedy": domain_mean(gold_P, domains)[0]}
    for name in sorted(set(domains)):
        metrics[f"gold_reward_greedy/{name}"] = float(gold_P[[d == name for d in domains]].mean())
    return metrics


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """(mean, standard error) of the per-prompt gold difference a - b of two runs scored on the same prompts
    (their `eval_per_prompt` records), domains weighted equally."""
    if a["domain"] != b["domain"]:
        raise ValueError("paired differences need both runs scored on the same prompts")
    return domain_mean(np.asarray(a["gold"]) - np.asarray(b["gold"]), a["domain"])


def ranking_accuracy(
    graphdef, params, pairs: dict[str, np.ndarray], *, batch_size: int = 64
) -> dict[str, float]:
    """How often the policy itself ranks held-out pairs as the gold labels do (Chen et al., 2024, "Preference
    Learning Algorithms Do Not Learn Preference Rankings"): the fraction of pairs whose chosen completion has
    the higher summed log-probability (`ranking_accuracy`) and the higher mean per-token log-probability
    (`ranking_accuracy_norm`). `pairs` are encode_pairs arrays ("tokens", "loss_mask" [N, 2, T]); a last
    partial batch is filled with repeats and the repeats dropped, so every batch compiles once."""
    tokens, mask = pairs["tokens"], pairs["loss_mask"]
    n = tokens.shape[0]
    if n == 0:
        return {}
    batch_size = min(batch_size, n)
    summed, lengths = [], []
    placement = _placement(params)
    for start in range(0, n, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        T = tokens.shape[-1]
        arrays = jax.device_put((tokens[index].reshape(-1, T), mask[index].reshape(-1, T)), placement)
        lp, ln = jax.device_get(_sequence_logps(graphdef, params, *arrays))
        keep = min(batch_size, n - start)
        summed.append(np.asarray(lp).reshape(-1, 2)[:keep])
        lengths.append(np.asarray(ln).reshape(-1, 2)[:keep])
    summed, lengths = np.concatenate(summed), np.concatenate(lengths)
    mean = summed / np.maximum(lengths, 1.0)
    return {
        "ranking_accuracy": float(np.mean(summed[:, 0] > summed[:, 1])),
        "ranking_accuracy_norm": float(np.mean(mean[:, 0] > mean[:, 1])),
    }


@functools.partial(jax.jit, static_argnames="graphdef")
def _sequence_logps(graphdef, params, tokens_BT, mask_BT):
    """Summed completion log-probs and lengths [B] of rows of pairs (jitted once, per model)."""
    from flax import nnx

    from jaxrl import steps

    return steps.sequence_logps(nnx.merge(graphdef, params), tokens_BT, mask_BT)


def gold_pair_arrays(cfg, tok) -> dict[str, np.ndarray]:
    """The held-out gold-labelled pairs of a synthetic run (the same draw the DPO and RM stages evaluate on),
    tokenised with the run's data settings."""
    from jaxrl import synthetic
    from jaxrl.data import tokenize

    d = cfg.data
    pairs = synthetic.make_gold_pairs(d.num_eval, seed=cfg.seed + 10_000)
    arrays, _ = tokenize.encode_pairs(
        pairs, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len, truncation=d.truncation
    )
    return arrays


def eval_prompts(cfg, split: str) -> list:
    """The study-wide prompts of a split ("validation" or "test"): the same for every run, fixed seed."""
    from jaxrl import synthetic

    n = cfg.data.val_prompts_per_domain if split == "validation" else cfg.data.eval_prompts_per_domain
    return synthetic.make_eval_prompts(n, seed=12345, split=split)


def synthetic_eval(
    cfg, graphdef, params, ref_params, tok, *, split: str = "test", best_of: bool = False, draws_run=None
) -> tuple[dict[str, float], dict]:
    """A policy's evaluation on a split of the synthetic world: (metrics, per-prompt record). Sampled gold
    over data.eval_samples responses per prompt at data.eval_temperature is the primary metric; greedy beside
    it; on test, the ranking accuracy on held-out gold pairs, and with `best_of` the best-of-N ceilings from
    data.eval_best_of samples per prompt (on either split; stored at `draws_path(draws_run, split)` when
    `draws_run` is given). Every run uses the same prompts and sampling keys."""
    d = cfg.data
    prompts = eval_prompts(cfg, split)
    domains = [r.source for r in prompts]
    scores = score_samples(
        graphdef,
        params,
        ref_params,
        tok,
        prompts,
        samples=d.eval_samples,
        temperature=d.eval_temperature,
        max_new=d.eval_max_new,
    )
    metrics = summarize(scores, domains) | greedy_gold(graphdef, params, tok, prompts, max_new=d.eval_max_new)
    if best_of and d.eval_best_of:
        save = draws_path(draws_run, split) if draws_run is not None else None
        many, ns = best_of_draws(cfg, lambda: (graphdef, params), tok, prompts, save=save)
        metrics |= {k: v for k, v in summarize(many, domains, best_of=ns).items() if k.startswith("best_of")}
    if split == "test":
        metrics |= ranking_accuracy(graphdef, params, gold_pair_arrays(cfg, tok))
    per_prompt = {
        "domain": domains,
        "gold": scores["gold"].mean(axis=1).round(6).tolist(),
        "kl": scores["kl"].mean(axis=1).round(6).tolist(),
    }
    return metrics, per_prompt
