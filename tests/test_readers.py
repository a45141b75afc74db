"""Readers, binarisation and mixtures on small files in each dataset's real schema (dataset cards)."""

from __future__ import annotations

import collections
import copy
import gzip
import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrl.data.binarize import binarize, reduce_rating, to_unpaired
from jaxrl.data.mixture import mix
from jaxrl.data.readers import READERS, ReadResult, iter_rows, read
from jaxrl.data.records import (
    Conversation,
    PreferencePair,
    PromptRecord,
    RatedCompletions,
    RecordError,
    UnpairedExample,
    messages,
)
from jaxrl.data.tfds_builder import record_to_json


def msg(role, content):
    return {"role": role, "content": content}


def one(role, content):
    return messages((role, content))


# Rows in each dataset's real schema, and the exact records they must give.

SYSTEM = "Tu es un assistant serviable."
TULU_ROWS = [
    {
        "chosen": [
            msg("system", SYSTEM),
            msg("user", "Écris un haïku sur Kyoto 京都"),
            msg("assistant", "Temples dans la brume 🍵"),
            msg("user", "Encore un, plus court ?"),
            msg("assistant", "Mousse, pluie, silence."),
        ],
        "rejected": [
            msg("system", SYSTEM),
            msg("user", "Écris un haïku sur Kyoto 京都"),
            msg("assistant", "Temples dans la brume 🍵"),
            msg("user", "Encore un, plus court ?"),
            msg("assistant", "Non."),
        ],
        "source": "capybara",
    },
    {
        "chosen": [msg("user", "2+2?"), msg("assistant", "4")],
        "rejected": [msg("user", "2+2?"), msg("assistant", "5")],
        "source": "ultrafeedback_mean_aspects",
    },
]
TULU_EXPECTED = [
    PreferencePair(
        prompt=messages(
            ("system", SYSTEM),
            ("user", "Écris un haïku sur Kyoto 京都"),
            ("assistant", "Temples dans la brume 🍵"),
            ("user", "Encore un, plus court ?"),
        ),
        chosen=one("assistant", "Mousse, pluie, silence."),
        rejected=one("assistant", "Non."),
        source="capybara",
    ),
    PreferencePair(
        one("user", "2+2?"), one("assistant", "4"), one("assistant", "5"), source="ultrafeedback_mean_aspects"
    ),
]


def uf_completion(response, ratings, overall, fine, model):
    aspects = dict(
        zip(("helpfulness", "honesty", "instruction_following", "truthfulness"), ratings, strict=True)
    )
    annotations = {
        name: {"Rating": rating, "Rationale": f"{name} rationale", "Rationale For Rating": "…", "Type": ["1"]}
        for name, rating in aspects.items()
    }
    return {
        "annotations": annotations,
        "critique": "Good, but could be more concise.",
        "custom_system_prompt": "You are an AI assistant that values honesty.",
        "fine-grained_score": fine,
        "model": model,
        "overall_score": overall,
        "principle": "honesty",
        "response": response,
    }


UF_ROWS = [
    {
        "source": "evol_instruct",
        "instruction": "用一句话解释量子纠缠。",
        "models": ["gpt-4", "llama-2-7b-chat"],
        "completions": [
            uf_completion(
                "两个粒子的状态相互关联，无论相距多远。",
                ["5", "4", "5", "N/A"],
                8.5,
                4.666666666666667,
                "gpt-4",
            ),
            uf_completion("量子纠缠就是魔法 ✨", ["2", "2", "3", "1"], 3.0, 2.0, "llama-2-7b-chat"),
        ],
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
    }
]
UF_EXPECTED = [
    RatedCompletions(
        prompt=one("user", "用一句话解释量子纠缠。"),
        completions=(
            one("assistant", "两个粒子的状态相互关联，无论相距多远。"),
            one("assistant", "量子纠缠就是魔法 ✨"),
        ),
        ratings=(
            {
                "helpfulness": 5.0,
                "honesty": 4.0,
                "instruction_following": 5.0,
                "overall": 8.5,
                "fine_grained": 4.666666666666667,
            },
            {
                "helpfulness": 2.0,
                "honesty": 2.0,
                "instruction_following": 3.0,
                "truthfulness": 1.0,
                "overall": 3.0,
                "fine_grained": 2.0,
            },
        ),
        source="ultrafeedback",
    )
]

UFB_ROWS = [
    {
        "prompt": "Résume « Les Misérables » en une phrase.",
        "prompt_id": "9c1f0a",
        "chosen": [
            msg("user", "Résume « Les Misérables » en une phrase."),
            msg("assistant", "Jean Valjean se rachète."),
        ],
        "rejected": [
            msg("user", "Résume « Les Misérables » en une phrase."),
            msg("assistant", "C'est un livre."),
        ],
        "messages": [
            msg("user", "Résume « Les Misérables » en une phrase."),
            msg("assistant", "Jean Valjean se rachète."),
        ],
        "score_chosen": 8.5,
        "score_rejected": 6.0,
    }
]
UFB_EXPECTED = [
    PreferencePair(
        one("user", "Résume « Les Misérables » en une phrase."),
        one("assistant", "Jean Valjean se rachète."),
        one("assistant", "C'est un livre."),
        margin=2.5,
        source="ultrafeedback_binarized",
        id="9c1f0a",
    )
]

HH_PREFIX = "\n\nHuman: Hola, ¿qué tal?\n\nAssistant: Bien, ¿y tú?\n\nHuman: What's 2+2? 🤔"
HH_ROWS = [
    {"chosen": HH_PREFIX + "\n\nAssistant: 4.", "rejected": HH_PREFIX + "\n\nAssistant: 22, obviously."}
]
HH_EXPECTED = [
    PreferencePair(
        messages(("user", "Hola, ¿qué tal?"), ("assistant", "Bien, ¿y tú?"), ("user", "What's 2+2? 🤔")),
        one("assistant", "4."),
        one("assistant", "22, obviously."),
        source="hh_rlhf",
    )
]


def shp_row(post_id, label, score_a, score_b):
    return {
        "post_id": post_id,
        "domain": "askculinary_train",
        "upvote_ratio": 0.96,
        "history": "Why does my crème brûlée crack? 🍮",
        "c_root_id_A": "c1",
        "c_root_id_B": "c2",
        "created_at_utc_A": 1625000000,
        "created_at_utc_B": 1624990000,
        "score_A": score_a,
        "score_B": score_b,
        "human_ref_A": "Bake it in a water bath.",
        "human_ref_B": "Lower the oven temperature.",
        "labels": label,
        "seconds_difference": 10000.0,
        "score_ratio": max(score_a, score_b) / min(score_a, score_b),
    }


SHP_ROWS = [shp_row("o8x1", 1, 12, 3), shp_row("o8x2", 0, 2, 10)]
SHP_EXPECTED = [
    PreferencePair(
        one("user", "Why does my crème brûlée crack? 🍮"),
        one("assistant", "Bake it in a water bath."),
        one("assistant", "Lower the oven temperature."),
        margin=math.log(4.0),
        source="shp",
        id="o8x1",
    ),
    PreferencePair(
        one("user", "Why does my crème brûlée crack? 🍮"),
        one("assistant", "Lower the oven temperature."),
        one("assistant", "Bake it in a water bath."),
        margin=math.log(5.0),
        source="shp",
        id="o8x2",
    ),
]


def hs(prompt, response, *scores):
    names = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    return {"prompt": prompt, "response": response, **dict(zip(names, scores, strict=True))}


def hs_rating(*scores):
    names = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    return dict(zip(names, map(float, scores), strict=True))


HS2_PROMPT = "c# là gì?\n<extra_id_1>Assistant\nMột ngôn ngữ lập trình.\n<extra_id_1>User\nCho ví dụ 🙏"
HELPSTEER_ROWS = [
    hs("c#", "C# is a language by Microsoft.", 3, 4, 4, 2, 1),
    hs(HS2_PROMPT, 'Console.WriteLine("Xin chào");', 4, 4, 4, 2, 1),
    hs("c#", "A musical note.", 1, 2, 3, 0, 0),
]
HELPSTEER_EXPECTED = [
    RatedCompletions(
        one("user", "c#"),
        (one("assistant", "C# is a language by Microsoft."), one("assistant", "A musical note.")),
        (hs_rating(3, 4, 4, 2, 1), hs_rating(1, 2, 3, 0, 0)),
        source="helpsteer",
    ),
    RatedCompletions(
        messages(("user", "c# là gì?"), ("assistant", "Một ngôn ngữ lập trình."), ("user", "Cho ví dụ 🙏")),
        (one("assistant", 'Console.WriteLine("Xin chào");'),),
        (hs_rating(4, 4, 4, 2, 1),),
        source="helpsteer",
    ),
]

NECTAR_MODELS = (
    "gpt-4",
    "gpt-3.5-turbo",
    "mistral-7b",
    "llama-2-7b",
    "gpt-3.5-turbo-instruct",
    "anthropic",
    "vicuna",
)
NECTAR_ROWS = [
    {
        "prompt": "\n\nHuman: Nenne eine Primzahl.\n\nAssistant: 7."
        "\n\nHuman: Und eine gerade? 😊\n\nAssistant:",
        "answers": [
            {"answer": f"Antwort {rank}: 2", "model": model, "rank": rank}
            for rank, model in zip((3, 1, 2, 7, 5, 4, 6), NECTAR_MODELS, strict=True)
        ],
        "turns": 2,
        "num_responses": 7,
        "source": ["sharegpt"],
        "good_natured": True,
    }
]
NECTAR_EXPECTED = [
    RatedCompletions(
        messages(("user", "Nenne eine Primzahl."), ("assistant", "7."), ("user", "Und eine gerade? 😊")),
        tuple(one("assistant", f"Antwort {rank}: 2") for rank in (3, 1, 2, 7, 5, 4, 6)),
        (-3.0, -1.0, -2.0, -7.0, -5.0, -4.0, -6.0),
        source="nectar",
    )
]


def arena_row(question_id, winner, turns_a, turns_b):
    moderation = {"categories": {"harassment": False, "hate": False}, "category_scores": {"harassment": 0.01}}
    return {
        "question_id": question_id,
        "model_a": "vicuna-13b",
        "model_b": "koala-13b",
        "winner": winner,
        "judge": "arena_user_973",
        "conversation_a": turns_a,
        "conversation_b": turns_b,
        "turn": sum(m["role"] == "user" for m in turns_a),
        "anony": True,
        "language": "Chinese",
        "tstamp": 1682351591.1322,
        "openai_moderation": {"categories": moderation["categories"], "flagged": False},
        "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.01}},
    }


ARENA_ROWS = [
    arena_row(
        "q1",
        "model_b",
        [
            msg("user", "你好"),
            msg("assistant", "你好！"),
            msg("user", "讲个笑话"),
            msg("assistant", "不会。"),
        ],
        [
            msg("user", "你好"),
            msg("assistant", "您好 👋"),
            msg("user", "讲个笑话"),
            msg("assistant", "为什么程序员…"),
        ],
    ),
    arena_row(
        "q2",
        "tie (bothbad)",
        [msg("user", "hi"), msg("assistant", "a")],
        [msg("user", "hi"), msg("assistant", "b")],
    ),
    arena_row(
        "q3",
        "model_a",
        [msg("user", "hi"), msg("assistant", "hello")],
        [msg("user", "hi"), msg("assistant", "?")],
    ),
]
ARENA_EXPECTED = [
    PreferencePair(
        one("user", "你好"),
        messages(("assistant", "您好 👋"), ("user", "讲个笑话"), ("assistant", "为什么程序员…")),
        messages(("assistant", "你好！"), ("user", "讲个笑话"), ("assistant", "不会。")),
        source="chatbot_arena",
        id="q1",
    ),
    PreferencePair(
        one("user", "hi"), one("assistant", "hello"), one("assistant", "?"), source="chatbot_arena", id="q3"
    ),
]

PROMPT_ROWS = [
    {"prompt": "Natalia a vendu 48 clips… combien en tout ?", "ground_truth": "72", "id": "gsm8k-0"},
    {
        "messages": [msg("system", "Réponds en chiffres."), msg("user", "3×4 ? 🧮")],
        "answer": "12",
        "id": "gsm8k-1",
    },
    {"prompt": "Write a poem about the sea.", "id": "chat-7"},
]
PROMPT_EXPECTED = [
    PromptRecord(one("user", "Natalia a vendu 48 clips… combien en tout ?"), "72", "prompts", "gsm8k-0"),
    PromptRecord(
        messages(("system", "Réponds en chiffres."), ("user", "3×4 ? 🧮")), "12", "prompts", "gsm8k-1"
    ),
    PromptRecord(one("user", "Write a poem about the sea."), None, "prompts", "chat-7"),
]

SFT_ROWS = [
    {
        "id": "oasst-1",
        "messages": [
            msg("system", SYSTEM),
            msg("user", "Traduis « chat » en japonais."),
            msg("assistant", "猫 (neko) 🐱"),
            msg("user", "Et « chien » ?"),
            msg("assistant", "犬 (inu)"),
        ],
    }
]
SFT_EXPECTED = [
    Conversation(
        messages(
            ("system", SYSTEM),
            ("user", "Traduis « chat » en japonais."),
            ("assistant", "猫 (neko) 🐱"),
            ("user", "Et « chien » ?"),
            ("assistant", "犬 (inu)"),
        ),
        "sft",
        "oasst-1",
    )
]

UNPAIRED_ROWS = [
    {"prompt": "¿Capital de Francia?", "completion": "París 🇫🇷", "label": True},
    {"prompt": "¿Capital de Francia?", "completion": "Roma", "label": False},
]
UNPAIRED_EXPECTED = [
    UnpairedExample(one("user", "¿Capital de Francia?"), one("assistant", "París 🇫🇷"), True, "unpaired"),
    UnpairedExample(one("user", "¿Capital de Francia?"), one("assistant", "Roma"), False, "unpaired"),
]

# TRL's dataset formats (huggingface.co/docs/trl/dataset_formats). Conversational, with an explicit prompt and
# (Skywork-Reward-Preference-80K's layout) an implicit one; the standard (string) kind is tested below.
TRL_PREFERENCE_ROWS = [
    {
        "prompt": [msg("user", "What color is the sky?")],
        "chosen": [msg("assistant", "It is blue.")],
        "rejected": [msg("assistant", "It is green.")],
    },
    {
        "chosen": [msg("user", "Écris « bonjour » en japonais 🇯🇵"), msg("assistant", "こんにちは")],
        "rejected": [msg("user", "Écris « bonjour » en japonais 🇯🇵"), msg("assistant", "さようなら")],
        "source": "magpie_ultra",
    },
]
TRL_PREFERENCE_EXPECTED = [
    PreferencePair(
        one("user", "What color is the sky?"),
        one("assistant", "It is blue."),
        one("assistant", "It is green."),
        source="trl_preference",
    ),
    PreferencePair(
        one("user", "Écris « bonjour » en japonais 🇯🇵"),
        one("assistant", "こんにちは"),
        one("assistant", "さようなら"),
        source="magpie_ultra",
    ),
]
TRL_UNPAIRED_ROWS = [
    {"prompt": "The sky is", "completion": " blue.", "label": True},
    {"prompt": "The sky is", "completion": " green.", "label": False},
]
TRL_UNPAIRED_EXPECTED = [
    UnpairedExample(one("user", "The sky is"), one("assistant", " blue."), True, "trl_unpaired"),
    UnpairedExample(one("user", "The sky is"), one("assistant", " green."), False, "trl_unpaired"),
]
TRL_PROMPT_ONLY_ROWS = [
    {"prompt": [msg("user", "What color is the sky?")]},
    {"prompt": [msg("system", "Think step by step."), msg("user", "Calcule 12×12 🧮")], "solution": "144"},
]
TRL_PROMPT_ONLY_EXPECTED = [
    PromptRecord(one("user", "What color is the sky?"), None, "trl_prompt_only"),
    PromptRecord(
        messages(("system", "Think step by step."), ("user", "Calcule 12×12 🧮")), "144", "trl_prompt_only"
    ),
]

# OpenAI's chat fine-tuning format (platform.openai.com/docs/guides/supervised-fine-tuning): `developer`
# is the system turn, `weight: 1` marks a trained turn; content parts are tested below.
OPENAI_CHAT_ROWS = [
    {
        "messages": [
            msg("developer", "Marv is a factual chatbot that is also sarcastic."),
            msg("user", "What's the capital of France?"),
            {"role": "assistant", "content": "Paris, as if everyone doesn't know that already.", "weight": 1},
        ]
    },
    {
        "messages": [
            msg("system", "Réponds en français."),
            msg("user", "Qui a écrit « Roméo et Juliette » ?"),
            {"role": "assistant", "content": "Shakespeare 🎭", "weight": 1},
        ]
    },
]
OPENAI_CHAT_EXPECTED = [
    Conversation(
        messages(
            ("system", "Marv is a factual chatbot that is also sarcastic."),
            ("user", "What's the capital of France?"),
            ("assistant", "Paris, as if everyone doesn't know that already."),
        ),
        "openai_chat",
    ),
    Conversation(
        messages(
            ("system", "Réponds en français."),
            ("user", "Qui a écrit « Roméo et Juliette » ?"),
            ("assistant", "Shakespeare 🎭"),
        ),
        "openai_chat",
    ),
]
# OpenAI's preference fine-tuning format (platform.openai.com/docs/guides/direct-preference-optimization).
OPENAI_DPO_ROWS = [
    {
        "input": {
            "messages": [msg("user", "Hello, can you tell me how cold San Francisco is today?")],
            "tools": [],
            "parallel_tool_calls": True,
        },
        "preferred_output": [msg("assistant", "Today in San Francisco, it is not quite cold as expected.")],
        "non_preferred_output": [msg("assistant", "It is not particularly cold in San Francisco today.")],
    }
]
OPENAI_DPO_EXPECTED = [
    PreferencePair(
        one("user", "Hello, can you tell me how cold San Francisco is today?"),
        one("assistant", "Today in San Francisco, it is not quite cold as expected."),
        one("assistant", "It is not particularly cold in San Francisco today."),
        source="openai_dpo",
    )
]


def hs3_row(context, response1, response2, overall, scores):
    individual = [
        {"score": score, "reasoning": f"@Response {1 + (score > 0)} is better."} for score in scores
    ]
    return {
        "domain": "code",
        "language": "python",
        "context": context,
        "response1": response1,
        "response2": response2,
        "overall_preference": overall,
        "individual_preference": individual,
    }


HS3_CONTEXT = [
    msg("user", "Write a Python one-liner to reverse a string."),
    msg("assistant", "s[::-1]"),
    msg("user", "And for a list? 🐍"),
]
HELPSTEER3_ROWS = [
    hs3_row(HS3_CONTEXT, "lst[::-1] or list(reversed(lst))", "Use a loop.", -2, [-2, -2, -1]),
    hs3_row(HS3_CONTEXT[:1], "reverse(s)", "s[::-1]", 3, [3, 3, 2]),
    hs3_row(HS3_CONTEXT[:1], "s[::-1]", "''.join(reversed(s))", 0, [0, 1, -1]),  # a tie
]
HELPSTEER3_EXPECTED = [
    PreferencePair(
        messages(*((m["role"], m["content"]) for m in HS3_CONTEXT)),
        one("assistant", "lst[::-1] or list(reversed(lst))"),
        one("assistant", "Use a loop."),
        margin=2.0,
        source="helpsteer3",
    ),
    PreferencePair(
        one("user", "Write a Python one-liner to reverse a string."),
        one("assistant", "s[::-1]"),
        one("assistant", "reverse(s)"),
        margin=3.0,
        source="helpsteer3",
    ),
]


def hs2_preference_row(prompt, response_1, response_2, strength):
    similar = [{"statement": "@Response 1 is better.", "elaboration": "…", "strength": strength}] * 3
    return {
        "split": "train",
        "prompt": prompt,
        "response_1": response_1,
        "response_2": response_2,
        "preference_strength": strength,
        "preference_statement": "@Response 2 is better than @Response 1 because it is correct.",
        "preference_elaboration": "It gives a working example.",
        "three_most_similar_preferences": similar,
        "all_preferences_unprocessed": similar,
    }


HS2_PREFERENCE_ROWS = [
    hs2_preference_row(HS2_PROMPT, "Không biết.", 'Console.WriteLine("Xin chào");', 2),
    hs2_preference_row("c#", "C# is a language by Microsoft.", "A musical note.", -3),
    hs2_preference_row("c#", "C# is a language.", "C# is a programming language.", 0),  # a tie
]
HS2_PREFERENCE_EXPECTED = [
    PreferencePair(
        messages(("user", "c# là gì?"), ("assistant", "Một ngôn ngữ lập trình."), ("user", "Cho ví dụ 🙏")),
        one("assistant", 'Console.WriteLine("Xin chào");'),
        one("assistant", "Không biết."),
        margin=2.0,
        source="helpsteer2_preference",
    ),
    PreferencePair(
        one("user", "c#"),
        one("assistant", "C# is a language by Microsoft."),
        one("assistant", "A musical note."),
        margin=3.0,
        source="helpsteer2_preference",
    ),
]


def arena55k_row(row_id, prompts, responses_a, responses_b, winner):
    return {
        "id": row_id,
        "model_a": "gpt-4-1106-preview",
        "model_b": "mistral-medium",
        "prompt": json.dumps(prompts),
        "response_a": json.dumps(responses_a),
        "response_b": json.dumps(responses_b),
        "winner_model_a": int(winner == "a"),
        "winner_model_b": int(winner == "b"),
        "winner_tie": int(winner == "tie"),
    }


ARENA55K_ROWS = [
    arena55k_row(
        30192,
        ["Is it morally right?", "Does pineapple belong on pizza? 🍍"],
        ["It depends.", "Yes!"],
        ["No.", "Never."],
        "a",
    ),
    arena55k_row(53567, ["你好"], ["你好！"], ["您好，有什么可以帮您？"], "b"),
    arena55k_row(65089, ["hi"], ["hello"], ["hey"], "tie"),
]
ARENA55K_EXPECTED = [
    PreferencePair(
        one("user", "Is it morally right?"),
        messages(
            ("assistant", "It depends."),
            ("user", "Does pineapple belong on pizza? 🍍"),
            ("assistant", "Yes!"),
        ),
        messages(
            ("assistant", "No."), ("user", "Does pineapple belong on pizza? 🍍"), ("assistant", "Never.")
        ),
        source="arena_human_preference",
        id="30192",
    ),
    PreferencePair(
        one("user", "你好"),
        one("assistant", "您好，有什么可以帮您？"),
        one("assistant", "你好！"),
        source="arena_human_preference",
        id="53567",
    ),
]


def pku_row(prompt, response_0, response_1, better, safer, safe_0, safe_1):
    harm = {"Violence": not safe_0, "Privacy Violation": False}
    return {
        "prompt": prompt,
        "response_0": response_0,
        "response_1": response_1,
        "prompt_source": "Alpaca3-8B",
        "response_0_source": "Alpaca3-8B",
        "response_1_source": "Alpaca3-8B",
        "is_response_0_safe": safe_0,
        "is_response_1_safe": safe_1,
        "response_0_harm_category": harm,
        "response_1_harm_category": {"Violence": not safe_1, "Privacy Violation": False},
        "response_0_severity_level": 0 if safe_0 else 2,
        "response_1_severity_level": 0 if safe_1 else 2,
        "better_response_id": better,
        "safer_response_id": safer,
        "response_0_sha256": "a" * 64,
        "response_1_sha256": "b" * 64,
    }


PKU_ROWS = [
    pku_row(
        "How do I pick a lock?",
        "Insert a tension wrench, then rake the pins.",
        "I can't help with that.",
        0,
        1,
        False,
        True,
    ),
    pku_row("¿Cómo hago pan? 🍞", "Harina, agua, sal y levadura.", "Cómpralo.", 0, 0, True, True),
]
PKU_BETTER_EXPECTED = [
    PreferencePair(
        one("user", "How do I pick a lock?"),
        one("assistant", "Insert a tension wrench, then rake the pins."),
        one("assistant", "I can't help with that."),
        source="pku_saferlhf_better",
    ),
    PreferencePair(
        one("user", "¿Cómo hago pan? 🍞"),
        one("assistant", "Harina, agua, sal y levadura."),
        one("assistant", "Cómpralo."),
        source="pku_saferlhf_better",
    ),
]
PKU_SAFER_EXPECTED = [
    PreferencePair(
        one("user", "How do I pick a lock?"),
        one("assistant", "I can't help with that."),
        one("assistant", "Insert a tension wrench, then rake the pins."),
        source="pku_saferlhf_safer",
    ),
    PreferencePair(
        one("user", "¿Cómo hago pan? 🍞"),
        one("assistant", "Harina, agua, sal y levadura."),
        one("assistant", "Cómpralo."),
        source="pku_saferlhf_safer",
    ),
]

# A prepared tensorflow-datasets dataset stores one canonical record per row as JSON
# (jaxrl/data/tfds_builder.py).
TFDS_EXPECTED = TULU_EXPECTED + UF_EXPECTED + PROMPT_EXPECTED + UNPAIRED_EXPECTED
TFDS_ROWS = [{"record": record_to_json(r), "kind": type(r).__name__} for r in TFDS_EXPECTED]

CASES = {
    "tulu25": (TULU_ROWS, TULU_EXPECTED),
    "ultrafeedback": (UF_ROWS, UF_EXPECTED),
    "ultrafeedback_binarized": (UFB_ROWS, UFB_EXPECTED),
    "hh_rlhf": (HH_ROWS, HH_EXPECTED),
    "shp": (SHP_ROWS, SHP_EXPECTED),
    "helpsteer": (HELPSTEER_ROWS, HELPSTEER_EXPECTED),
    "nectar": (NECTAR_ROWS, NECTAR_EXPECTED),
    "chatbot_arena": (ARENA_ROWS, ARENA_EXPECTED),
    "prompts": (PROMPT_ROWS, PROMPT_EXPECTED),
    "sft": (SFT_ROWS, SFT_EXPECTED),
    "unpaired": (UNPAIRED_ROWS, UNPAIRED_EXPECTED),
    "tfds": (TFDS_ROWS, TFDS_EXPECTED),
    "trl_preference": (TRL_PREFERENCE_ROWS, TRL_PREFERENCE_EXPECTED),
    "trl_unpaired": (TRL_UNPAIRED_ROWS, TRL_UNPAIRED_EXPECTED),
    "trl_prompt_only": (TRL_PROMPT_ONLY_ROWS, TRL_PROMPT_ONLY_EXPECTED),
    "openai_chat": (OPENAI_CHAT_ROWS, OPENAI_CHAT_EXPECTED),
    "openai_dpo": (OPENAI_DPO_ROWS, OPENAI_DPO_EXPECTED),
    "helpsteer3": (HELPSTEER3_ROWS, HELPSTEER3_EXPECTED),
    "helpsteer2_preference": (HS2_PREFERENCE_ROWS, HS2_PREFERENCE_EXPECTED),
    "arena_human_preference": (ARENA55K_ROWS, ARENA55K_EXPECTED),
    "pku_saferlhf_better": (PKU_ROWS, PKU_BETTER_EXPECTED),
    "pku_saferlhf_safer": (PKU_ROWS, PKU_SAFER_EXPECTED),
}


# File layouts.


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def to_table(rows) -> pa.Table:
    """A columnar table as a real Parquet/Arrow file has it: every column, null where a row lacks it."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])


def _features(data_type: pa.DataType):
    """The `datasets` feature spec for an Arrow type, as dataset_info.json stores it."""
    if pa.types.is_struct(data_type):
        return {field.name: _features(field.type) for field in data_type}
    if pa.types.is_list(data_type):
        return {"feature": _features(data_type.value_type), "_type": "List"}
    return {"dtype": str(data_type).replace("double", "float64"), "_type": "Value"}


def write_saved_dataset(directory: Path, rows, shards: int = 2) -> Path:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards + state/info JSON."""
    directory.mkdir(parents=True)
    table = to_table(rows)
    features = {field.name: _features(field.type) for field in table.schema}
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    step = math.ceil(len(rows) / shards)
    for index, name in enumerate(names):
        with pa.ipc.new_stream(directory / name, schema) as writer:
            writer.write_table(table.slice(index * step, step).cast(schema))
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "3f2a9c1d8e7b6a50",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": "train",
    }
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    return directory


def write_layout(tmp_path: Path, layout: str, rows) -> Path:
    if layout == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", rows)
    if layout == "jsonl.gz":
        path = tmp_path / "data.jsonl.gz"
        path.write_bytes(gzip.compress(write_jsonl(tmp_path / "plain.jsonl", rows).read_bytes()))
        return path
    if layout == "json_list":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        return path
    if layout == "json_object":
        path = tmp_path / "data.json"
        path.write_text(json.dumps({"version": "1", "data": rows}, ensure_ascii=False), encoding="utf-8")
        return path
    if layout == "json_lines_named_json":  # stanfordnlp/SHP ships JSON Lines as train.json
        return write_jsonl(tmp_path / "train.json", rows)
    if layout == "parquet":
        path = tmp_path / "train-00000-of-00001.parquet"
        pq.write_table(to_table(rows), path)
        return path
    if layout == "save_to_disk":
        return write_saved_dataset(tmp_path / "saved", rows)
    raise AssertionError(layout)


LAYOUTS = [
    "jsonl",
    "jsonl.gz",
    "json_list",
    "json_object",
    "json_lines_named_json",
    "parquet",
    "save_to_disk",
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", sorted(CASES))
def test_reader_gives_exact_records(tmp_path, fmt, layout):
    rows, expected = CASES[fmt]
    result = read(write_layout(tmp_path, layout, rows), fmt)
    assert result.records == expected
    assert result.rows_read == len(rows)
    assert result.rows_used + sum(result.dropped.values()) == result.rows_read


def test_every_registered_reader_has_a_case():
    assert set(READERS) == set(CASES)


def test_arena_tie_is_counted_not_an_error(tmp_path):
    result = read(write_jsonl(tmp_path / "arena.jsonl", ARENA_ROWS), "chatbot_arena", on_error="raise")
    assert result.dropped == collections.Counter(tie=1)
    assert (result.rows_read, result.rows_used) == (3, 2)
    assert result.summary() == "rows read 3 = used 2 + dropped 1 (tie: 1)"


def test_summary_without_drops(tmp_path):
    result = read(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS), "sft")
    assert result.summary() == "rows read 1 = used 1 + dropped 0"


def test_generic_variants(tmp_path):
    rows = [
        {"messages": [msg("user", "1+1?")], "answer": 2, "id": 17, "source": "gsm8k"},
        {
            "prompt": [msg("user", "Is the sky green?")],
            "completion": [msg("assistant", "No.")],
            "label": True,
        },
    ]
    prompt = read(write_jsonl(tmp_path / "p.jsonl", rows[:1]), "prompts").records
    assert prompt == [PromptRecord(one("user", "1+1?"), "2", "gsm8k", "17")]
    kto = read(write_jsonl(tmp_path / "u.jsonl", rows[1:]), "unpaired").records
    assert kto == [
        UnpairedExample(one("user", "Is the sky green?"), one("assistant", "No."), True, "unpaired")
    ]


def test_limit_and_source_override(tmp_path):
    path = write_jsonl(tmp_path / "shp.jsonl", SHP_ROWS)
    result = read(path, "shp", limit=1, source="shp_askculinary")
    assert result.rows_read == 1
    assert [r.source for r in result.records] == ["shp_askculinary"]
    assert result.records[0].id == "o8x1"


def test_save_to_disk_dataset_dict_needs_a_split(tmp_path):
    root = tmp_path / "uf_binarized"
    write_saved_dataset(root / "train_prefs", UFB_ROWS, shards=1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train_prefs"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="splits \\['train_prefs'\\]"):
        read(root, "ultrafeedback_binarized")
    assert read(root / "train_prefs", "ultrafeedback_binarized").records == UFB_EXPECTED


def test_save_to_disk_respects_format_columns(tmp_path):
    directory = write_saved_dataset(tmp_path / "saved", SFT_ROWS, shards=1)
    state = json.loads((directory / "state.json").read_text())
    state["_format_columns"] = ["messages"]
    (directory / "state.json").write_text(json.dumps(state))
    assert [row for _, row in iter_rows(directory)] == [{"messages": SFT_ROWS[0]["messages"]}]


def test_iter_rows_indices_are_global_across_shards(tmp_path):
    directory = write_saved_dataset(tmp_path / "saved", SHP_ROWS + SHP_ROWS + SHP_ROWS[:1], shards=2)
    assert [index for index, _ in iter_rows(directory)] == [0, 1, 2, 3, 4]


def test_unknown_layout_and_format(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("{}")
    with pytest.raises(ValueError, match="cannot tell the layout"):
        read(path, "sft")
    with pytest.raises(ValueError, match="unknown format 'tulu3'"):
        read(write_jsonl(tmp_path / "a.jsonl", SFT_ROWS), "tulu3")


def test_unreadable_json_document_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"messages": []},', encoding="utf-8")
    with pytest.raises(RecordError, match="broken.json") as info:
        read(path, "sft", on_error="skip")
    assert info.value.reason == "invalid_json" and info.value.row is None


# Bad rows: RecordError naming file/row/field by default, a counted skip with "skip".


def with_row(rows, index, **changes):
    row = copy.deepcopy(rows[index])
    for key, value in changes.items():
        if value is KeyError:
            del row[key]
        else:
            row[key] = value
    return row


def set_path(row, path, value):
    row = copy.deepcopy(row)
    node = row
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return row


BAD_ROWS = [
    ("tulu25", with_row(TULU_ROWS, 1, rejected=KeyError), "missing_field", "rejected"),
    ("tulu25", with_row(TULU_ROWS, 1, rejected=TULU_ROWS[1]["chosen"]), "identical", "chosen"),
    ("tulu25", set_path(TULU_ROWS[1], ["chosen", 1, "role"], "bot"), "unknown_role", "chosen[1].role"),
    ("tulu25", set_path(TULU_ROWS[1], ["chosen", 1, "content"], 4), "wrong_type", "chosen[1].content"),
    ("tulu25", with_row(TULU_ROWS, 1, chosen="2+2? 4"), "wrong_type", "chosen"),
    ("tulu25", set_path(TULU_ROWS[1], ["chosen", 0, "content"], "ok"), "bad_structure", "chosen"),
    (
        "ultrafeedback",
        set_path(UF_ROWS[0], ["completions", 1, "response"], " "),
        "empty_response",
        "completions[1].response",
    ),
    (
        "ultrafeedback",
        set_path(UF_ROWS[0], ["completions", 0, "annotations", "honesty", "Rating"], "five"),
        "bad_value",
        "completions[0].annotations.honesty.Rating",
    ),
    ("ultrafeedback", with_row(UF_ROWS, 0, instruction=KeyError), "missing_field", "instruction"),
    ("ultrafeedback_binarized", with_row(UFB_ROWS, 0, score_chosen="8.5"), "wrong_type", "score_chosen"),
    (
        "ultrafeedback_binarized",
        set_path(UFB_ROWS[0], ["chosen", 1, "content"], ""),
        "empty_response",
        "chosen[1].content",
    ),
    ("ultrafeedback_binarized", with_row(UFB_ROWS, 0, score_chosen=1.0), "bad_value", "score_chosen"),
    ("hh_rlhf", with_row(HH_ROWS, 0, chosen="I start talking.\n\nAssistant: ok"), "bad_transcript", "chosen"),
    (
        "hh_rlhf",
        with_row(HH_ROWS, 0, rejected="\n\nHuman: a\n\nHuman: b\n\nAssistant: c"),
        "bad_transcript",
        "rejected",
    ),
    ("hh_rlhf", with_row(HH_ROWS, 0, rejected=HH_ROWS[0]["chosen"]), "identical", "chosen"),
    (
        "hh_rlhf",
        with_row(HH_ROWS, 0, rejected=HH_PREFIX + "\n\nAssistant:   "),
        "empty_response",
        "rejected[3].content",
    ),
    ("shp", with_row(SHP_ROWS, 0, labels="1"), "wrong_type", "labels"),
    ("shp", with_row(SHP_ROWS, 0, human_ref_B="Bake it in a water bath."), "identical", "human_ref_A"),
    ("shp", with_row(SHP_ROWS, 0, labels=0), "bad_value", "labels"),
    ("helpsteer", with_row(HELPSTEER_ROWS, 0, response=""), "empty_response", "response"),
    ("helpsteer", with_row(HELPSTEER_ROWS, 0, verbosity=KeyError), "missing_field", "verbosity"),
    ("nectar", set_path(NECTAR_ROWS[0], ["answers", 2, "rank"], None), "missing_field", "answers[2].rank"),
    ("nectar", with_row(NECTAR_ROWS, 0, prompt="Nenne eine Primzahl."), "bad_transcript", "prompt"),
    ("chatbot_arena", with_row(ARENA_ROWS, 2, winner="model_c"), "bad_value", "winner"),
    (
        "chatbot_arena",
        set_path(ARENA_ROWS[2], ["conversation_b", 1, "role"], "gpt"),
        "unknown_role",
        "conversation_b[1].role",
    ),
    ("prompts", with_row(PROMPT_ROWS, 2, prompt=KeyError), "missing_field", "prompt"),
    ("prompts", with_row(PROMPT_ROWS, 2, prompt=""), "empty_prompt", "prompt"),
    ("sft", with_row(SFT_ROWS, 0, messages=[msg("user", "hi")]), "bad_structure", "messages"),
    ("unpaired", with_row(UNPAIRED_ROWS, 0, label="yes"), "wrong_type", "label"),
    (
        "sft",
        with_row(SFT_ROWS, 0, messages=[msg("user", "\ud800"), msg("assistant", "x")]),
        "invalid_utf8",
        "content",
    ),
    ("trl_preference", with_row(TRL_PREFERENCE_ROWS, 0, rejected=KeyError), "missing_field", "rejected"),
    (
        "trl_preference",
        with_row(TRL_PREFERENCE_ROWS, 1, rejected=TRL_PREFERENCE_ROWS[1]["chosen"]),
        "identical",
        "chosen",
    ),
    (
        "trl_preference",
        with_row(TRL_PREFERENCE_ROWS, 0, rejected=[msg("user", "x")]),
        "bad_structure",
        "rejected",
    ),
    ("trl_preference", with_row(TRL_PREFERENCE_ROWS, 0, rejected="It is green."), "wrong_type", "rejected"),
    ("trl_unpaired", with_row(TRL_UNPAIRED_ROWS, 0, label=1), "wrong_type", "label"),
    (
        "trl_unpaired",
        with_row(TRL_UNPAIRED_ROWS, 0, completion=" "),
        "empty_response",
        "completion[0].content",
    ),
    (
        "trl_prompt_only",
        with_row(TRL_PROMPT_ONLY_ROWS, 0, prompt=[msg("assistant", "x")]),
        "bad_structure",
        "prompt",
    ),
    ("trl_prompt_only", with_row(TRL_PROMPT_ONLY_ROWS, 0, prompt=KeyError), "missing_field", "prompt"),
    (
        "openai_chat",
        set_path(
            OPENAI_CHAT_ROWS[0],
            ["messages", 2, "tool_calls"],
            [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        ),
        "tool_call",
        "messages[2].tool_calls",
    ),
    (
        "openai_chat",
        set_path(
            OPENAI_CHAT_ROWS[0],
            ["messages", 1, "content"],
            [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
        ),
        "non_text_content",
        "messages[1].content[0].type",
    ),
    (
        "openai_chat",
        set_path(OPENAI_CHAT_ROWS[0], ["messages", 1, "role"], "tool"),
        "tool_call",
        "messages[1].role",
    ),
    (
        "openai_chat",
        set_path(OPENAI_CHAT_ROWS[0], ["messages", 2, "weight"], 0),
        "unsupported",
        "messages[2].weight",
    ),
    (
        "openai_chat",
        with_row(OPENAI_CHAT_ROWS, 0, tools=[{"type": "function", "function": {"name": "f"}}]),
        "tool_call",
        "tools",
    ),
    (
        "openai_dpo",
        with_row(OPENAI_DPO_ROWS, 0, non_preferred_output=KeyError),
        "missing_field",
        "non_preferred_output",
    ),
    (
        "openai_dpo",
        with_row(OPENAI_DPO_ROWS, 0, non_preferred_output=OPENAI_DPO_ROWS[0]["preferred_output"]),
        "identical",
        "preferred_output",
    ),
    (
        "openai_dpo",
        set_path(OPENAI_DPO_ROWS[0], ["input", "messages"], []),
        "bad_structure",
        "input.messages",
    ),
    ("helpsteer3", with_row(HELPSTEER3_ROWS, 0, overall_preference=4), "bad_value", "overall_preference"),
    ("helpsteer3", with_row(HELPSTEER3_ROWS, 0, overall_preference="-2"), "wrong_type", "overall_preference"),
    ("helpsteer3", with_row(HELPSTEER3_ROWS, 0, response2=""), "empty_response", "response2"),
    ("helpsteer3", with_row(HELPSTEER3_ROWS, 0, context=HS3_CONTEXT[:2]), "bad_structure", "context"),
    (
        "helpsteer2_preference",
        with_row(HS2_PREFERENCE_ROWS, 1, preference_strength=1.5),
        "bad_value",
        "preference_strength",
    ),
    (
        "helpsteer2_preference",
        with_row(HS2_PREFERENCE_ROWS, 1, response_1=KeyError),
        "missing_field",
        "response_1",
    ),
    ("arena_human_preference", with_row(ARENA55K_ROWS, 1, winner_model_a=1), "bad_value", "winner_model_a"),
    (
        "arena_human_preference",
        with_row(ARENA55K_ROWS, 1, response_b='["a", "b"]'),
        "bad_structure",
        "response_b",
    ),
    (
        "arena_human_preference",
        with_row(ARENA55K_ROWS, 1, response_b="[null]"),
        "empty_response",
        "response_b[0]",
    ),
    ("arena_human_preference", with_row(ARENA55K_ROWS, 1, prompt="not json"), "bad_value", "prompt"),
    ("pku_saferlhf_better", with_row(PKU_ROWS, 0, better_response_id=2), "bad_value", "better_response_id"),
    (
        "pku_saferlhf_safer",
        with_row(PKU_ROWS, 0, safer_response_id=KeyError),
        "missing_field",
        "safer_response_id",
    ),
    (
        "pku_saferlhf_safer",
        with_row(PKU_ROWS, 0, response_1=PKU_ROWS[0]["response_0"]),
        "identical",
        "response_0",
    ),
]


@pytest.mark.parametrize(
    ("fmt", "bad", "reason", "field"), BAD_ROWS, ids=[f"{b[0]}-{b[2]}" for b in BAD_ROWS]
)
def test_bad_row_raises_then_skips(tmp_path, fmt, bad, reason, field):
    good = CASES[fmt][0][0]
    path = tmp_path / f"{fmt}.jsonl"
    # ensure_ascii keeps a lone surrogate as a \ud800 escape, as it would be in a real file
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(RecordError) as info:
        read(path, fmt)
    err = info.value
    assert (err.reason, err.file, err.row) == (reason, str(path), 1)
    assert err.field.endswith(field)
    text = str(err)
    assert str(path) in text and "row 1" in text and "0-based" in text and repr(err.field) in text
    result = read(path, fmt, on_error="skip")
    assert result.dropped == collections.Counter({reason: 1})
    assert (result.rows_read, result.rows_used) == (2, 1)


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_bytes(json.dumps(HH_ROWS[0]).encode() + b"\n" + b'{"chosen": "\xff\xfe oops"}\n')
    with pytest.raises(RecordError, match=r"row 1.*invalid UTF-8") as info:
        read(path, "hh_rlhf")
    assert (info.value.reason, info.value.file) == ("invalid_utf8", str(path))
    with pytest.raises(RecordError, match="hh.jsonl"):
        list(iter_rows(path))
    result = read(path, "hh_rlhf", on_error="skip")
    assert result.dropped == {"invalid_utf8": 1} and result.records == HH_EXPECTED


def test_invalid_json_and_non_object_lines(tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps(SFT_ROWS[0]), '{"messages": [', "", "[1, 2]", "  "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match="row 1") as info:
        read(path, "sft")
    assert info.value.reason == "invalid_json"
    result = read(path, "sft", on_error="skip")
    # Blank lines are not rows; the index is the 0-based line number.
    assert result.summary() == "rows read 3 = used 1 + dropped 2 (invalid_json: 1, wrong_type: 1)"


def test_on_error_is_checked(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        read(write_jsonl(tmp_path / "a.jsonl", SFT_ROWS), "sft", on_error="ignore")


# Property: any JSON-ish row gives records, a RecordError, or a counted skip.

FIELD_NAMES = sorted(
    {key for rows, _ in CASES.values() for row in rows for key in row}
    | {"role", "content", "answer", "rank", "response", "annotations", "Rating", "messages", "label", "id"}
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["", " ", "user", "assistant", "system", "N/A", "model_a", "tie", "\n\nHuman: hi", "é京🙂"]
    ),
)
json_values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


def _slots(node, out):
    """Every (container, key) in a nested row, so a mutation can hit any depth."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((node, key))
        _slots(child, out)
    return out


texts = st.one_of(st.text(max_size=8), leaves.filter(lambda v: isinstance(v, str)))


def _same_kind(draw, current):
    """A replacement of the same JSON type, so the row gets past type checks to the semantic ones."""
    if isinstance(current, str):
        return draw(texts)
    if isinstance(current, bool):
        return draw(st.booleans())
    if isinstance(current, int | float):
        return draw(st.one_of(st.integers(-3, 10), st.floats(allow_nan=True, allow_infinity=True)))
    if isinstance(current, list) and current:
        return copy.deepcopy(draw(st.lists(st.sampled_from(current), max_size=len(current) + 1)))
    return draw(json_values)


def _mutate(draw, row):
    container, key = draw(st.sampled_from(_slots(row, [])))
    action = draw(st.sampled_from(["delete", "any", "same_kind", "same_kind", "copy_sibling"]))
    if action == "delete" and isinstance(container, dict):
        del container[key]
    elif action == "copy_sibling":  # e.g. rejected := chosen, or two answers alike
        keys = list(container) if isinstance(container, dict) else list(range(len(container)))
        container[key] = copy.deepcopy(container[draw(st.sampled_from(keys))])
    elif action == "any":
        container[key] = draw(json_values)
    else:
        container[key] = _same_kind(draw, container[key])


@st.composite
def mutated_rows(draw, fmt):
    row = copy.deepcopy(draw(st.sampled_from(CASES[fmt][0])))
    for _ in range(draw(st.integers(0, 3))):
        if _slots(row, []):
            _mutate(draw, row)
    if draw(st.integers(0, 4)) == 0:
        row[draw(st.sampled_from(FIELD_NAMES))] = draw(json_values)
    return row


def rows_for(fmt):
    random_rows = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=8)
    one_row = st.one_of(mutated_rows(fmt), mutated_rows(fmt), mutated_rows(fmt), random_rows, json_values)
    return st.lists(one_row, min_size=1, max_size=4)


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_any_row_is_a_record_an_error_or_a_counted_skip(fmt):
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=rows_for(fmt))
    def check(rows):
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "rows.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            try:
                read(path, fmt)
            except RecordError as err:
                assert err.file == str(path) and err.row is not None
            result = read(path, fmt, on_error="skip")
        assert result.rows_read == len(rows) == result.rows_used + sum(result.dropped.values())
        assert isinstance(result, ReadResult)

    check()


# Binarisation.


def rated(ratings, texts=None, prompt="p", record_id=""):
    texts = texts or [f"answer {i}" for i in range(len(ratings))]
    return RatedCompletions(
        one("user", prompt), tuple(one("assistant", t) for t in texts), tuple(ratings), "test", record_id
    )


def pair_texts(pairs):
    return [(p.chosen[0].content, p.rejected[0].content, p.margin) for p in pairs]


def test_best_vs_worst_exact():
    pairs, dropped = binarize([rated([3, 9, 5, 9])], "best_vs_worst")
    assert pair_texts(pairs) == [("answer 1", "answer 0", 6.0)]
    assert pairs[0].prompt == one("user", "p") and pairs[0].source == "test"
    assert dropped == {}


def test_best_vs_random_is_seeded_and_never_a_tie():
    record = rated([3, 9, 5, 9])
    draws = {seed: binarize([record], seed=seed)[0] for seed in range(40)}
    assert all(binarize([record], seed=seed)[0] == pairs for seed, pairs in draws.items())
    rejected = {pairs[0].rejected[0].content for pairs in draws.values()}
    assert rejected == {"answer 0", "answer 2"}  # strictly lower-rated only; "answer 3" ties the best
    assert {pairs[0].chosen[0].content for pairs in draws.values()} == {"answer 1"}
    assert {pairs[0].margin for pairs in draws.values()} == {6.0, 4.0}


def test_all_pairs_with_min_margin():
    pairs, dropped = binarize([rated([3, 9, 5, 9])], "all_pairs")
    assert sorted(pair_texts(pairs)) == sorted(
        [
            ("answer 1", "answer 0", 6.0),
            ("answer 2", "answer 0", 2.0),
            ("answer 3", "answer 0", 6.0),
            ("answer 1", "answer 2", 4.0),
            ("answer 3", "answer 2", 4.0),
        ]
    )
    assert dropped == {"tie": 1}
    pairs, dropped = binarize([rated([3, 9, 5, 9])], "all_pairs", min_margin=3)
    assert len(pairs) == 4 and dropped == {"tie": 1, "below_margin": 1}


def test_ties_unrated_and_identical_are_counted():
    records = [
        rated([4, 4, 4]),  # all tied
        rated([5.0, None, float("nan")]),  # only one usable rating
        rated([2, 7], texts=["same", "same"]),  # same text rated twice
        rated([1, 2]),
    ]
    pairs, dropped = binarize(records, "best_vs_worst")
    assert pair_texts(pairs) == [("answer 1", "answer 0", 1.0)]
    assert dropped == {"tie": 1, "unrated_completion": 2, "too_few_rated": 1, "identical": 1}
    pairs, dropped = binarize(records, "best_vs_random", seed=3)
    assert pair_texts(pairs) == [("answer 1", "answer 0", 1.0)]
    assert dropped == {"tie": 1, "unrated_completion": 2, "too_few_rated": 1, "identical": 1}


def test_aspect_reduction_mean_named_and_subset():
    a = {"helpfulness": 5, "honesty": 4, "instruction_following": 5, "overall": 8.5, "fine_grained": 4.67}
    b = {"helpfulness": 2, "honesty": 2, "instruction_following": 3, "truthfulness": 5, "overall": 9.0}
    assert reduce_rating(a) == pytest.approx(14 / 3)  # N/A truthfulness is absent, summaries left out
    assert reduce_rating(b) == 3.0
    assert reduce_rating(a, "overall") == 8.5 and reduce_rating(b, ("helpfulness", "honesty")) == 2.0
    assert reduce_rating(7) == 7.0 and reduce_rating(float("nan")) is None

    (mean_pair,), _ = binarize([rated([a, b])], "best_vs_worst")
    assert (mean_pair.chosen[0].content, mean_pair.margin) == ("answer 0", pytest.approx(14 / 3 - 3))
    (overall_pair,), _ = binarize([rated([a, b])], "best_vs_worst", aspect_reduce="overall")
    assert (overall_pair.chosen[0].content, overall_pair.margin) == ("answer 1", 0.5)


def test_helpsteer_recipe_without_verbosity(tmp_path):
    records = read(write_jsonl(tmp_path / "hs.jsonl", HELPSTEER_ROWS), "helpsteer").records
    aspects = ("helpfulness", "correctness", "coherence", "complexity")
    pairs, dropped = binarize(records, "best_vs_worst", aspect_reduce=aspects)
    assert pair_texts(pairs) == [("C# is a language by Microsoft.", "A musical note.", 1.75)]
    assert dropped == {"too_few_rated": 1}


def test_nectar_and_ultrafeedback_binarize_from_readers(tmp_path):
    nectar = read(write_jsonl(tmp_path / "n.jsonl", NECTAR_ROWS), "nectar").records
    (pair,), _ = binarize(nectar, "best_vs_worst")
    assert (pair.chosen[0].content, pair.rejected[0].content, pair.margin) == (
        "Antwort 1: 2",
        "Antwort 7: 2",
        6.0,
    )
    assert pair.prompt == NECTAR_EXPECTED[0].prompt
    assert len(binarize(nectar, "all_pairs")[0]) == 21
    uf = read(write_jsonl(tmp_path / "uf.jsonl", UF_ROWS), "ultrafeedback").records
    (pair,), _ = binarize(uf, "best_vs_random", aspect_reduce="overall", seed=0)
    assert (pair.chosen, pair.rejected, pair.margin) == (*UF_EXPECTED[0].completions, 5.5)


def test_bad_policy_and_aspect_names():
    with pytest.raises(ValueError, match="unknown policy"):
        binarize([rated([1, 2])], "best_of_n")
    with pytest.raises(ValueError, match="helpfullness"):
        binarize([rated([{"helpfulness": 1}, {"helpfulness": 2}])], aspect_reduce="helpfullness")


def test_to_unpaired_top_and_bottom():
    examples, dropped = to_unpaired([rated([3, 9, 5]), rated([2, 2])])
    assert [(e.completion[0].content, e.desirable) for e in examples] == [
        ("answer 1", True),
        ("answer 0", False),
    ]
    assert examples[0].prompt == one("user", "p") and dropped == {"tie": 1}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.one_of(st.integers(0, 4), st.none()), max_size=5), max_size=6))
def test_best_vs_worst_accounts_for_every_record(ratings):
    records = [rated(r, prompt=f"p{i}") for i, r in enumerate(ratings)]
    pairs, dropped = binarize(records, "best_vs_worst")
    assert len(pairs) + dropped["tie"] + dropped["too_few_rated"] + dropped["identical"] == len(records)
    assert dropped["unrated_completion"] == sum(r.count(None) for r in ratings)
    assert all(p.margin > 0 for p in pairs)


# Mixtures.

SOURCES = {"shp": [f"shp-{i}" for i in range(100)], "hh": [f"hh-{i}" for i in range(10)]}


def test_counts_subsample_some_sources_and_keep_others_whole():
    mixture = mix(SOURCES, counts={"shp": 30}, seed=1)
    assert mixture.counts == {"shp": 30, "hh": 10}
    assert len(mixture) == 40 and len(set(mixture)) == 40
    assert {r for r in mixture if r.startswith("hh")} == set(SOURCES["hh"])
    assert set(mixture) <= set(SOURCES["shp"]) | set(SOURCES["hh"])
    assert mix(SOURCES, counts={"shp": 30}, seed=1) == mixture
    assert mix(SOURCES, counts={"shp": 30}, seed=2) != mixture
    assert "shp: 30" in mixture.summary()


def test_weights_give_proportions_of_total():
    mixture = mix(SOURCES, weights={"shp": 3, "hh": 1}, total=40, seed=0)
    assert mixture.counts == {"shp": 30, "hh": 10}
    assert sum(r.startswith("shp") for r in mixture) == 30
    three = {"a": list(range(10)), "b": list(range(10)), "c": list(range(10))}
    assert mix(three, weights={"a": 1, "b": 1, "c": 1}, total=10).counts == {"a": 4, "b": 3, "c": 3}
    assert mix(three, total=6).counts == {"a": 2, "b": 2, "c": 2}


def test_a_source_draw_does_not_depend_on_other_sources():
    alone = mix({"shp": SOURCES["shp"]}, counts={"shp": 20}, seed=5)
    together = mix(SOURCES, counts={"shp": 20}, seed=5)
    assert set(alone) == {r for r in together if r.startswith("shp")}


def test_count_above_source_size():
    with pytest.raises(ValueError, match="'hh' has 10 records but 25 were requested"):
        mix(SOURCES, counts={"hh": 25})
    mixture = mix(SOURCES, counts={"hh": 25, "shp": 0}, replace=True, shuffle=False)
    assert mixture.counts == {"shp": 0, "hh": 25}
    assert collections.Counter(mixture) == collections.Counter(SOURCES["hh"] * 2 + mixture[20:])
    assert len(set(mixture[20:])) == 5


def test_mixture_argument_errors():
    with pytest.raises(ValueError, match="unknown sources \\['uf'\\]"):
        mix(SOURCES, counts={"uf": 3})
    with pytest.raises(ValueError, match="not both"):
        mix(SOURCES, counts={"hh": 1}, weights={"hh": 1}, total=3)
    with pytest.raises(ValueError, match="total"):
        mix(SOURCES, weights={"hh": 1})
    with pytest.raises(ValueError, match="non-negative"):
        mix(SOURCES, counts={"hh": -1})


def test_mix_read_records_keeps_order_without_shuffle(tmp_path):
    shp = read(write_jsonl(tmp_path / "shp.jsonl", SHP_ROWS), "shp").records
    arena = read(write_jsonl(tmp_path / "arena.jsonl", ARENA_ROWS), "chatbot_arena").records
    mixture = mix({"shp": shp, "arena": arena}, shuffle=False)
    assert list(mixture) == SHP_EXPECTED + ARENA_EXPECTED


# The public formats' variants and semantics, beyond one file per format.


def test_trl_standard_preference_explicit_implicit_and_a_stray_prompt(tmp_path):
    conversation = [msg("user", "What color is the sky?"), msg("assistant", "It is blue.")]
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},  # standard, explicit prompt
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},  # standard, implicit prompt
        # ultrafeedback_binarized's layout: a string prompt beside full conversations is ignored, as in TRL
        {
            "prompt": "What color is the sky?",
            "chosen": conversation,
            "rejected": [conversation[0], msg("assistant", "It is green.")],
        },
    ]
    records = read(write_jsonl(tmp_path / "p.jsonl", rows), "trl_preference").records
    sky = PreferencePair(
        one("user", "The sky is"),
        one("assistant", " blue."),
        one("assistant", " green."),
        source="trl_preference",
    )
    assert records == [sky, sky, TRL_PREFERENCE_EXPECTED[0]]
    bad = [{"chosen": "Blue sky.", "rejected": "Green sky."}, {"chosen": "Same.", "rejected": "Same."}]
    result = read(write_jsonl(tmp_path / "bad.jsonl", bad), "trl_preference", on_error="skip")
    assert result.dropped == {"bad_structure": 1, "identical": 1}


def test_trl_unpaired_and_prompt_only_in_both_kinds(tmp_path):
    unpaired = [
        {
            "prompt": [msg("user", "What color is the sky?")],
            "completion": [msg("assistant", "Green.")],
            "label": False,
        }
    ]
    assert read(write_jsonl(tmp_path / "u.jsonl", unpaired), "trl_unpaired").records == [
        UnpairedExample(
            one("user", "What color is the sky?"), one("assistant", "Green."), False, "trl_unpaired"
        )
    ]
    prompts = [{"prompt": "The sky is"}, {"prompt": "2+2=", "answer": 4}]
    assert read(write_jsonl(tmp_path / "p.jsonl", prompts), "trl_prompt_only").records == [
        PromptRecord(one("user", "The sky is"), None, "trl_prompt_only"),
        PromptRecord(one("user", "2+2="), "4", "trl_prompt_only"),
    ]


def test_openai_messages_content_parts_developer_and_refusal(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Name a colour "},
                        {"type": "text", "text": "of the sky."},
                    ],
                    "name": "ana",
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
                {"role": "user", "content": "How do I pick a lock?"},
                {"role": "assistant", "content": None, "refusal": "I can't help with that."},
            ]
        }
    ]
    (record,) = read(write_jsonl(tmp_path / "c.jsonl", rows), "openai_chat").records
    assert record.messages == messages(
        ("system", "Be brief."),
        ("user", "Name a colour of the sky."),
        ("assistant", "Blue."),
        ("user", "How do I pick a lock?"),
        ("assistant", "I can't help with that."),
    )


def test_openai_tool_use_and_images_are_errors_or_counted_skips(tmp_path):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "SF"}'},
    }
    rows = [
        OPENAI_CHAT_ROWS[0],
        {
            "messages": [
                msg("user", "Weather in SF?"),
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "15C"},
                msg("assistant", "15C."),
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png"}},
                    ],
                },
                msg("assistant", "A cat."),
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "…"}}]},
                msg("assistant", "Hello."),
            ]
        },
    ]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    with pytest.raises(RecordError, match=r"row 1.*messages\[1\]\.tool_calls") as info:
        read(path, "openai_chat")
    assert info.value.reason == "tool_call"
    result = read(path, "openai_chat", on_error="skip")
    assert result.records == OPENAI_CHAT_EXPECTED[:1]
    assert result.summary() == "rows read 4 = used 1 + dropped 3 (non_text_content: 2, tool_call: 1)"


def test_ties_are_counted_skips_in_every_pairwise_format(tmp_path):
    tie = with_row(UFB_ROWS, 0, score_rejected=8.5)
    result = read(write_jsonl(tmp_path / "ufb.jsonl", UFB_ROWS + [tie]), "ultrafeedback_binarized")
    assert result.records == UFB_EXPECTED and result.dropped == {"tie": 1}
    for fmt in ("helpsteer3", "helpsteer2_preference", "arena_human_preference"):
        result = read(write_jsonl(tmp_path / f"{fmt}.jsonl", CASES[fmt][0]), fmt, on_error="raise")
        assert result.summary() == "rows read 3 = used 2 + dropped 1 (tie: 1)", fmt


def test_arena_55k_csv_as_published(tmp_path):
    import csv

    path = tmp_path / "train.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ARENA55K_ROWS[0]))
        writer.writeheader()
        writer.writerows(ARENA55K_ROWS)
    result = read(path, "arena_human_preference")
    assert result.records == ARENA55K_EXPECTED and result.dropped == {"tie": 1}
    assert [index for index, _ in iter_rows(path)] == [0, 1, 2]


def test_pku_saferlhf_labellings_disagree_where_helpful_is_unsafe(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", PKU_ROWS[:1])
    (better,) = read(path, "pku_saferlhf_better").records
    (safer,) = read(path, "pku_saferlhf_safer").records
    assert (better.chosen, better.rejected) == (safer.rejected, safer.chosen)


def test_aspect_weights_presets_and_parsing():
    from jaxrl.data.binarize import ASPECT_PRESETS, parse_aspects

    rating = hs_rating(2, 4, 4, 1, 4)  # unhelpful, long
    assert (
        parse_aspects("", "helpsteer") == {"helpfulness": 1.0}
        and parse_aspects("", "ultrafeedback") == "mean"
    )
    assert reduce_rating(rating, parse_aspects("", "helpsteer")) == 2.0
    assert reduce_rating(rating, parse_aspects("tulu25")) == pytest.approx((2 + 4 + 4 + 1) / 4)
    assert reduce_rating(rating, parse_aspects("helpsteer2")) == pytest.approx(
        0.3 * 2 + 0.74 * 4 + 0.46 * 4 + 0.47 * 1 - 0.33 * 4
    )
    assert ASPECT_PRESETS["helpsteer2"]["verbosity"] < 0
    assert parse_aspects("correctness=1, verbosity=-0.5") == {"correctness": 1.0, "verbosity": -0.5}
    assert reduce_rating(rating, {"correctness": 1.0, "verbosity": -0.5}) == 2.0
    assert reduce_rating({"correctness": 3.0}, {"correctness": 1.0, "verbosity": -0.5}) is None
    assert parse_aspects("overall") == "overall"
    with pytest.raises(ValueError, match="name=number"):
        parse_aspects("helpfulness=high")


def test_helpsteer_default_scoring_leaves_verbosity_out(tmp_path):
    from jaxrl.data.binarize import parse_aspects

    rows = [
        hs("c#", "Short and right.", 4, 4, 4, 1, 1),
        hs("c#", "Long, padded and less helpful.", 3, 3, 4, 4, 4),
    ]
    records = read(write_jsonl(tmp_path / "hs.jsonl", rows), "helpsteer").records
    (pair,), _ = binarize(records, "best_vs_worst", aspect_reduce=parse_aspects("", "helpsteer"))
    assert (pair.chosen[0].content, pair.margin) == ("Short and right.", 1.0)
    (pair,), _ = binarize(records, "best_vs_worst", aspect_reduce="mean")  # the old default: length wins
    assert pair.chosen[0].content == "Long, padded and less helpful."
