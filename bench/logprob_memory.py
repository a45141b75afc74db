"""Log-prob memory benchmark: the compiler's temporaries of a DPO gradient (policy log-probs of chosen and
rejected rows, the DPO loss, its gradient w.r.t. every weight) with the fp32 logits [2B, T, V] made whole
(model.logprob_chunk=0) and made chunk by chunk inside a rematerialised scan (model.logprob_chunk=C), at a
Llama-3-sized vocabulary. Nothing runs: each program is compiled ahead of time from abstract shapes and its
`memory_analysis()` is read, on this host's CPU backend by default:

    python bench/logprob_memory.py --pairs 2 --seq 512 --chunks 0,128,256,512

With --tpu TOPOLOGY (libtpu installed) the same programs are compiled for that TPU slice under an fsdp mesh
of its chips (per-chip figures), and --attention picks the attention implementation (auto: splash on TPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from jaxrl import pairwise, sharding, steps
from jaxrl.config import MeshConfig, ModelConfig
from jaxrl.models import attention
from jaxrl.models import init as model_init

MIB = 1 << 20


def grad_program(cfg: ModelConfig, pairs: int, seq: int, devices=None):
    """The jitted DPO gradient of `cfg` and its abstract (params, batch), under an fsdp mesh of `devices`."""
    graphdef, abstract = model_init.abstract_model(cfg)
    tokens = jax.ShapeDtypeStruct((pairs, 2, seq), jnp.int32)
    ref_logps = jax.ShapeDtypeStruct((pairs, 2), jnp.float32)
    batch = {"tokens": tokens, "loss_mask": tokens, "ref_logps": ref_logps}
    totals = {"examples": jnp.float32(pairs), "tokens": jnp.float32(pairs * seq)}
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1), devices) if devices else None

    def grad(params, batch):
        def loss(params):
            return steps.preference_objective(
                params, batch, pairwise.LossHParams.create(), totals, graphdef=graphdef, loss_name="dpo"
            )[0]

        if mesh is None:
            return jax.grad(loss)(params)
        with sharding.use_mesh(mesh, "fsdp"):
            return jax.grad(loss)(params)

    if mesh is None:
        return jax.jit(grad), (abstract, batch), None
    shardings = (
        sharding.tree_shardings(abstract, "fsdp", mesh),
        jax.tree.map(lambda _: sharding.batch_sharding(mesh, "fsdp"), batch),
    )
    return jax.jit(grad, in_shardings=shardings), (abstract, batch), mesh


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=768)
    p.add_argument("--chunks", default="0,128,256,512")
    p.add_argument("--attention", default="xla")
    p.add_argument("--tpu", default="", help="a TPU topology (e.g. v5e-8) to compile for instead of the CPU")
    args = p.parse_args()

    devices = None
    if args.tpu:
        from jaxrl.preflight import topology

        devices = topology.tpu_devices(topology.parse_topology(args.tpu))
    cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        mlp=args.mlp,
        dtype="bfloat16",
        attention=args.attention,
    )
    rows, logits = 2 * args.pairs, 2 * args.pairs * (args.seq - 1) * args.vocab * 4
    where = f"TPU {args.tpu} ({len(devices)} chips, fsdp; per chip)" if devices else "CPU"
    print(
        f"DPO gradient, {args.pairs} pairs ({rows} rows) x {args.seq} tokens, vocab {args.vocab}, "
        f"D {args.hidden}, {args.layers} layers, bf16 compute, fp32 weights; compiled for {where}"
    )
    print(f"fp32 logits of every row: {logits / MIB:.1f} MiB")
    print("| logprob_chunk | temp MiB | arguments MiB | output MiB | compile s | attention |")
    print("|---:|---:|---:|---:|---:|---|")
    for chunk in (int(c) for c in args.chunks.split(",")):
        chunked = dataclasses.replace(cfg, logprob_chunk=chunk)
        fn, abstract, mesh = grad_program(chunked, args.pairs, args.seq, devices)
        start = time.perf_counter()
        compiled = fn.lower(*abstract).compile()
        seconds = time.perf_counter() - start
        m = compiled.memory_analysis()
        if mesh is None:
            impl = attention.resolve(chunked)
        else:
            with sharding.use_mesh(mesh, "fsdp"):
                impl = attention.resolve(chunked)
        print(
            f"| {chunk} | {m.temp_size_in_bytes / MIB:.1f} | {m.argument_size_in_bytes / MIB:.1f} | "
            f"{m.output_size_in_bytes / MIB:.1f} | {seconds:.1f} | {impl} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
