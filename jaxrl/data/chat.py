"""A checkpoint's own tokenizer and chat template (tokenizer.json + tokenizer_config.json), rendered as
transformers' `apply_chat_template` does, behind the same interface as the synthetic tokenizer.

Prompt/completion splits come from one rendering of the whole conversation: the completion is whatever
the template renders after the prompt (with its generation prompt). So the BOS is never doubled (only the
template emits it, as with `apply_chat_template`, which tokenizes with add_special_tokens=False) and a
template's system prompt (default or given) is never repeated in the completion. A template whose rendered
prompt is not a prefix of the rendered conversation (e.g. one that rewrites earlier turns) is refused with
ChatTemplateError.

The `*_bounded` methods give the same ids where a caller keeps only `keep` tokens of them (the pipeline's
truncation), while tokenising only the part of the rendered text those tokens can come from (see
`_encode_window`): a megabytes-long message costs its rendering, not millions of token ids.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from jaxrl.data.records import Message

# The Tulu 2 format (open-instruct), for checkpoints without a template. `<|role|>` tags are plain text; an
# assistant turn ends with the eos token and a newline; the generation prompt is "<|assistant|>\n".
TULU2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# The fallback starts with the bos token when the tokenizer adds one by default (Llama 2, as Tulu 2 did).
TULU2_TEMPLATE_WITH_BOS = "{{ bos_token }}" + TULU2_TEMPLATE

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# encode_completion renders a completion after this prompt when none is given.
PLACEHOLDER_PROMPT = (Message("user", "Hi"),)
# Characters between a window's cut and the tokens taken from it (`_encode_window`).
CUT_MARGIN = 1024


class ChatTemplateError(ValueError):
    """A chat template that fails to render or cannot split prompt from completion."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja's tojson, which escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (some templates mark assistant text) as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled with transformers' jinja settings (sandboxed, trim_blocks, lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _as_dict(message: Message | Mapping | Sequence) -> dict[str, str]:
    if isinstance(message, Message):
        return {"role": message.role, "content": message.content}
    if isinstance(message, Mapping):
        return {k: v for k, v in message.items() if v is not None}
    role, content = message
    return {"role": role, "content": content}


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _read_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """The chat template: chat_template.jinja, chat_template.json, or tokenizer_config's (named 'default')."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text()).get("chat_template", template)
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template or None


class HFChatTokenizer:
    """A checkpoint's tokenizer with its chat template (or the Tulu 2 format when it has none)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        add_bos_token: bool | None = None,
    ):
        self.tokenizer = tokenizer
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        if "eos_token" not in self.special_tokens:
            raise ChatTemplateError("the tokenizer has no eos_token (set it in tokenizer_config.json)")
        for name, token in self.special_tokens.items():
            if name in ("bos_token", "eos_token", "pad_token") and tokenizer.token_to_id(token) is None:
                raise ChatTemplateError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        if add_bos_token is None:
            # Like the HF tokenizer: a post-processor that prepends bos means "adds bos".
            probe = tokenizer.encode("a", add_special_tokens=True).ids
            add_bos_token = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self.add_bos_token = add_bos_token
        self.is_fallback = chat_template is None
        if chat_template is None:
            chat_template = (
                TULU2_TEMPLATE_WITH_BOS if add_bos_token and self.bos_id is not None else TULU2_TEMPLATE
            )
        self.chat_template = chat_template
        self._template = compile_template(chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> HFChatTokenizer:
        """Reads tokenizer.json, tokenizer_config.json (+ special_tokens_map.json, chat_template.jinja)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (path / name).is_file():
                config.update(
                    {k: v for k, v in json.loads((path / name).read_text()).items() if v is not None}
                )
        specials = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        return cls(
            Tokenizer.from_file(str(path / "tokenizer.json")),
            chat_template=_read_template(path, config),
            special_tokens=specials,
            add_bos_token=config.get("add_bos_token"),
        )

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_id(self) -> int:
        return self._id("eos_token")

    @property
    def has_pad_token(self) -> bool:
        return "pad_token" in self.special_tokens

    @property
    def pad_id(self) -> int:
        """The pad token's id, or eos's when the tokenizer has none (padding is always masked out)."""
        return self._id("pad_token") if self.has_pad_token else self.eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens added around it (special tokens in it are matched)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of text one token covers at most: its longest vocabulary entry (byte-level entries
        have a symbol per byte, so at least one per character), unknown tokens and characters a normalizer
        deletes aside. Sizes the first window `_encode_window` tries."""
        return max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def _encode_window(self, text: str, n: int, side: str) -> tuple[list[int], bool]:
        """(ids, cut): the first (side "right") or last ("left") n ids of text, from tokenising only a
        window at that end of it (cut True), or all of text's ids when it is not longer than the window.

        The first window holds n * max_token_chars + CUT_MARGIN characters, so in text without unknown
        tokens n tokens end (start) CUT_MARGIN characters before the cut at least. They are taken only when
        their offsets show that they do, else the window doubles (up to the whole text: unknown tokens
        covering long words, or deleted characters). Exactness rests on one property of the tokenizer:
        cutting a text changes no token more than CUT_MARGIN characters away from the cut. That holds for
        `tokenizers` pipelines whose pre-tokenizer splits words (ByteLevel/GPT-2 and Llama 3 regexes,
        Whitespace, BERT, Metaspace): the model tokenizes each pre-token alone, and normalizers, added-token
        matching and pre-token splits only look at nearby characters, so a cut changes the pre-token it
        falls in; a pre-token (a run without whitespace) longer than the margin is the exception, exact as
        far as BPE merges or unigram segmentations do not propagate over CUT_MARGIN characters.
        """
        size = n * self.max_token_chars + CUT_MARGIN
        while size < len(text):
            window = text[:size] if side == "right" else text[-size:]
            encoding = self.tokenizer.encode(window, add_special_tokens=False)
            total = len(encoding)
            if total >= n:
                # Offsets of the last token taken (right) or of the first (left), in window characters.
                span = encoding.token_to_chars(n - 1 if side == "right" else total - n)
                if span and (span[1] <= size - CUT_MARGIN if side == "right" else span[0] >= CUT_MARGIN):
                    encoding.truncate(n, direction=side)
                    return encoding.ids, True
            size *= 2
        return self.encode(text), False

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids up to the first eos."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The chat template's text for messages (as transformers' apply_chat_template(tokenize=False))."""
        try:
            return self._template.render(
                messages=[_as_dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from e

    def _split(
        self, head_text: str, full_text: str, full_ids: list[int], what: str, window: bool = False
    ) -> int:
        """How many of full_ids belong to head_text; an error if head is not a prefix in text and tokens.
        With window, full_ids are full_text's first ids only (`_encode_window`): the head's ids are
        counted and checked as far as those go."""
        if not full_text.startswith(head_text):
            raise ChatTemplateError(
                f"the chat template is not prefix-stable: the rendered {what} is not a prefix of the "
                f"rendered conversation, so prompt and completion cannot be split.\n{what}: {head_text!r}\n"
                f"conversation: {full_text!r}"
            )
        if window:
            head_ids = self._encode_window(head_text, len(full_ids), "right")[0][: len(full_ids)]
        else:
            head_ids = self.encode(head_text)
        if full_ids[: len(head_ids)] != head_ids:
            raise ChatTemplateError(
                f"tokens merge across the end of the rendered {what} ({head_text[-20:]!r}), so its tokens "
                "are not a prefix of the conversation's"
            )
        return len(head_ids)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of the prompt, ending with the template's generation prompt (e.g. the assistant header)."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def encode_prompt_bounded(self, messages: Sequence[Message], keep: int) -> tuple[list[int], bool]:
        """(ids, cut): encode_prompt's ids, or (cut) its last keep + 1 ids from tokenising only the end of
        the rendered prompt, when the prompt is too long to matter beyond them (it is kept from the end)."""
        return self._encode_window(self.render(messages, add_generation_prompt=True), keep + 1, "left")

    def encode_pair(
        self, prompt: Sequence[Message], completion: Sequence[Message]
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) that concatenate to exactly the rendering of prompt + completion."""
        prompt_text = self.render(prompt, add_generation_prompt=True)
        full_text = self.render(tuple(prompt) + tuple(completion))
        full_ids = self.encode(full_text)
        cut = self._split(prompt_text, full_text, full_ids, "prompt")
        return full_ids[:cut], full_ids[cut:]

    def encode_pair_bounded(
        self, prompt: Sequence[Message], completion: Sequence[Message], keep: int
    ) -> tuple[list[int], list[int], bool]:
        """(prompt ids, completion ids, cut): encode_pair's, or (cut) with only the first keep + 1
        completion ids, from tokenising only the start of the rendered conversation."""
        prompt_text = self.render(prompt, add_generation_prompt=True)
        full_text = self.render(tuple(prompt) + tuple(completion))
        n = len(self.encode(prompt_text)) + keep + 1
        full_ids, window = self._encode_window(full_text, n, "right")
        cut = self._split(prompt_text, full_text, full_ids, "prompt", window)
        return full_ids[:cut], full_ids[cut:], window

    def encode_completion(
        self, messages: Sequence[Message], prompt: Sequence[Message] | None = None
    ) -> list[int]:
        """Ids of the assistant turn(s) as rendered after `prompt` (default: a short user turn), eos included.

        Templates render an assistant turn independently of the prompt before it (Llama 3, ChatML, Tulu), so
        the default gives the ids that follow any prompt; pass `prompt` for a template where it differs.
        """
        if not messages or _as_dict(messages[0])["role"] != "assistant":
            raise ValueError("a completion must start with an assistant turn")
        return self.encode_pair(PLACEHOLDER_PROMPT if prompt is None else prompt, messages)[1]

    def encode_completion_bounded(
        self, messages: Sequence[Message], keep: int, prompt: Sequence[Message] | None = None
    ) -> tuple[list[int], bool]:
        """(ids, cut): encode_completion's ids, or (cut) its first keep + 1 (a completion is kept from the
        start), from tokenising only the start of the rendering."""
        if not messages or _as_dict(messages[0])["role"] != "assistant":
            raise ValueError("a completion must start with an assistant turn")
        _, ids, cut = self.encode_pair_bounded(
            PLACEHOLDER_PROMPT if prompt is None else prompt, messages, keep
        )
        return ids, cut

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask) of a whole conversation; the mask is 1 on each assistant turn's tokens (as
        a completion after the preceding turns: content, end-of-turn tokens and eos), 0 elsewhere."""
        return self._encode_conversation(messages, None)[:2]

    def encode_conversation_bounded(
        self, messages: Sequence[Message], keep: int
    ) -> tuple[list[int], list[int], bool]:
        """(ids, assistant_mask, cut): encode_conversation's, or (cut) their first keep + 1 (a conversation
        is kept from the start), from tokenising only the start of the rendering."""
        return self._encode_conversation(messages, keep)

    def _encode_conversation(
        self, messages: Sequence[Message], keep: int | None
    ) -> tuple[list[int], list[int], bool]:
        messages = tuple(messages)
        full_text = self.render(messages)
        if keep is None:
            ids, window = self.encode(full_text), False
        else:
            ids, window = self._encode_window(full_text, keep + 1, "right")
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if _as_dict(message)["role"] != "assistant":
                continue
            start = self._split(
                self.render(messages[:i], add_generation_prompt=True), full_text, ids, "prompt", window
            )
            end = self._split(self.render(messages[: i + 1]), full_text, ids, "conversation so far", window)
            mask[start:end] = [1] * (end - start)
        return ids, mask, window

    def __repr__(self) -> str:
        template = "tulu2 fallback" if self.is_fallback else "own template"
        return f"HFChatTokenizer(vocab_size={self.vocab_size}, {template})"
