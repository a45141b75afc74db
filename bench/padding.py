"""Padding benchmark: how many of the token positions a step computes are real tokens, with rows padded to
max_len, cut to length buckets (data.padding=bucket, with and without data.group_by_length), or packed
(data.padding=pack, SFT); and what bucketing and packing cost on the host.

Lengths are drawn from a log-normal (median --median tokens, shape --sigma, clipped to [16, max_len]), the
long-tailed shape of chat preference data. Rows are built as the tokeniser builds them (right-padded, loss on
the completion), then the pipeline's own functions are timed on them (one core):

    python bench/padding.py --examples 20000 --max-len 2048 --median 350 --sigma 0.8 --batch 32 --multiple 128

"Computed positions per real token" is the factor of wasted step compute that padding costs (for the linear
layers; attention's quadratic part favours short rows further). Shapes: bucketing compiles one program per
distinct width (at most max_len / multiple).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxrl.data import pipeline


def make_rows(n: int, max_len: int, median: float, sigma: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 16, max_len).astype(int)
    tokens = np.zeros((n, max_len), np.int32)
    mask = np.zeros((n, max_len), np.int8)
    for i, length in enumerate(lengths):
        tokens[i, :length] = rng.integers(1, 32000, length)
        mask[i, length // 3 : length] = 1  # the prompt is the first third
    return {"tokens": tokens, "loss_mask": mask}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--median", type=float, default=350)
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--multiple", type=int, default=128)
    args = p.parse_args()

    arrays = make_rows(args.examples, args.max_len, args.median, args.sigma)
    lengths = pipeline.example_lengths(arrays)
    real = int(lengths.sum())
    print(
        f"{args.examples} examples, max_len {args.max_len}, lengths: median {np.median(lengths):.0f}, "
        f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; "
        f"mean {lengths.mean():.0f} real tokens/row"
    )

    order = pipeline.BatchOrder(args.examples, args.batch, seed=0)
    steps = args.examples // args.batch
    start = time.perf_counter()
    widths = [
        pipeline.bucket_width(lengths, order.indices(s), args.multiple, args.max_len) for s in range(steps)
    ]
    per_batch_ms = (time.perf_counter() - start) / steps * 1e3
    bucket_positions = sum(widths) * args.batch

    grouped = pipeline.BatchOrder(args.examples, args.batch, seed=0, lengths=lengths)
    start = time.perf_counter()
    grouped_widths = [
        pipeline.bucket_width(lengths, grouped.indices(s), args.multiple, args.max_len) for s in range(steps)
    ]
    grouped_ms = (time.perf_counter() - start) / steps * 1e3
    grouped_positions = sum(grouped_widths) * args.batch

    start = time.perf_counter()
    packed = pipeline.pack(arrays, pad_id=0, seed=0)
    pack_s = time.perf_counter() - start
    packed_rows = packed["tokens"].shape[0]

    max_len_positions = steps * args.batch * args.max_len
    rows = [
        ("max_len", max_len_positions / (real * steps * args.batch / args.examples), "1", "-"),
        (
            f"bucket (multiple {args.multiple}, batch {args.batch})",
            bucket_positions / (real * steps * args.batch / args.examples),
            str(len(set(widths))),
            f"{per_batch_ms:.2f} ms per batch (width)",
        ),
        (
            "bucket + group_by_length (windows of 64 batches)",
            grouped_positions / (real * steps * args.batch / args.examples),
            str(len(set(grouped_widths))),
            f"{grouped_ms:.2f} ms per batch (order + width)",
        ),
        (
            "pack (sft)",
            packed_rows * args.max_len / real,
            "1",
            f"{pack_s:.2f} s once ({args.examples / pack_s:,.0f} conversations/s), "
            f"{args.examples / packed_rows:.2f} per row",
        ),
    ]
    print("| padding | computed positions per real token | compiled widths | host cost |")
    print("|---|---|---|---|")
    for name, factor, shapes, cost in rows:
        print(f"| {name} | {factor:.2f} | {shapes} | {cost} |")


if __name__ == "__main__":
    main()
