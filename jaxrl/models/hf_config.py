"""Hugging Face config.json <-> ModelConfig: the supported architectures, their block variants, and what a
config.json may not ask for (an unsupported feature is an HFCheckpointError, never a different model)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxrl.config import ModelConfig

# Architecture name -> (model family, head). The family decides the block variant (see _FAMILY).
_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "olmo2": "Olmo2"}
ARCHITECTURES: dict[str, tuple[str, str]] = {
    f"{prefix}For{kind}": (family, head)
    for family, prefix in _PREFIX.items()
    for kind, head in (("CausalLM", "lm"), ("SequenceClassification", "scalar"))
}

# Per family: its model_type and the block variant it fixes.
_FAMILY: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", qk_norm="none", norm_position="pre"),
    "mistral": dict(model_type="mistral", qk_norm="none", norm_position="pre"),
    "qwen2": dict(model_type="qwen2", qk_norm="none", norm_position="pre"),
    "qwen3": dict(model_type="qwen3", qk_norm="head", norm_position="pre"),
    "olmo2": dict(model_type="olmo2", qk_norm="full", norm_position="post"),
}

SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# The ModelConfig fields a checkpoint fixes (its architecture; the rest are compute settings): an import takes
# them from config.json (jaxrl.convert), and hf_config_for checks that config.json keeps them.
ROPE_SCALING_KEYS = (
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_positions",
)
ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden",
    "layers",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "norm_eps",
    "rope_theta",
    "rope_scaling",
    *ROPE_SCALING_KEYS,
    "qkv_bias",
    "qk_norm",
    "norm_position",
    "sliding_window",
    "window_layers",
    "tie_embeddings",
)


class HFCheckpointError(ValueError):
    """An unsupported, incomplete or inconsistent Hugging Face checkpoint."""


def is_hf_dir(path: str | Path) -> bool:
    """A directory holding an HF config.json (with `architectures`) rather than a jaxrl run."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    return "architectures" in json.loads(cfg_file.read_text())


def read_hf_config(path: str | Path) -> dict:
    """The checkpoint's config.json as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HFCheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    return json.loads(file.read_text())


def architecture_of(hf: Mapping[str, Any]) -> str:
    """The single supported architecture a config.json names, or an error listing what is supported."""
    names = hf.get("architectures") or []
    if not names and hf.get("model_type") in _FAMILY:
        names = [_PREFIX[hf["model_type"]] + "ForCausalLM"]  # a bare config: the causal LM of its family
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise HFCheckpointError(
            f"unsupported architecture {names or '(none in config.json)'}; supported: {sorted(ARCHITECTURES)}"
        )
    return names[0]


def _rope_params(hf: Mapping[str, Any]) -> dict:
    """RoPE settings from either transformers 4 (`rope_theta` + `rope_scaling`) or 5 (`rope_parameters`)."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if "full_attention" in params and isinstance(params["full_attention"], Mapping):
        params = params["full_attention"]  # nested by layer type; these families use full attention only
    params = dict(params)
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _check_unsupported(hf: Mapping[str, Any], family: str) -> None:
    """Refuses config features the model does not implement, rather than loading a different model."""
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if family != "qwen2" and hf.get("attention_bias", False):
        raise HFCheckpointError("attention_bias=True (which includes an o_proj bias) is not supported")
    if hf.get("mlp_bias", False):
        raise HFCheckpointError("mlp_bias=True is not supported")


def _sliding_window(hf: Mapping[str, Any], family: str) -> tuple[int, int]:
    """(sliding_window, window_layers) as ModelConfig holds them: Mistral windows every layer when
    `sliding_window` is set; Qwen2/3 when `use_sliding_window`, from layer `max_window_layers` on (or as
    `layer_types` says, when it is full attention then sliding attention)."""
    window = hf.get("sliding_window")
    uses = window is not None if family == "mistral" else bool(hf.get("use_sliding_window", False))
    if family not in ("mistral", "qwen2", "qwen3") or not uses or not window:
        return 0, 0
    layers = int(hf["num_hidden_layers"])
    start = 0 if family == "mistral" else min(int(hf.get("max_window_layers", 28)), layers)
    types = hf.get("layer_types")
    if types:
        start = next((i for i, t in enumerate(types) if t == "sliding_attention"), layers)
        if list(types) != ["full_attention"] * start + ["sliding_attention"] * (layers - start):
            raise HFCheckpointError(
                f"layer_types={list(types)} is not supported: only full attention layers "
                f"followed by sliding-window layers"
            )
    return (int(window), start) if start < layers else (0, 0)


def config_from_hf(
    hf: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str = "float32"
) -> ModelConfig:
    """A ModelConfig from a config.json dict; unsupported features are errors."""
    family, head = ARCHITECTURES[architecture_of(hf)]
    _check_unsupported(hf, family)
    if head == "scalar" and int(hf.get("num_labels", len(hf.get("id2label") or [0]))) != 1:
        raise HFCheckpointError(
            "a sequence-classification checkpoint must have num_labels=1 to be a reward model"
        )
    rope = _rope_params(hf)
    if rope["rope_type"] not in ("default", "llama3"):
        raise HFCheckpointError(f"rope type {rope['rope_type']!r} is not supported (only default and llama3)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    llama3 = rope["rope_type"] == "llama3"
    sliding_window, window_layers = _sliding_window(hf, family)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden=hidden,
        layers=int(hf["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        mlp=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope["rope_theta"]),
        rope_scaling="llama3" if llama3 else "none",
        rope_factor=float(rope.get("factor", 8.0)) if llama3 else ModelConfig.rope_factor,
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0))
        if llama3
        else ModelConfig.rope_low_freq_factor,
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0))
        if llama3
        else ModelConfig.rope_high_freq_factor,
        rope_original_max_positions=int(
            rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        )
        if llama3
        else ModelConfig.rope_original_max_positions,
        qkv_bias=family == "qwen2",
        qk_norm=_FAMILY[family]["qk_norm"],
        norm_position=_FAMILY[family]["norm_position"],
        sliding_window=sliding_window,
        window_layers=window_layers,
        # All five families default to untied embeddings when the key is absent.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head=head,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def architecture_for(cfg: ModelConfig) -> str:
    """The natural HF architecture of a model: Qwen3 / OLMo 2 / Qwen2 / Llama by its block variant."""
    if cfg.qk_norm == "head":
        family = "Qwen3"
    elif cfg.qk_norm == "full":
        family = "Olmo2"
    elif cfg.qkv_bias:
        family = "Qwen2"
    else:
        family = "Mistral" if cfg.sliding_window else "Llama"
    return f"{family}For{'SequenceClassification' if cfg.head == 'scalar' else 'CausalLM'}"


# What a config.json round trip must keep: the architecture (head_size for head_dim, whose 0 means
# hidden // heads; the llama3 RoPE fields only when they are used) and the head.
_STRUCTURAL = tuple(
    "head_size" if k == "head_dim" else k for k in ARCHITECTURE_KEYS if k not in ROPE_SCALING_KEYS
) + ("head",)


def hf_config_for(
    cfg: ModelConfig, architecture: str | None = None, overrides: Mapping | None = None
) -> dict:
    """A config.json dict describing `cfg` as `architecture`; an error if that architecture cannot hold it."""
    architecture = architecture or architecture_for(cfg)
    if architecture not in ARCHITECTURES:
        raise HFCheckpointError(
            f"unsupported architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}"
        )
    family, _ = ARCHITECTURES[architecture]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_positions,
        )
    max_positions = 4096
    if cfg.rope_scaling == "llama3":
        max_positions = int(cfg.rope_original_max_positions * cfg.rope_factor)
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": _FAMILY[family]["model_type"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.mlp,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings, so transformers 4 (rope_theta/rope_scaling) and 5 (rope_parameters) read the same.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling != "none" else None,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
        "use_cache": True,
    }
    if family != "qwen2":
        hf["attention_bias"] = False
    if family == "llama":
        hf["mlp_bias"] = False
    if family in ("mistral", "qwen2", "qwen3"):
        hf.update(sliding_window=None, use_sliding_window=False)
        if cfg.sliding_window:
            hf.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
            if family != "mistral":
                hf["max_window_layers"] = cfg.window_layers
    if cfg.head == "scalar":
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    hf.update(overrides or {})
    parsed = config_from_hf(hf, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    differ = [f for f in _STRUCTURAL if getattr(parsed, f) != getattr(cfg, f)]
    if cfg.rope_scaling == "llama3":
        differ += [f for f in ROPE_SCALING_KEYS if getattr(parsed, f) != getattr(cfg, f)]
    if differ:
        raise HFCheckpointError(
            f"architecture {architecture} cannot represent this model: {differ} would change"
        )
    return hf
