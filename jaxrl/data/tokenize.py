"""Canonical records -> fixed-length token arrays with completion-only loss masks; truncation is counted.

Bounded memory on hostile rows: a message of megabytes is not tokenised in full only to keep data.max_len
tokens of it. Its text is cut first to the part the kept tokens can come from, on the side truncation keeps
(a prompt's end, a completion's or conversation's start), and the cut is counted ("texts cut before
tokenising"). The result is the same as tokenising in full: the ids then hold more than `keep` tokens
(`keep` = max_prompt_len for prompts, max_len otherwise), so truncation (or a drop, with the same reason)
follows as before, and the `keep` ids on the kept side are exactly the full text's. See `_cut_words` (the
synthetic tokenizer; exact) and HFChatTokenizer._encode_window (a checkpoint's tokenizer).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from jaxrl.data.records import Conversation, Message, Messages, PreferencePair, UnpairedExample
from jaxrl.synthetic.tokenizer import SyntheticTokenizer


class ChatTokenizer(Protocol):
    """What the pipeline needs of a tokenizer (synthetic or a checkpoint's own)."""

    vocab_size: int
    pad_id: int
    eos_id: int

    def encode_prompt(self, messages: Messages) -> list[int]: ...

    def encode_completion(self, messages: Messages) -> list[int]: ...

    def encode_conversation(self, messages: Messages) -> tuple[list[int], list[int]]: ...


class BoundedChatTokenizer(ChatTokenizer, Protocol):
    """A tokenizer that tokenises only the part of a long text that `keep` kept tokens come from.

    Each returns the plain method's ids (and mask), or, with cut True, more than `keep` of them of which the
    `keep` on the kept side (a prompt's last, a completion's or conversation's first) are the plain ones.
    """

    def encode_prompt_bounded(self, messages: Messages, keep: int) -> tuple[list[int], bool]: ...

    def encode_completion_bounded(self, messages: Messages, keep: int) -> tuple[list[int], bool]: ...

    def encode_conversation_bounded(
        self, messages: Messages, keep: int
    ) -> tuple[list[int], list[int], bool]: ...


@dataclasses.dataclass
class TokenizeStats:
    """How many examples were kept, cut or dropped, and why."""

    seen: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    text_cut: int = 0  # examples with a text cut before tokenising (see the module docstring)
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> str:
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"examples {self.seen} = kept {self.kept} + dropped {sum(self.dropped.values())} ({drops}); "
            f"prompts truncated {self.prompt_truncated}, completions truncated {self.completion_truncated}"
            f", texts cut before tokenising {self.text_cut}"
        )


_WORD = re.compile(r"\S+")  # the synthetic tokenizer's words: \s is str.split()'s whitespace


def _cut_words(text: str, n: int, side: str) -> str:
    """The shortest start (side "right") or end ("left") of text holding n of its words whole, so that its
    split() is text.split()[:n] (or [-n:]), all of it when it has fewer words.

    Exact for the synthetic tokenizer, whose ids are one per whitespace-separated word: a message cut so
    gives the same ids as in full up to (from) its n-th word, whatever the words' lengths. Memory: O(n)
    besides the cut text (match positions are kept for the last n + 1 words only).
    """
    if side == "right":
        for count, match in enumerate(_WORD.finditer(text), 1):
            if count == n:
                return text[: match.end()]
        return text
    size = 16 * n
    while True:
        start = max(0, len(text) - size)
        starts = collections.deque((m.start() for m in _WORD.finditer(text, start)), maxlen=n + 1)
        if len(starts) > n:  # the word starting at starts[0] may be cut by the window, the n after it not
            return text[starts[1] :]
        if start == 0:
            return text
        size *= 2


def _synthetic_cut(
    tok: SyntheticTokenizer, messages: Messages, keep: int, side: str
) -> tuple[Messages, bool]:
    """Messages with each long content cut to its keep + 1 words on the kept side, and whether any was.

    Only contents longer than (keep + 1) * (longest vocabulary word + 1) characters are looked at (a
    normal row is left alone), and a content is cut only where it has more than keep + 1 words. The cut
    message alone then gives more than keep ids, so the row is truncated (or dropped) as in full, and the
    keep ids kept are the full row's: a prompt keeps its end, so ids after the cut content's first word
    are the full prompt's last ones; a completion or conversation keeps its start, up to the content's
    (keep + 1)-th word.
    """
    bound = (keep + 1) * (max(map(len, tok.vocab)) + 1)
    out, cut = [], False
    for message in messages:
        if len(message.content) > bound:
            content = _cut_words(message.content, keep + 1, side)
            if len(content) < len(message.content):
                message, cut = Message(message.role, content), True
        out.append(message)
    return tuple(out), cut


def _encode_bounded(tok: ChatTokenizer, messages: Messages, keep: int, what: str) -> tuple[list[int], bool]:
    """(ids, cut) of a prompt (kept from the left) or a completion (from the right), tokenising only what
    truncation to `keep` tokens can keep."""
    bounded = getattr(tok, f"encode_{what}_bounded", None)
    if bounded is not None:
        return bounded(messages, keep)
    cut = False
    if isinstance(tok, SyntheticTokenizer):
        messages, cut = _synthetic_cut(tok, messages, keep, "left" if what == "prompt" else "right")
    return getattr(tok, f"encode_{what}")(messages), cut


def _encode_conversation(
    tok: ChatTokenizer, messages: Messages, keep: int
) -> tuple[list[int], list[int], bool]:
    if hasattr(tok, "encode_conversation_bounded"):
        return tok.encode_conversation_bounded(messages, keep)
    cut = False
    if isinstance(tok, SyntheticTokenizer):
        messages, cut = _synthetic_cut(tok, messages, keep, "right")
    return (*tok.encode_conversation(messages), cut)


def _fit(
    prompt: list[int],
    completion: list[int],
    max_len: int,
    max_prompt_len: int,
    policy: str,
    stats: TokenizeStats,
) -> tuple[list[int], list[int]] | None:
    """Applies the truncation policy to one prompt/completion; None means drop."""
    if len(prompt) > max_prompt_len:
        if policy == "drop":
            stats.dropped["prompt_too_long"] += 1
            return None
        stats.prompt_truncated += 1
        prompt = prompt[-max_prompt_len:]  # keep the end: the question closest to the answer
    if len(prompt) + len(completion) > max_len:
        if policy == "drop":
            stats.dropped["too_long"] += 1
            return None
        stats.completion_truncated += 1
        completion = completion[: max_len - len(prompt)]
    return prompt, completion


def _count_once(stats: TokenizeStats, cuts: TokenizeStats) -> None:
    # The rows of one example share a prompt (or a completion): each kind of cut counts once per example.
    stats.prompt_truncated += min(1, cuts.prompt_truncated)
    stats.completion_truncated += min(1, cuts.completion_truncated)
    stats.dropped.update(cuts.dropped)


def _row(prompt: list[int], completion: list[int], max_len: int, pad_id: int):
    tokens = np.full(max_len, pad_id, np.int32)
    mask = np.zeros(max_len, np.int8)
    ids = prompt + completion
    tokens[: len(ids)] = ids
    mask[len(prompt) : len(ids)] = 1
    return tokens, mask


def encode_pairs(
    pairs: Sequence[PreferencePair],
    tok: ChatTokenizer,
    *,
    max_len: int,
    max_prompt_len: int,
    truncation: str = "drop",
) -> tuple[dict[str, np.ndarray], TokenizeStats]:
    """Pairs -> {"tokens" [N,2,T], "loss_mask" [N,2,T] (1 on completions), "margin" [N]}; index 0 chosen."""
    stats = TokenizeStats()
    tokens, masks, margins = [], [], []
    for pair in pairs:
        stats.seen += 1
        prompt, text_cut = _encode_bounded(tok, pair.prompt, max_prompt_len, "prompt")
        rows, cuts = [], TokenizeStats()
        for completion in (pair.chosen, pair.rejected):
            completion, cut = _encode_bounded(tok, completion, max_len, "completion")
            text_cut |= cut
            fitted = _fit(prompt, completion, max_len, max_prompt_len, truncation, cuts)
            if fitted is None:
                break
            rows.append(_row(*fitted, max_len, tok.pad_id))
        stats.text_cut += text_cut
        _count_once(stats, cuts)
        if len(rows) < 2:
            continue
        if np.array_equal(rows[0][0], rows[1][0]):
            stats.dropped["identical_after_truncation"] += 1
            continue
        stats.kept += 1
        tokens.append([r[0] for r in rows])
        masks.append([r[1] for r in rows])
        margins.append(0.0 if pair.margin is None else float(pair.margin))
    arrays = {
        "tokens": np.asarray(tokens, np.int32).reshape(-1, 2, max_len),
        "loss_mask": np.asarray(masks, np.int8).reshape(-1, 2, max_len),
        "margin": np.asarray(margins, np.float32),
    }
    return arrays, stats


def encode_lists(
    lists: Sequence,
    tok: ChatTokenizer,
    *,
    k: int,
    max_len: int,
    max_prompt_len: int,
    truncation: str = "drop",
) -> tuple[dict[str, np.ndarray], TokenizeStats]:
    """Ranked lists (binarize.to_lists' (record, [(index, score)])) -> {"tokens" [N,K,T], "loss_mask"
    [N,K,T], "scores" [N,K] (higher is better), "list_mask" [N,K] (1.0 for a response, 0.0 for the padding
    of a shorter list)}. A response that does not fit (truncation "drop") leaves the list; a list left with
    fewer than two responses is dropped ("too_few_after_truncation")."""
    stats = TokenizeStats()
    tokens = np.full((len(lists), k, max_len), tok.pad_id, np.int32)
    masks = np.zeros((len(lists), k, max_len), np.int8)
    scores = np.zeros((len(lists), k), np.float32)
    list_mask = np.zeros((len(lists), k), np.float32)
    n = 0
    for record, scored in lists:
        stats.seen += 1
        prompt, text_cut = _encode_bounded(tok, record.prompt, max_prompt_len, "prompt")
        cuts, rows = TokenizeStats(), []
        for index, score in scored[:k]:
            completion, cut = _encode_bounded(tok, record.completions[index], max_len, "completion")
            text_cut |= cut
            fitted = _fit(prompt, completion, max_len, max_prompt_len, truncation, cuts)
            if fitted is not None:
                rows.append((*_row(*fitted, max_len, tok.pad_id), score))
        stats.text_cut += text_cut
        _count_once(stats, cuts)
        if len(rows) < 2:
            stats.dropped["too_few_after_truncation"] += 1
            continue
        stats.kept += 1
        for j, (row_tokens, row_mask, score) in enumerate(rows):
            tokens[n, j], masks[n, j], scores[n, j], list_mask[n, j] = row_tokens, row_mask, score, 1.0
        n += 1
    arrays = {"tokens": tokens[:n], "loss_mask": masks[:n], "scores": scores[:n], "list_mask": list_mask[:n]}
    return arrays, stats


def encode_unpaired(
    examples: Sequence[UnpairedExample],
    tok: ChatTokenizer,
    *,
    max_len: int,
    max_prompt_len: int,
    truncation: str = "drop",
) -> tuple[dict[str, np.ndarray], TokenizeStats]:
    """KTO examples -> {"tokens" [N,2,T], "loss_mask", "desirable" [N]}; row 1 pairs the completion with the
    next example's prompt (a fixed mismatched pair for the KL reference point)."""
    stats = TokenizeStats()
    encoded = [_encode_bounded(tok, e.prompt, max_prompt_len, "prompt") for e in examples]
    prompts, prompt_cut = [ids for ids, _ in encoded], [cut for _, cut in encoded]
    tokens, masks, labels = [], [], []
    for i, example in enumerate(examples):
        stats.seen += 1
        completion, cut = _encode_bounded(tok, example.completion, max_len, "completion")
        stats.text_cut += cut or prompt_cut[i]
        rows, cuts = [], TokenizeStats()
        for prompt in (prompts[i], prompts[(i + 1) % len(examples)]):
            fitted = _fit(prompt, completion, max_len, max_prompt_len, truncation, cuts)
            if fitted is None:
                break
            rows.append(_row(*fitted, max_len, tok.pad_id))
        _count_once(stats, cuts)
        if len(rows) < 2:
            continue
        stats.kept += 1
        tokens.append([r[0] for r in rows])
        masks.append([r[1] for r in rows])
        labels.append(1.0 if example.desirable else 0.0)
    arrays = {
        "tokens": np.asarray(tokens, np.int32).reshape(-1, 2, max_len),
        "loss_mask": np.asarray(masks, np.int8).reshape(-1, 2, max_len),
        "desirable": np.asarray(labels, np.float32),
    }
    return arrays, stats


def encode_conversations(
    conversations: Sequence[Conversation], tok: ChatTokenizer, *, max_len: int, truncation: str = "drop"
) -> tuple[dict[str, np.ndarray], TokenizeStats]:
    """SFT conversations -> {"tokens" [N,T], "loss_mask" [N,T]} with the loss on assistant tokens only."""
    stats = TokenizeStats()
    tokens, masks = [], []
    for conversation in conversations:
        stats.seen += 1
        ids, assistant_mask, cut = _encode_conversation(tok, conversation.messages, max_len)
        stats.text_cut += cut
        if len(ids) > max_len:
            if truncation == "drop":
                stats.dropped["too_long"] += 1
                continue
            stats.completion_truncated += 1
            ids, assistant_mask = ids[:max_len], assistant_mask[:max_len]
        if not any(assistant_mask):
            stats.dropped["no_assistant_tokens"] += 1
            continue
        stats.kept += 1
        row = np.full(max_len, tok.pad_id, np.int32)
        row[: len(ids)] = ids
        mask = np.zeros(max_len, np.int8)
        mask[: len(ids)] = assistant_mask
        tokens.append(row)
        masks.append(mask)
    arrays = {
        "tokens": np.asarray(tokens, np.int32).reshape(-1, max_len),
        "loss_mask": np.asarray(masks, np.int8).reshape(-1, max_len),
    }
    return arrays, stats
