"""Test helpers shared by several test modules: a local chat tokenizer (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def word_tokenizer(directory: Path, words) -> Path:
    """A whitespace word-level tokenizer.json + tokenizer_config.json with a ChatML template; its vocabulary:
    the specials, "<unk>", the three roles and `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["<unk>", "system", "user", "assistant"] + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<pad>", "chat_template": CHATML}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
