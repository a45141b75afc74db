"""Sampler benchmark: new tokens/s of the KV-cache sampler (`jaxrl.sampling.sample`) against a roofline.

Default shape: the 1.1B TinyLlama (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000) at
batch 256, 128-token prompts and 256 new tokens, bf16 compute over fp32 master weights (as an RL policy).

    python bench/sampler.py                        # the 1.1B shape (an accelerator)
    python bench/sampler.py --tiny --reference     # a tiny shape on a CPU, and the full-recompute reference

tokens/s counts new tokens over the whole batch (batch x max_new; EOS is disabled so every row runs to
max_new) divided by the wall time of one whole call (prefill + decode). A second compiled call with
max_new=1 times the prefill alone, so the decode step time is (whole - prefill) / (max_new - 1).

Roofline. A decode step must at least read every matmul weight once (compute dtype: the sampler casts the
fp32 masters once per call) plus the K and V cache of the tokens so far, at --hbm-gbps (3350 for an H100
SXM), and do 2 x matmul params x batch FLOPs plus attention at --peak-tflops (989, dense bf16); its bound is
the larger of the two. The prefill is bounded by its FLOPs. Two cache figures: "live" reads only the tokens
written so far (the ideal: mean length P + (N-1)/2), "full" reads the whole preallocated cache P + N every
step, which is what this sampler's dense masked attention does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

# Run as `python bench/sampler.py`: bench/ is on the path, and the DPO bench defines the shared shapes.
from dpo_step import TINY, TINYLLAMA, peak_memory_bytes

from jaxrl import sampling, sharding
from jaxrl.config import MeshConfig, ModelConfig
from jaxrl.models import init as model_init
from jaxrl.models.transformer import count_params


def roofline(cfg: ModelConfig, batch: int, prompt: int, new: int, hbm_gbps: float, peak_tflops: float):
    """Lower bounds on the time of one sample() call and the tokens/s they allow."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    counts = count_params(cfg)
    head = cfg.hidden * cfg.vocab_size
    body = counts["matmul"] - head  # per-token matmul weights of the layers
    kv_per_token = 2 * cfg.layers * cfg.kv_heads * cfg.head_size * itemsize  # K and V, all layers
    attn_flops_per_key = 4 * cfg.layers * cfg.heads * cfg.head_size  # scores + values, per query per key
    weight_bytes = counts["matmul"] * itemsize
    step_flops_base = 2 * counts["matmul"] * batch
    out = {"weight_bytes_per_step": weight_bytes}
    for name, mean_len in (("live", prompt + (new - 1) / 2), ("full", prompt + new)):
        kv_bytes = kv_per_token * batch * mean_len
        step_flops = step_flops_base + attn_flops_per_key * batch * mean_len
        step_s = max((weight_bytes + kv_bytes) / (hbm_gbps * 1e9), step_flops / (peak_tflops * 1e12))
        # Causal prefill: about P/2 keys per query; the head only at the last position.
        prefill_flops = batch * (prompt * (2 * body + attn_flops_per_key * prompt / 2) + 2 * head)
        prefill_s = max(prefill_flops / (peak_tflops * 1e12), weight_bytes / (hbm_gbps * 1e9))
        total_s = prefill_s + (new - 1) * step_s
        out[name] = {
            "kv_bytes_per_step": kv_bytes,
            "step_ms": 1000 * step_s,
            "step_bound": "memory"
            if (weight_bytes + kv_bytes) / (hbm_gbps * 1e9) >= step_flops / (peak_tflops * 1e12)
            else "compute",
            "prefill_ms": 1000 * prefill_s,
            "tokens_per_s": batch * new / total_s,
        }
    return out


def time_call(fn, runs: int) -> float:
    """Median wall seconds of fn() over `runs` calls, after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> dict:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and shape (CPU smoke run)")
    parser.add_argument("--batch", type=int, default=0, help="default 256 (8 with --tiny)")
    parser.add_argument("--prompt-len", type=int, default=0, help="default 128 (16 with --tiny)")
    parser.add_argument("--max-new", type=int, default=0, help="default 256 (32 with --tiny)")
    parser.add_argument("--layers", type=int, default=0, help="override the model's layer count")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (KV cache and matmuls)")
    parser.add_argument("--param-dtype", default="float32", help="master weight dtype")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--preset", default="fsdp")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also time the full-recompute reference")
    parser.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM bandwidth (H100 SXM: 3350)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)

    cfg = TINY if args.tiny else TINYLLAMA
    cfg = dataclasses.replace(cfg, dtype=args.dtype, param_dtype=args.param_dtype)
    if args.layers:
        cfg = dataclasses.replace(cfg, layers=args.layers)
    batch = args.batch or (8 if args.tiny else 256)
    prompt = args.prompt_len or (16 if args.tiny else 128)
    new = args.max_new or (32 if args.tiny else 256)
    mesh = sharding.make_mesh(MeshConfig(preset=args.preset))
    sharding.check_batch(batch, 1, mesh, args.preset)

    graphdef, _ = model_init.abstract_model(cfg)
    params = model_init.init_params(cfg, 0, mesh, args.preset)
    rng = np.random.default_rng(0)
    ids = jax.device_put(
        rng.integers(3, cfg.vocab_size, (batch, prompt), dtype=np.int32),
        sharding.batch_sharding(mesh, args.preset),
    )
    mask = jax.device_put(np.ones((batch, prompt), np.int32), sharding.batch_sharding(mesh, args.preset))
    key, temperature = jax.random.PRNGKey(0), np.float32(args.temperature)

    def call(fn, max_new):
        kw = dict(max_new=max_new, eos_id=-1, pad_id=0, top_p=args.top_p, top_k=args.top_k)  # -1: no EOS
        with sharding.use_mesh(mesh, args.preset):
            return lambda: fn(graphdef, params, ids, mask, key, temperature, **kw)

    t0 = time.perf_counter()
    jax.block_until_ready(call(sampling.sample, new)())
    first_call_s = time.perf_counter() - t0
    whole_s = time_call(call(sampling.sample, new), args.runs)
    prefill_s = time_call(call(sampling.sample, 1), args.runs)
    step_s = (whole_s - prefill_s) / max(new - 1, 1)
    tokens_per_s = batch * new / whole_s
    bound = roofline(cfg, batch, prompt, new, args.hbm_gbps, args.peak_tflops)
    peak, peak_kind = peak_memory_bytes()
    result = {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "params": count_params(cfg)["total"],
        "shape": {
            "batch": batch,
            "prompt": prompt,
            "max_new": new,
            "dtype": args.dtype,
            "param_dtype": args.param_dtype,
            "layers": cfg.layers,
            "hidden": cfg.hidden,
        },
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k},
        "first_call_s": round(first_call_s, 2),
        "call_s": round(whole_s, 4),
        "prefill_s": round(prefill_s, 4),
        "decode_step_ms": round(1000 * step_s, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "roofline": bound,
        "fraction_of_roofline_live": round(tokens_per_s / bound["live"]["tokens_per_s"], 4),
        "fraction_of_roofline_full": round(tokens_per_s / bound["full"]["tokens_per_s"], 4),
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_kind": peak_kind,
    }
    if args.reference:
        ref_s = time_call(call(sampling.sample_reference, new), args.runs)
        result["reference_call_s"] = round(ref_s, 4)
        result["reference_tokens_per_s"] = round(batch * new / ref_s, 1)
        result["speedup_over_reference"] = round(ref_s / whole_s, 2)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
