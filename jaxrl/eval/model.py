"""A model directory loaded for evaluation: params placed on the mesh by the rule table, the compute config,
and the tokenizer as plain text <-> ids (lm-eval hands the backend strings, never messages)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxrl.config import ConfigError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when a checkpoint does not say
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


class HFTextTokenizer:
    """A checkpoint's fast tokenizer as the HF backend of lm-eval uses it: `add_special_tokens` runs the
    tokenizer's own post-processor (BOS for Llama-style tokenizers), decoding skips special tokens."""

    def __init__(self, chat_tokenizer, name: str, clean_up_spaces: bool = False):
        self.chat = chat_tokenizer
        self.name = name
        self.clean_up_spaces = clean_up_spaces
        self.bos_id, self.eos_id, self.pad_id = (
            chat_tokenizer.bos_id,
            chat_tokenizer.eos_id,
            chat_tokenizer.pad_id,
        )
        token = lambda i: None if i is None else chat_tokenizer.tokenizer.id_to_token(i)
        self.bos_text, self.eos_text = token(self.bos_id), token(self.eos_id)
        self.chat_template = chat_tokenizer.chat_template

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.chat.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        text = self.chat.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template's text as lm-eval's hf backend renders it: without a generation prompt the final
        message is continued (transformers' `continue_final_message`: the text ends where that message's
        content ends, as lm-eval asks for a task's gen_prefix), and a template that rejects the system role
        is rendered again without system messages."""
        from jaxrl.data.chat import ChatTemplateError

        try:
            return self._render(messages, add_generation_prompt)
        except ChatTemplateError:
            without_system = [m for m in messages if m.get("role") != "system"]
            if len(without_system) == len(messages):
                raise
            return self._render(without_system, add_generation_prompt)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if add_generation_prompt or not messages:
            return self.chat.render(messages, add_generation_prompt=add_generation_prompt)
        final = messages[-1].get("content") or ""
        tagged = [*messages[:-1], {**messages[-1], "content": final + CONTINUE_TAG}]
        text = self.chat.render(tagged, add_generation_prompt=False)
        tag = CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ConfigError(
                f"{self.name}: the chat template drops part of the final message, so it cannot be continued "
                f"(final message {final.strip()[:60]!r})"
            )
        at = text.rindex(tag)
        return text[:at] if text[at : at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()


class SyntheticTextTokenizer:
    """The synthetic world's word tokenizer over text: reserved words (`<bos>`, `<|user|>`, ...) in the text
    are their tokens, so a rendered chat prompt tokenises to the ids the world's policies were trained on."""

    def __init__(self, tokenizer, name: str):
        self.tok = tokenizer
        self.name = name
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.bos_text, self.eos_text = tokenizer.vocab[self.bos_id], tokenizer.vocab[self.eos_id]
        self.chat_template = "jaxrl synthetic chat format"
        self._ids = {w: i for i, w in enumerate(tokenizer.vocab)}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [self._ids.get(w, self.tok.unk_id) for w in text.split()]
        return [self.bos_id] + ids if add_special_tokens else ids

    def decode(self, ids) -> str:
        skip = {self.tok.pad_id, self.bos_id, self.eos_id}
        return " ".join(
            self.tok.vocab[i] for i in map(int, ids) if i not in skip and 0 <= i < len(self.tok.vocab)
        )

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jaxrl.synthetic.tokenizer import ROLE_TAGS

        words = [self.bos_text]
        for m in messages:
            words += [ROLE_TAGS[m["role"]], m["content"]] + (
                [self.eos_text] if m["role"] == "assistant" else []
            )
        if add_generation_prompt:
            words.append(ROLE_TAGS["assistant"])
        elif messages and messages[-1]["role"] == "assistant":
            words.pop()  # the final assistant turn is continued, not closed
        return " ".join(words)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and English contractions removed)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def clean_up_spaces(directory: Path, tokenizer) -> bool:
    """Whether transformers' decode of this checkpoint's fast tokenizer cleans up tokenization spaces (so the
    backend's generations match lm-eval's hf backend): tokenizer_config's clean_up_tokenization_spaces, which
    transformers >= 5 ignores for BPE models unless the config forces it."""
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if not config.get("clean_up_tokenization_spaces"):
        return False
    is_bpe = type(tokenizer.model).__name__ == "BPE"
    forced = config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
    return not is_bpe or bool(forced)


@dataclasses.dataclass
class LoadedModel:
    """What the backend evaluates: graphdef and params (placed on `mesh`), their config, tokenizer, length."""

    name: str
    graphdef: Any
    params: Any
    config: Any  # ModelConfig
    tokenizer: Any  # HFTextTokenizer | SyntheticTextTokenizer
    max_length: int


def check_model_dir(model: str | Path) -> None:
    """A finished jaxrl run directory or an HF checkpoint directory, or a one-line error naming it."""
    from jaxrl.models.hf import is_hf_dir

    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model {model}: no such directory")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {model} is neither a jaxrl run directory nor an HF checkpoint (no config.json)"
        )
    if not is_hf_dir(path) and not (path / "final" / "params").exists():
        raise ConfigError(f"model {model}: the run has not finished (no final/params)")


def tokenizer_from(directory: Path):
    """The tokenizer saved in a directory (a synthetic-world JSON or an HF tokenizer.json), or None."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    from jaxrl.synthetic.tokenizer import FORMAT, SyntheticTokenizer

    if isinstance(data, dict) and data.get("format") == FORMAT:
        return SyntheticTextTokenizer(SyntheticTokenizer.from_json(data), name=str(directory))
    from jaxrl.data.chat import HFChatTokenizer

    chat = HFChatTokenizer.from_dir(directory)
    clean = clean_up_spaces(directory, chat.tokenizer)
    return HFTextTokenizer(chat, name=str(directory), clean_up_spaces=clean)


def run_tokenizer(run_dir: Path, run_cfg):
    """A run's tokenizer: its own tokenizer.json, else its data.tokenizer, else its init_from's, else the
    synthetic world's for a synthetic run."""
    for candidate in (run_dir, run_cfg.data.tokenizer, run_cfg.train.init_from):
        if candidate and (tok := tokenizer_from(Path(candidate))) is not None:
            return tok
    if run_cfg.data.source == "synthetic":
        from jaxrl.synthetic import SyntheticTokenizer

        return SyntheticTextTokenizer(SyntheticTokenizer(), name="synthetic")
    raise ConfigError(
        f"{run_dir}: no tokenizer found (no tokenizer.json in it, its data.tokenizer or init_from); "
        "pass tokenizer=DIR"
    )


def load(
    source: str | Path,
    mesh,
    preset: str,
    *,
    dtype: str | None = None,
    tokenizer: str | None = None,
    max_length: int | None = None,
) -> LoadedModel:
    """A jaxrl run directory (finished) or an HF *ForCausalLM checkpoint directory, ready to evaluate.

    `dtype` overrides the compute dtype (params keep theirs); logits and log-probs are fp32 regardless."""
    from jaxrl import checkpoint
    from jaxrl.models import hf
    from jaxrl.models import init as model_init

    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"model {source}: no such directory")
    if hf.is_hf_dir(source):
        model_cfg, params = hf.load_hf(source, mesh=mesh, preset=preset, dtype=dtype or "float32")
        hf_config = hf.read_hf_config(source)
        tok = tokenizer_from(Path(tokenizer) if tokenizer else source)
        if tok is None:
            raise ConfigError(f"{source}: an HF checkpoint without tokenizer.json; pass tokenizer=DIR")
        length = max_length or hf_config.get("max_position_embeddings") or DEFAULT_MAX_LENGTH
    else:
        cfg_file = source / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(
                f"model {source} is neither a jaxrl run directory nor an HF checkpoint (no config.json)"
            )
        from jaxrl import config as config_lib

        run_cfg = config_lib.from_dict(json.loads(cfg_file.read_text()))
        if not checkpoint.final_params_dir(source).exists():
            raise ConfigError(f"model {source}: the run has not finished (no final/params)")
        params, model_cfg = model_init.load_run_params(source, mesh, preset)
        if dtype:
            model_cfg = dataclasses.replace(model_cfg, dtype=dtype)
        tok = tokenizer_from(Path(tokenizer)) if tokenizer else run_tokenizer(source, run_cfg)
        if tok is None:
            raise ConfigError(f"tokenizer {tokenizer}: no tokenizer.json there")
        length = max_length or DEFAULT_MAX_LENGTH
    if model_cfg.head != "lm":
        raise ConfigError(f"model {source} is a reward/value model (scalar head), not a language model")
    model_cfg = dataclasses.replace(model_cfg, remat="none")  # no backward pass: nothing to rematerialise
    graphdef, _ = model_init.abstract_model(model_cfg)
    return LoadedModel(str(source), graphdef, params, model_cfg, tok, int(length))
