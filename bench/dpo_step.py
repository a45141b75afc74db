"""DPO-step benchmark: tokens/s, MFU and peak memory of the jitted, sharded DPO update.

Default shape: the 1.1B TinyLlama (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000) at
8 pairs x 1024 tokens, bf16 compute over fp32 master weights, cached reference log-probs.

    python bench/dpo_step.py                       # the 1.1B shape (an accelerator)
    python bench/dpo_step.py --tiny                # a tiny shape that runs on a CPU in seconds
    python bench/dpo_step.py --pairs 16 --remat dots

FLOP convention: 6 x (matmul parameters, output head included, embedding lookup excluded) per token plus
12 x layers x seq x heads x head_dim per token for attention scores and values (forward + backward, the full
T x T matrix, not halved for causality); tokens = pairs x 2 x seq. MFU = achieved FLOP/s / peak FLOP/s
(--peak-tflops, default 989 for an H100 SXM's dense bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import resource
import time

import jax
import numpy as np

from jaxrl import pairwise, sharding, steps
from jaxrl.config import REMATS, MeshConfig, ModelConfig, OptimConfig
from jaxrl.models import init as model_init
from jaxrl.models.transformer import count_params, flops_per_token

TINYLLAMA = ModelConfig(
    vocab_size=32000, hidden=2048, layers=22, heads=32, kv_heads=4, mlp=5632, rope_theta=10000.0
)
TINY = ModelConfig(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128)


def peak_memory_bytes() -> tuple[int | None, str]:
    """Peak device memory where the backend reports it, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS (no device memory stats)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model and sequence (CPU smoke run)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="dots", choices=REMATS)
    parser.add_argument("--scan", type=int, default=1, help="scan over layers (1) or unroll (0)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--preset", default="fsdp")
    parser.add_argument("--loss", default="dpo")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)

    model_cfg = TINY if args.tiny else TINYLLAMA
    seq = 32 if args.tiny and args.seq == 1024 else args.seq
    model_cfg = dataclasses.replace(
        model_cfg, remat=args.remat, scan_layers=bool(args.scan), dtype=args.dtype
    )
    mesh = sharding.make_mesh(MeshConfig(preset=args.preset))
    preset = args.preset
    sharding.check_batch(args.pairs, 1, mesh, preset)

    graphdef, _ = model_init.abstract_model(model_cfg)
    params = model_init.init_params(model_cfg, 0, mesh, preset)
    tx, schedule = steps.make_optimizer(OptimConfig(lr=1e-6), 1000)
    make_state = lambda p: steps.new_train_state(p, tx, 0, None)
    state_shardings = sharding.tree_shardings(jax.eval_shape(make_state, params), preset, mesh)
    state = jax.jit(make_state, out_shardings=state_shardings)(params)
    del params

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, (args.pairs, 2, seq), dtype=np.int32)
    mask = np.zeros((args.pairs, 2, seq), np.int8)
    mask[:, :, seq // 4 :] = 1  # a quarter prompt, the rest completion
    batch = {
        "tokens": tokens,
        "loss_mask": mask,
        "margin": np.zeros(args.pairs, np.float32),
        "ref_logps": rng.normal(-200.0, 10.0, (args.pairs, 2)).astype(np.float32),
    }
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, preset))
    objective = functools.partial(steps.preference_objective, graphdef=graphdef, loss_name=args.loss)
    step_fn = functools.partial(
        steps.train_step, objective=objective, totals_fn=steps.pair_totals, tx=tx, schedule=schedule
    )
    abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    step = steps.make_step(step_fn, jax.eval_shape(lambda: state), abstract_batch, mesh, preset)
    hp = pairwise.LossHParams.create(beta=0.1)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, hp).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch, hp)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch, hp)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0

    tokens_per_step = args.pairs * 2 * seq
    tokens_per_s = tokens_per_step * args.steps / elapsed
    flops = flops_per_token(model_cfg, seq) * tokens_per_s
    peak, peak_kind = peak_memory_bytes()
    result = {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "params": count_params(model_cfg)["total"],
        "pairs": args.pairs,
        "seq": seq,
        "remat": args.remat,
        "scan_layers": bool(args.scan),
        "dtype": args.dtype,
        "preset": preset,
        "compile_s": round(compile_s, 2),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "tflops_per_s": round(flops / 1e12, 3),
        "mfu": round(flops / (args.peak_tflops * 1e12), 4),
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_kind": peak_kind,
        "loss": float(metrics["loss"]),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
