"""Tiny random Hugging Face checkpoints written by tests (no downloads): a byte-level BPE tokenizer trained
here, a Llama causal LM and a Llama sequence-classification reward model sharing it."""

from __future__ import annotations

WORDS = (
    "the cat sat on a mat and the dog ran to the red house ; one two three four five six seven eight nine "
    "ten plus minus equals answer question : is what how many apples does tom have ?"
).split()
CORPUS = [" ".join(WORDS[i : i + 9]) for i in range(len(WORDS) - 9)] + ["1 + 2 = 3", "4 + 5 = 9", "Q: A:\n\n"]


def write_tokenizer(directory):
    """A byte-level BPE tokenizer (GPT-2/Llama 3 style) trained here, BOS added by its post-processor:
    (transformers fast tokenizer, vocab size)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)
    return fast, tok.get_vocab_size()


def randomize(model, seed):
    """Large random weights (norms near 1), so that a tiny model's outputs differ clearly between inputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)


def write_llama(directory, seed=0):
    """(torch LlamaForCausalLM, tokenizer) of a tiny random Llama saved with its tokenizer in `directory`."""
    import transformers

    tok, vocab = write_tokenizer(directory)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    randomize(model, seed=seed)
    model.save_pretrained(directory)
    return model, tok


def write_reward_model(directory, like, tok, seed=1):
    """A tiny random Llama reward model (sequence classification, one label) shaped as the causal model
    `like`, saved with `tok`; returns the torch model."""
    import transformers

    base = {k: v for k, v in like.config.to_dict().items() if k not in ("id2label", "label2id")}
    config = transformers.LlamaConfig(
        **{**base, "num_labels": 1, "architectures": ["LlamaForSequenceClassification"]}
    )
    rm = transformers.LlamaForSequenceClassification(config).eval()
    randomize(rm, seed=seed)
    rm.save_pretrained(directory)
    tok.save_pretrained(directory)
    return rm
