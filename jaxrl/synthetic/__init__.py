"""The synthetic preference world: a tiny chat world with a known gold reward (the embedded default)."""

from jaxrl.synthetic.datasets import (
    DATASETS,
    PREFERENCE_KINDS,
    PROMPT_SET_MIXES,
    PROMPT_SETS,
    LabelledPairs,
    dataset_stats,
    expected_flip_rate,
    make_eval_prompts,
    make_gold_lists,
    make_gold_pairs,
    make_on_policy_dataset,
    make_preference_dataset,
    make_prompt_set,
    make_ranked_dataset,
    make_sft_dataset,
)
from jaxrl.synthetic.gold import gold_reward
from jaxrl.synthetic.labels import label_pair, label_pairs, preference_probability, rank_list
from jaxrl.synthetic.responses import sample_response
from jaxrl.synthetic.tokenizer import SyntheticTokenizer
from jaxrl.synthetic.world import (
    DOMAINS,
    MAX_RESPONSE_WORDS,
    SPLITS,
    is_eval_text,
    make_prompt_record,
    sample_prompt,
    text_split,
)

__all__ = [
    "DATASETS",
    "DOMAINS",
    "LabelledPairs",
    "MAX_RESPONSE_WORDS",
    "PREFERENCE_KINDS",
    "PROMPT_SETS",
    "PROMPT_SET_MIXES",
    "SPLITS",
    "SyntheticTokenizer",
    "dataset_stats",
    "expected_flip_rate",
    "gold_reward",
    "is_eval_text",
    "label_pair",
    "label_pairs",
    "rank_list",
    "make_eval_prompts",
    "make_gold_lists",
    "make_gold_pairs",
    "make_on_policy_dataset",
    "make_preference_dataset",
    "make_ranked_dataset",
    "make_prompt_record",
    "make_prompt_set",
    "make_sft_dataset",
    "preference_probability",
    "sample_prompt",
    "sample_response",
    "text_split",
]
