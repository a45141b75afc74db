"""Evaluation throughput: requests/s of the "jaxrl" lm-eval backend against lm-eval's own `hf` backend (HFLM,
transformers on torch) for the same checkpoint on the same machine.

A random Llama-architecture checkpoint and a word-level tokenizer are written to a temporary directory (no
downloads); both backends load that directory in float32 and answer the same requests:

  loglikelihood    --ll-requests (context, continuation) pairs: contexts of 8..--max-context words,
                   continuations of 1..8 words (multiple-choice style)
  generate_until   --gen-requests greedy generations of --max-gen-toks tokens from prompts of 8..48 words,
                   stopping at "\\n\\n" (a random model never writes it, so every row runs to max_gen_toks:
                   both backends do the same work)

Each backend first answers every request once (jaxrl compiles one program per batch width there; reported as
"first call"), then --runs timed repetitions; the median is reported: requests/s = requests / median wall s.
Both use the same --batch-size. The jaxrl backend runs on every JAX device (8 fake CPU devices would only
split the same cores: run with JAX_PLATFORMS=cpu and no device-count flag on a CPU); HFLM uses torch's
threads on the CPU, or --hf-device (cuda) when an accelerator is present.

    JAX_PLATFORMS=cpu python bench/eval_throughput.py                      # the default tiny shape on a CPU
    python bench/eval_throughput.py --hidden 1024 --layers 16 --hf-device cuda --batch-size 64   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = [f"w{i}" for i in range(400)]


def write_checkpoint(directory: Path, args) -> None:
    """A random LlamaForCausalLM (float32) and a whitespace word-level tokenizer with BOS/EOS."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.max_length,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # Weights large enough that the logits are far from uniform: with transformers' initialisation (std 0.02)
    # greedy choices are near-ties that float rounding decides differently in XLA and torch.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 2.4 / args.hidden**0.5 * noise)
    model.save_pretrained(directory)


def requests(args):
    """(loglikelihood Instances, generate_until Instances), the same for both backends."""
    import numpy as np
    from lm_eval.api.instance import Instance

    rng = np.random.default_rng(0)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1))))

    ll = [
        Instance("loglikelihood", doc={}, arguments=(text(8, args.max_context), " " + text(1, 8)), idx=0)
        for _ in range(args.ll_requests)
    ]
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": args.max_gen_toks, "do_sample": False}
    gen = [
        Instance("generate_until", doc={}, arguments=(text(8, 48), dict(gen_kwargs)), idx=0)
        for _ in range(args.gen_requests)
    ]
    return ll, gen


def time_backend(lm, ll, gen, runs: int) -> dict:
    out = {}
    for kind, reqs, call in (
        ("loglikelihood", ll, lambda r: lm.loglikelihood(r, disable_tqdm=True)),
        ("generate_until", gen, lambda r: lm.generate_until(r, disable_tqdm=True)),
    ):
        if not reqs:
            continue
        start = time.perf_counter()
        first = call(reqs)
        first_s = time.perf_counter() - start
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            again = call(reqs)
            times.append(time.perf_counter() - start)
            assert len(again) == len(first)
        median = statistics.median(times)
        out[kind] = {
            "requests": len(reqs),
            "first_call_s": first_s,
            "median_s": median,
            "min_s": min(times),
            "max_s": max(times),
            "requests_per_s": len(reqs) / median,
            "answers": first,
        }
    return out


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument(
        "--max-length", type=int, default=256, help="the checkpoint's max_position_embeddings"
    )
    parser.add_argument("--ll-requests", type=int, default=256)
    parser.add_argument("--max-context", type=int, default=96, help="longest loglikelihood context (words)")
    parser.add_argument("--gen-requests", type=int, default=32)
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--bucket", type=int, default=32, help="jaxrl backend: batch widths in multiples of it"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hf-device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: default)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch
    from lm_eval.models.huggingface import HFLM

    from jaxrl.eval.backend import JaxrlLM

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory(prefix="jaxrl-eval-bench-") as tmp:
        directory = Path(tmp)
        write_checkpoint(directory, args)
        ll, gen = requests(args)
        results = {}
        jaxrl_lm = JaxrlLM(
            pretrained=str(directory), dtype="float32", batch_size=args.batch_size, bucket=args.bucket
        )
        results["jaxrl"] = time_backend(jaxrl_lm, ll, gen, args.runs)
        del jaxrl_lm
        hf_lm = HFLM(
            pretrained=str(directory), device=args.hf_device, dtype="float32", batch_size=args.batch_size
        )
        results["hf"] = time_backend(hf_lm, ll, gen, args.runs)

    # The two backends must agree, or the comparison is between different computations.
    ours, theirs = results["jaxrl"], results["hf"]
    if ll:
        diff = max(
            abs(a[0] - b[0])
            for a, b in zip(ours["loglikelihood"]["answers"], theirs["loglikelihood"]["answers"], strict=True)
        )
        print(f"loglikelihood: max |jaxrl - hf| = {diff:.2e} over {len(ll)} requests")
    if gen:
        same = sum(
            a == b
            for a, b in zip(
                ours["generate_until"]["answers"], theirs["generate_until"]["answers"], strict=True
            )
        )
        print(f"generate_until: {same}/{len(gen)} greedy generations identical")

    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
        "hf_device": args.hf_device,
    }
    shape = {
        k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "batch_size", "max_gen_toks")
    }
    print(f"shape: {shape}; machine: {machine}")
    print("| request | backend | requests/s | median s | first call s |")
    print("|---|---|---|---|---|")
    for kind in ("loglikelihood", "generate_until"):
        for name in ("jaxrl", "hf"):
            r = results[name].get(kind)
            if r:
                rate, median, first = r["requests_per_s"], r["median_s"], r["first_call_s"]
                print(f"| {kind} | {name} | {rate:.1f} | {median:.3f} | {first:.2f} |")
        if kind in results["jaxrl"]:
            ratio = results["jaxrl"][kind]["requests_per_s"] / results["hf"][kind]["requests_per_s"]
            print(f"| {kind} | jaxrl / hf | {ratio:.2f}x | | |")
    if args.json:
        for r in results.values():
            for kind in r.values():
                kind.pop("answers")
        Path(args.json).write_text(
            json.dumps({"shape": shape, "machine": machine, "results": results}, indent=2, default=np.asarray)
            + "\n"
        )


if __name__ == "__main__":
    main()
