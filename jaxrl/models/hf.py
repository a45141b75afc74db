"""Hugging Face checkpoints: config.json + safetensors <-> (ModelConfig, params), read tensor by tensor.

Supported: Llama (2, 3.x with llama3 RoPE scaling), Mistral, Qwen2 (QKV bias), Qwen3 (per-head QK-norm),
OLMo 2 (QK-norm over all heads, post-norm), each as *ForCausalLM (head "lm") or *ForSequenceClassification
(head "scalar", one label). Loading reads, for each device shard, only the part of each HF tensor that the
shard needs and puts it on its devices before reading the next, so besides the device buffers the host holds
one shard of one parameter at a time (a whole stacked parameter when there is no mesh).

Reward convention: a *ForSequenceClassification model scores every position; the sequence's reward is the
score at its last real token, i.e. the rightmost position where `mask_BT` is set (`last_token_scores`). This
equals transformers' pooling (the rightmost token that is not `pad_token_id`) when `mask_BT = tokens != pad`,
for right or left padding, and stays right when the pad id equals the eos id.

This module gathers the public names of four: hf_config (config.json <-> ModelConfig), hf_weights (the tensor
table and sharded partial reads), hf_save (writing a checkpoint) and hf_model (HFModel and load_model).
"""

from jaxrl.models.abstract import abstract_model
from jaxrl.models.hf_config import (
    ARCHITECTURE_KEYS,
    ARCHITECTURES,
    SPECIAL_TOKEN_KEYS,
    HFCheckpointError,
    architecture_for,
    architecture_of,
    config_from_hf,
    hf_config_for,
    is_hf_dir,
    read_hf_config,
)
from jaxrl.models.hf_model import HFModel, last_token_scores, load_model
from jaxrl.models.hf_save import GENERATION_FILE, TOKENIZER_FILES, save_hf
from jaxrl.models.hf_weights import (
    INDEX_FILE,
    WEIGHTS_FILE,
    TensorMap,
    from_hf_layout,
    hf_tensor_shapes,
    load_hf,
    tensor_maps,
    to_hf_layout,
)

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_KEYS",
    "GENERATION_FILE",
    "INDEX_FILE",
    "SPECIAL_TOKEN_KEYS",
    "TOKENIZER_FILES",
    "WEIGHTS_FILE",
    "HFCheckpointError",
    "HFModel",
    "TensorMap",
    "abstract_model",
    "architecture_for",
    "architecture_of",
    "config_from_hf",
    "from_hf_layout",
    "hf_config_for",
    "hf_tensor_shapes",
    "is_hf_dir",
    "last_token_scores",
    "load_hf",
    "load_model",
    "read_hf_config",
    "save_hf",
    "tensor_maps",
    "to_hf_layout",
]
