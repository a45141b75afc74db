"""Data pipeline benchmark: tokenised preference pairs per second per core, and batch assembly rate.

Writes N pairs in the Tulu 2.5 preference-data schema (multi-turn message lists, ~300-word responses), reads
them with the real reader, renders them with the Tulu 2 chat format through a byte-level BPE tokenizer
(`tokenizers`, trained here on the generated text, 32k vocabulary like Llama 2), truncates/pads to --max-len,
then times batch assembly (seeded order + gather) for 8-pair batches. Everything runs on one core.

    python bench/data_pipeline.py --pairs 2000 --max-len 1024

"Keeps ahead of the DPO step" compares pairs/s with the pairs/s a DPO step consumes at --step-tokens-per-s
(default 47,461: the torch.compile peer at the 1.1B shape on one H100, 8 pairs x 1024 x 2 tokens per step).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = (
    "the model answer question data reward policy value step token train learn prefer better worse "
    "because therefore however example first second finally result method paper study show"
).split()


def _text(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, n_words)) + "."


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    """n rows in the tulu25 schema (chosen/rejected message lists sharing the prompt turns)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = [{"role": "user", "content": _text(rng, 40)}]
            if i % 3 == 0:
                prompt = [
                    {"role": "user", "content": _text(rng, 20)},
                    {"role": "assistant", "content": _text(rng, 60)},
                ] + prompt
            row = {
                "chosen": prompt + [{"role": "assistant", "content": _text(rng, 300)}],
                "rejected": prompt + [{"role": "assistant", "content": _text(rng, 250)}],
                "source": "bench",
                "id": str(i),
            }
            f.write(json.dumps(row) + "\n")


def make_tokenizer_dir(directory: Path, corpus: list[str]) -> Path:
    """A byte-level BPE tokenizer directory (tokenizer.json + config) with the Tulu 2 fallback format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=32000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False})
    )
    return directory


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--step-tokens-per-s", type=float, default=47_461.0)
    args = parser.parse_args(argv)

    from jaxrl.data import readers, tokenize
    from jaxrl.data.chat import HFChatTokenizer
    from jaxrl.data.pipeline import BatchOrder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_pairs(tmp / "pairs.jsonl", args.pairs)
        corpus = [line for line in (tmp / "pairs.jsonl").read_text().splitlines()[:200]]
        tok = HFChatTokenizer.from_dir(make_tokenizer_dir(tmp / "tok", corpus))

        t0 = time.perf_counter()
        result = readers.read(tmp / "pairs.jsonl", "tulu25")
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        arrays, stats = tokenize.encode_pairs(
            result.records, tok, max_len=args.max_len, max_prompt_len=args.max_len // 2, truncation="truncate"
        )
        tokenize_s = time.perf_counter() - t0

    order = BatchOrder(arrays["tokens"].shape[0], args.batch, seed=0)
    n_batches = 2000
    t0 = time.perf_counter()
    for step in range(n_batches):
        idx = order.indices(step)
        _ = {k: v[idx] for k, v in arrays.items()}
    batch_s = time.perf_counter() - t0

    pairs_per_s = args.pairs / (read_s + tokenize_s)
    needed = args.step_tokens_per_s / (2 * args.max_len)
    out = {
        "pairs": args.pairs,
        "max_len": args.max_len,
        "read_s": round(read_s, 3),
        "tokenize_s": round(tokenize_s, 3),
        "pairs_per_s_per_core": round(pairs_per_s, 1),
        "mean_tokens_per_pair": round(
            float((arrays["tokens"] != tok.pad_id).sum()) / arrays["tokens"].shape[0], 1
        ),
        "tokenize_report": stats.summary(),
        "batches_per_s": round(n_batches / batch_s, 1),
        "dpo_step_needs_pairs_per_s": round(needed, 1),
        "keeps_ahead": pairs_per_s > needed,
        "headroom": round(pairs_per_s / needed, 1),
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
