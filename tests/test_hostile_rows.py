"""Bounded memory on hostile rows: a message of megabytes is cut before tokenising to what the kept tokens can
come from, with the same arrays and counts as tokenising it in full and truncating (the reference here is
tokenize.py with its encoders swapped for the plain full-text ones), and the cut counted in the report.

Measured (tracemalloc peak while tokenising one pair with a 10 MB prompt and a 10 MB response, max_len 64):
before, 134 MB with the synthetic tokenizer and 313 MB (and a minute) with the byte-level BPE below; after,
under 0.1 MB and 20 MB (the chat template's rendering of the prompt, which is all).
"""

import random
import tracemalloc

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxrl.data import tokenize
from jaxrl.data.chat import HFChatTokenizer
from jaxrl.data.records import Conversation, PreferencePair, UnpairedExample, messages
from jaxrl.synthetic import make_preference_dataset, make_sft_dataset
from jaxrl.synthetic.tokenizer import SyntheticTokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine, they say.",
    "Hello there, how are you today? I am fine, thanks!",
    "What is 2 + 2? The answer is 4.",
    "<|user|>\n<|assistant|>\n<|system|>\n",
]
SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# Llama 3 Instruct's format (trims each content), as in tests/test_chat.py.
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MAX_LEN, MAX_PROMPT_LEN = 64, 24
MB = 1_000_000


def _bpe(template=None):
    """A byte-level BPE trained on a few sentences (the Tulu 2 fallback template, or `template`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    bos = "<|begin_of_text|>" if template else "<s>"
    specials = {"bos_token": bos, "eos_token": "</s>", "pad_token": "<pad>"}
    return HFChatTokenizer(tok, chat_template=template, special_tokens=specials)


def _wordlevel():
    """Whole words or <unk>: one token can cover any number of characters."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS, show_progress=False))
    return HFChatTokenizer(tok, special_tokens={"eos_token": "</s>", "pad_token": "<pad>"})


TOKENIZERS = {
    "synthetic": SyntheticTokenizer,
    "bpe": _bpe,
    "bpe_llama3": lambda: _bpe(LLAMA3),
    "wordlevel": _wordlevel,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def _words(tok):
    if isinstance(tok, SyntheticTokenizer):
        # Digits, the world's words, a literal special token and an unknown word.
        return list(tok.vocab[7:]) + ["<bos>", "unknown-word"]
    return " ".join(CORPUS[:4]).split() + ["zebra", "\n", "  "]


def _text(tok, n, seed):
    """n characters of words in random order (a 1,000-word block repeated)."""
    words = _words(tok)
    block = " ".join(random.Random(seed).choice(words) for _ in range(1000)) + " "
    return (block * (n // len(block) + 1))[:n]


def _pair(prompt, chosen, rejected="short answer", system=None):
    turns = (("system", system),) if system is not None else ()
    return PreferencePair(
        messages(*turns, ("user", prompt)), messages(("assistant", chosen)), messages(("assistant", rejected))
    )


def _plain(monkeypatch):
    """tokenize.py as before: every text tokenised in full, then truncated."""
    patch = monkeypatch.setattr
    patch(tokenize, "_encode_bounded", lambda tok, m, keep, what: (getattr(tok, f"encode_{what}")(m), False))
    patch(tokenize, "_encode_conversation", lambda tok, m, keep: (*tok.encode_conversation(m), False))


def _encode(kind, records, tok, truncation):
    if kind == "pairs":
        return tokenize.encode_pairs(
            records, tok, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT_LEN, truncation=truncation
        )
    if kind == "unpaired":
        return tokenize.encode_unpaired(
            records, tok, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT_LEN, truncation=truncation
        )
    return tokenize.encode_conversations(records, tok, max_len=MAX_LEN, truncation=truncation)


def _reference(monkeypatch, kind, records, tok, truncation):
    with monkeypatch.context() as m:
        _plain(m)
        return _encode(kind, records, tok, truncation)


def _assert_same(got, want):
    (arrays, stats), (ref_arrays, ref_stats) = got, want
    assert arrays.keys() == ref_arrays.keys()
    for key in arrays:
        np.testing.assert_array_equal(arrays[key], ref_arrays[key], err_msg=key)
    for field in ("seen", "kept", "prompt_truncated", "completion_truncated", "dropped"):
        assert getattr(stats, field) == getattr(ref_stats, field), field


def _rows(tok, n):
    """Hostile rows of n characters (dense, sparse in tokens, several turns) and normal ones, per kind."""
    dense, other = _text(tok, n, 1), _text(tok, n, 2)
    unknown = "z" * n  # one word: a single <unk> (synthetic, wordlevel) or many BPE tokens
    spaces_then_words = " " * n + _text(tok, 300, 3)  # long in characters, few tokens
    words_then_spaces = _text(tok, 300, 4) + "\n" * n
    normal = _text(tok, 150, 5)
    pairs = [
        _pair(dense, other),  # both cut
        _pair(normal, dense),  # response cut
        _pair(dense, normal, normal + " no"),  # prompt cut, responses fit
        _pair(normal, unknown),
        _pair(spaces_then_words, words_then_spaces),
        _pair(words_then_spaces, spaces_then_words, unknown),
        _pair(normal, other, system=dense),  # a long earlier turn of the prompt
        # A long word first: the first window holds too few tokens (one <unk>), a larger one is cut.
        _pair(dense[: n // 2] + " " + unknown[: n // 2], unknown[: n // 2] + " " + dense[: n // 2]),
        _pair("hi", "hello"),
        _pair(normal, normal, "no"),
    ]
    unpaired = [UnpairedExample(p.prompt, p.chosen, desirable=i % 2 == 0) for i, p in enumerate(pairs)]
    conversations = [
        Conversation(p.prompt + p.chosen + messages(("user", "more?"), ("assistant", other))) for p in pairs
    ]
    return {"pairs": pairs, "unpaired": unpaired, "conversations": conversations}


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
@pytest.mark.parametrize("kind", ["pairs", "unpaired", "conversations"])
def test_cut_rows_give_the_arrays_and_counts_of_full_tokenisation(tok, monkeypatch, kind, truncation):
    records = _rows(tok, 200_000)[kind]
    got = _encode(kind, records, tok, truncation)
    _assert_same(got, _reference(monkeypatch, kind, records, tok, truncation))
    assert got[1].text_cut >= 2  # the dense rows at least


def test_the_cut_count_is_in_the_report(tok):
    rows = _rows(tok, 200_000)["pairs"]
    _, stats = _encode("pairs", [rows[0], rows[-2], rows[1]], tok, "truncate")
    assert stats.text_cut == 2 and stats.completion_truncated == 2
    assert "texts cut before tokenising 2" in stats.summary()
    _, stats = _encode("pairs", rows[:1], tok, "drop")
    assert stats.text_cut == 1 and dict(stats.dropped) == {"prompt_too_long": 1}
    assert "texts cut before tokenising 1" in stats.summary()


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_a_10mb_prompt_and_response_cost_a_bounded_multiple_of_their_size(tok, monkeypatch, truncation):
    prompt, response = _text(tok, 10 * MB, 1), _text(tok, 10 * MB, 2)
    row = _pair(prompt, response, system="Be brief.")
    tracemalloc.start()
    try:
        arrays, stats = _encode("pairs", [row], tok, truncation)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    row_size = len(prompt) + len(response)
    assert peak < 2 * row_size, f"peak {peak / MB:.1f} MB for a {row_size / MB:.0f} MB row"
    assert stats.text_cut == 1
    # The kept tokens come from the prompt's last and the response's first 200 KB: full tokenisation of those
    # gives the same arrays.
    small = _pair(prompt[-200_000:], response[:200_000], system="Be brief.")
    _assert_same((arrays, stats), _reference(monkeypatch, "pairs", [small], tok, truncation))
    if truncation == "drop":
        assert dict(stats.dropped) == {"prompt_too_long": 1}
    else:
        assert stats.kept == stats.prompt_truncated == stats.completion_truncated == 1


@pytest.mark.parametrize("kind", ["pairs", "unpaired", "conversations"])
def test_normal_rows_are_not_cut_and_unchanged(tok, monkeypatch, kind):
    short, prompt, response = _text(tok, 150, 6), _text(tok, 340, 7), _text(tok, 900, 8)
    # Texts of a few hundred characters, long in tokens (truncated or dropped) but within the bounds.
    pairs = [
        _pair(prompt, response),
        _pair(short, response, prompt),
        _pair(prompt, short),
        _pair("hi", "hello"),
    ]
    conversations = [Conversation(messages(("user", short), ("assistant", response)))]
    conversations += [Conversation(p.prompt + p.chosen) for p in pairs]
    if isinstance(tok, SyntheticTokenizer):  # and the synthetic world's own data
        pairs += make_preference_dataset("clean", 64, seed=0)
        conversations += make_sft_dataset(64, seed=0)
    unpaired = [UnpairedExample(p.prompt, p.chosen, i % 2 == 0) for i, p in enumerate(pairs)]
    records = {"pairs": pairs, "unpaired": unpaired, "conversations": conversations}[kind]
    for truncation in ("truncate", "drop"):
        got = _encode(kind, records, tok, truncation)
        assert got[1].text_cut == 0
        assert got[1].prompt_truncated + got[1].completion_truncated + len(got[1].dropped) > 0
        _assert_same(got, _reference(monkeypatch, kind, records, tok, truncation))
