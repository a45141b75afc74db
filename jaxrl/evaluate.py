"""Evaluation in the synthetic world: gold reward per domain, KL to the reference, response length, and the
policy's ranking accuracy on held-out gold-labelled pairs."""

from __future__ import annotations

import collections

import jax
import numpy as np

from jaxrl import sampling


def _generate(graphdef, params, tok, prompts, *, temperature: float, max_new: int, seed: int, batch_size: int):
    """Responses (token ids, per-token log-probs, masks) for every prompt record, in batches."""
    out = []
    batch_size = min(batch_size, len(prompts))
    width = max(len(tok.encode_prompt(r.prompt)) for r in prompts)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        # Every batch has the same shape (the last one is filled with repeats, dropped below): one compile.
        encoded = [tok.encode_prompt(r.prompt) for r in chunk]
        encoded += [encoded[-1]] * (batch_size - len(chunk))
        ids, mask = sampling.left_pad(encoded, tok.pad_id, width=width)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), start)
        tokens, logps, resp_mask = jax.device_get(sampling.sample(
            graphdef, params, ids, mask, key, np.float32(temperature), max_new=max_new, eos_id=tok.eos_id,
            pad_id=tok.pad_id))
        out.append((ids, mask, np.asarray(tokens), np.asarray(logps), np.asarray(resp_mask), len(chunk)))
    return out


def world_eval(graphdef, params, ref_params, tok, prompts, *, max_new: int = 16, seed: int = 0,
               batch_size: int = 64) -> dict[str, float]:
    """Gold reward per domain (greedy and sampled at temperature 1), KL(policy || reference) per sequence from
    temperature-1 samples, mean response length and the rate of responses that end with EOS."""
    from jaxrl.synthetic import gold_reward

    metrics: dict[str, float] = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        by_domain = collections.defaultdict(list)
        lengths, eos, kls = [], [], []
        index = 0
        for ids, mask, tokens, _, resp_mask, n in _generate(graphdef, params, tok, prompts, temperature=temperature,
                                                            max_new=max_new, seed=seed, batch_size=batch_size):
            if mode == "sampled" and ref_params is not None:
                # Both sides through the same teacher-forced forward, so the estimate has no sampler/trainer gap.
                policy, ref = (np.asarray(jax.device_get(sampling.response_logps(graphdef, p, ids, mask, tokens,
                                                                                 resp_mask)))
                               for p in (params, ref_params))
                kls += list(np.sum((policy - ref) * resp_mask, axis=1)[:n])
            for row in range(n):
                record = prompts[index]
                index += 1
                length = int(resp_mask[row].sum())
                text = tok.decode(tokens[row, :length].tolist())
                by_domain[record.source].append(gold_reward(record, text))
                lengths.append(length)
                eos.append(bool(length and tokens[row, length - 1] == tok.eos_id))
        suffix = "" if mode == "greedy" else "_sampled"
        for domain, rewards in sorted(by_domain.items()):
            metrics[f"gold_reward{suffix}/{domain}"] = float(np.mean(rewards))
        metrics[f"gold_reward{suffix}"] = float(np.mean([np.mean(r) for r in by_domain.values()]))
        metrics[f"length{suffix}"] = float(np.mean(lengths))
        metrics[f"eos_rate{suffix}"] = float(np.mean(eos))
        if kls:
            metrics["kl"] = float(np.mean(kls))
    return metrics


def ranking_accuracy(graphdef, params, pairs: dict[str, np.ndarray], *, batch_size: int = 64) -> dict[str, float]:
    """How often the policy itself ranks held-out pairs as the gold labels do (Chen et al., 2024, "Preference
    Learning Algorithms Do Not Learn Preference Rankings"): the fraction of pairs whose chosen completion has the
    higher summed log-probability (`ranking_accuracy`) and the higher mean per-token log-probability
    (`ranking_accuracy_norm`). `pairs` are encode_pairs arrays ("tokens", "loss_mask" [N, 2, T]); a last
    partial batch is filled with repeats and the repeats dropped, so every batch compiles once."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxrl import steps

    @jax.jit
    def logps(params, tokens_BT, mask_BT):
        return steps.sequence_logps(nnx.merge(graphdef, params), tokens_BT, mask_BT)

    tokens, mask = pairs["tokens"], pairs["loss_mask"]
    n = tokens.shape[0]
    if n == 0:
        return {}
    batch_size = min(batch_size, n)
    summed, lengths = [], []
    for start in range(0, n, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        T = tokens.shape[-1]
        lp, ln = jax.device_get(logps(params, jnp.asarray(tokens[index].reshape(-1, T)),
                                      jnp.asarray(mask[index].reshape(-1, T))))
        keep = min(batch_size, n - start)
        summed.append(np.asarray(lp).reshape(-1, 2)[:keep])
        lengths.append(np.asarray(ln).reshape(-1, 2)[:keep])
    summed, lengths = np.concatenate(summed), np.concatenate(lengths)
    mean = summed / np.maximum(lengths, 1.0)
    return {"ranking_accuracy": float(np.mean(summed[:, 0] > summed[:, 1])),
            "ranking_accuracy_norm": float(np.mean(mean[:, 0] > mean[:, 1]))}


def gold_pair_arrays(cfg, tok) -> dict[str, np.ndarray]:
    """The held-out gold-labelled pairs of a synthetic run (the same draw the DPO and RM stages evaluate on),
    tokenised with the run's data settings."""
    from jaxrl import synthetic
    from jaxrl.data import tokenize

    d = cfg.data
    pairs = synthetic.make_gold_pairs(d.num_eval, seed=cfg.seed + 10_000)
    arrays, _ = tokenize.encode_pairs(pairs, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len,
                                      truncation=d.truncation)
    return arrays


def synthetic_eval(cfg, graphdef, params, ref_params, tok) -> dict[str, float]:
    """A policy's evaluation in the synthetic world: world_eval on the held-out prompts and its ranking accuracy
    on the held-out gold pairs (the same prompts and pairs for every run of a study)."""
    from jaxrl import synthetic

    prompts = synthetic.make_eval_prompts(cfg.data.eval_prompts_per_domain, seed=12345)
    metrics = world_eval(graphdef, params, ref_params, tok, prompts, max_new=cfg.data.eval_max_new, seed=0)
    return metrics | ranking_accuracy(graphdef, params, gold_pair_arrays(cfg, tok))
