"""Typed, frozen configuration with dotted overrides (`loss.beta=0.3`); unknown keys, bad types are errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxrl.config_ranges import (  # noqa: F401  (the range table, re-exported)
    FINITE,
    LABEL_SMOOTHING_RANGES,
    MESH_AXIS,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PREFERENCE_LOSS_RANGES,
    RANGES,
    RL_RANGES,
    UNIT,
    UNIT_OPEN_TOP,
    Range,
    interval,
)

STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "rloo", "reinforce_pp", "online_dpo", "nash_md")
RL_STAGES = STAGES[3:]
# model.remat: no remat, or a policy of jaxrl.models.transformer.REMAT_POLICIES (one key per name)
REMATS = ("none", "full", "dots", "dots_no_batch", "offload")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 64
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 0  # 0: hidden // heads
    mlp: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "none" | "llama3"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head) | "full" (OLMo 2: over all heads)
    norm_position: str = "pre"  # "pre" (Llama) | "post" (OLMo 2: norm after each sublayer)
    # Mistral / Qwen2 sliding-window attention: 0 is full attention; W > 0 lets each token attend to itself
    # and the W - 1 tokens before it, in the layers from window_layers on (Qwen2's max_window_layers; 0: all)
    sliding_window: int = 0
    window_layers: int = 0
    tie_embeddings: bool = False
    head: str = "lm"  # "lm" (next-token logits) | "scalar" (reward / value per position)
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights
    remat: str = "none"  # "none" | "full" | "dots" | "dots_no_batch" | "offload" (full, inputs on the host)
    scan_layers: bool = True
    # "auto" (splash on TPU, cuDNN flash attention on GPU where it fits, XLA elsewhere) | "xla" | "cudnn" |
    # "splash" (Pallas; interpret mode off a TPU): see jaxrl.models.attention
    attention: str = "auto"
    # Token log-probs over sequence chunks of this many positions, logits rematerialised in the backward pass
    # (no fp32 [B, T, V] array); 0: all positions at once
    logprob_chunk: int = 0
    init_std: float = 0.02
    # LoRA (jaxrl.models.lora): adapters of this rank on the kernels whose parameter path matches lora_targets
    # (a regex, as the sharding table's); only they (and a scalar head) train, the base stays frozen; 0: off
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_targets: str = r"attn/(q|k|v|o)/kernel$|mlp/(gate|up|down)/kernel$"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    preset: str = "fsdp"  # see jaxrl.sharding.PRESETS
    # What the data axis spans over the data-centre network (DCN) when the devices form several granules:
    # "slice": TPU slices (multi-slice; devices' slice_index); "process": each process (multi-node GPU over
    # InfiniBand/Ethernet, or CPU processes standing in for slices). fsdp and tensor stay within a granule.
    granule: str = "slice"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    schedule: str = "cosine"  # "constant" | "linear" | "cosine"
    warmup_ratio: float = 0.1
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables


@dataclasses.dataclass(frozen=True)
class LossConfig:
    name: str = "dpo"  # a preference loss for stage dpo (jaxrl.losses.PREFERENCE_LOSSES)
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0
    nll_alpha: float = 0.0
    rm_center: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    sft_aggregation: str = "token_mean"  # "token_mean" | "sequence_mean"
    rm_margin: bool = False  # subtract the data's per-pair margin in the reward-model loss (Llama 2 style)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # "synthetic" or a local file / directory path
    format: str = ""  # reader name for a file source (jaxrl.data.readers.READERS)
    tokenizer: str = ""  # local directory with tokenizer.json (file sources; the synthetic world has its own)
    synthetic_kind: str = "clean"  # preference dataset kind in the synthetic world
    num_train: int = 2048
    num_eval: int = 256
    max_len: int = 48
    max_prompt_len: int = 24
    binarize: str = "best_vs_random"  # rated completions -> pairs (jaxrl.data.binarize.POLICIES)
    # Ranked lists: the synthetic world makes K responses per prompt ranked by its labeller when K >= 2 (0:
    # pairs); a listwise loss (jaxrl.listwise) trains on lists of K (longer ones cut, shorter ones masked),
    # a pairwise one on pairs binarised from them by data.binarize.
    list_size: int = 0
    aspect_reduce: str = "mean"  # per-aspect ratings -> one score: "mean" or an aspect name
    # per-aspect weights (jaxrl.data.binarize.parse_aspects): "" the format's default (helpsteer: helpfulness
    # alone, else aspect_reduce), a preset ("tulu25", "helpsteer2"), or "helpfulness=0.3,correctness=0.74"
    aspect_weights: str = ""
    min_margin: float = 0.0  # rated completions -> pairs: a pair whose rating gap is below this is dropped
    # several sources in one (set data.source=mixture): a JSON list of {"source", "format", "count" or
    # "weight", "binarize", "aspect_weights", "min_margin", "replace"} (jaxrl.data.sources.mixture_records)
    mixture: str = ""
    truncation: str = "drop"  # "drop" the example | "truncate" (prompt from the left, completion the right)
    on_error: str = "raise"  # "raise" | "skip" (counted) for malformed rows
    # "max_len": every batch is max_len wide | "bucket": each batch is cut to the smallest multiple of
    # bucket_multiple that holds its longest example (a few shapes, each compiled once) | "pack" (sft):
    # several conversations per row, kept apart by segment ids (attention and positions restart;
    # train.batch_size then counts packed rows)
    padding: str = "max_len"
    bucket_multiple: int = 64
    group_by_length: bool = False  # batches of similar lengths (windows of 64 batches sorted), for "bucket"
    eval_prompts_per_domain: int = 32  # synthetic world: held-out prompts per domain for gold eval (0: off)
    eval_max_new: int = 16  # synthetic world: response tokens sampled at evaluation
    eval_samples: int = 8  # synthetic world: responses sampled per prompt (primary metric: their mean gold)
    eval_temperature: float = 1.0  # synthetic world: the temperature those responses are sampled at
    val_prompts_per_domain: int = 16  # synthetic world: validation prompts per domain (curves, selection)
    eval_best_of: int = 0  # synthetic world: SFT runs sample this many per test prompt for best-of-N ceilings


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 16  # global examples (pairs for rm/dpo) per optimiser step
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    init_from: str = ""  # a workdir (or checkpoint directory) whose final parameters initialise this run
    reference: str = "cache"  # "cache" (precomputed, content-hashed on disk) | "on_the_fly"
    reference_from: str = ""  # reference model for dpo; "" means init_from
    cache_dir: str = ""  # "" means <workdir>/cache
    tensorboard: bool = True
    progress: bool = True
    # A run fails (non-zero exit, summary marked failed) when more than this fraction of its updates had a
    # non-finite loss, gradient or update; a run whose first update is non-finite stops at once.
    max_skipped_fraction: float = 0.02


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Online RL (stages ppo, grpo, rloo, reinforce_pp, online_dpo, nash_md); defaults: the Tulu 2.5 PPO
    recipe."""

    prompt_set: str = "in_domain"  # synthetic prompt set (jaxrl.synthetic.PROMPT_SETS) or a prompts file
    num_prompts: int = 1024
    # Held-out prompts a run on a prompts file is evaluated on (RM score, KL, length, EOS rate as val/*, every
    # train.eval_every iterations and at the end): the last eval_prompts of prompt_set (training takes at
    # most num_prompts of the others), or the first of eval_prompt_set when given. 0: no held-out evaluation.
    eval_prompts: int = 0
    eval_prompt_set: str = ""
    rollout_batch: int = 64  # prompts per rollout batch
    samples_per_prompt: int = 1  # G for grpo / rloo / reinforce_pp; 2 for online_dpo and nash_md
    minibatch: int = 64  # sequences per optimiser minibatch
    epochs: int = 1  # passes over each rollout batch
    max_new_tokens: int = 16
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    reward_model: str = ""  # run dir (or HF dir) of a reward model; several joined by "," form an ensemble
    # (a value that is itself an existing path is one model: sweep run dirs have commas in their names)
    ensemble: str = "mean"  # "mean" | "min" | "uncertainty"
    reward_transform: str = "none"  # "none" | "log_sigmoid_centered"
    verifiable: str = ""  # "" | "gold" (the synthetic world's gold reward) | "exact_match"
    missing_eos_penalty: float = -10.0
    length_penalty: float = 0.0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # "k1" | "k2" | "k3"
    kl_target: float = 0.0  # > 0: adaptive coefficient (Ziegler controller) towards this KL
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip: float = 0.2
    clip_high: float = 0.0  # 0: same as clip
    value_clip: float = 0.2
    value_coef: float = 0.1
    value_init: str = "reward_model"  # "reward_model" | "policy"
    value_lr: float = 0.0  # 0: same as optim.lr
    aggregation: str = "grpo"  # "grpo" | "dapo" | "dr_grpo" (token aggregation of the policy loss)
    scale_rewards: bool = True  # divide group advantages by the group std (off for Dr. GRPO)
    recompute_old_logps: bool = False  # reproduce the original JAX implementation (ratio exactly 1)
    offload_frozen: bool = False  # keep reference and reward model on the host between uses
    advantage: str = ""  # estimator in jaxrl.rl.advantages; "": the stage's (ppo gae, grpo grpo, ...)
    kl_mode: str = "auto"  # "reward" (-kl_coef*kl_t per token) | "loss" (+kl_coef*kl) | "auto" (grpo: loss)
    kl_loss_estimator: str = "k3"  # estimator of the KL term in the loss (kl_estimator is the reward's)
    kl_horizon: int = 10000  # adaptive KL controller horizon (sequences)
    dual_clip: float = 0.0  # > 1: dual-clip constant c (caps the loss at -c*A for A < 0); 0 disables
    entropy_coef: float = 0.0  # entropy bonus in the policy loss
    uncertainty_coef: float = 1.0  # k of the "uncertainty" ensemble (mean - k * std)
    reward_norm: str = "none"  # "none" | "batch" (standardise scores over the rollout batch)
    # nash_md: the comparison response is sampled from the token-level geometric mixture of the policy and the
    # reference, logits (1 - c) * policy + c * reference (TRL's NashMDConfig.mixture_coef); its KL penalty's
    # coefficient (TRL's beta) is rl.kl_coef, in the loss
    mixture_coef: float = 0.5
    # Constrained RLHF (Moskovitz et al. 2023): a JSON list of {"reward_model" (run dirs, "," an ensemble) or
    # "verifiable", "threshold", optional "name", "lambda_init"}, each a constraint mean reward >= threshold
    # with a Lagrange multiplier; the policy's reward is the objective's + sum of lambda_i * reward_i
    # (jaxrl.rewards.parse_constraints, jaxrl.rl.constraints)
    constraints: str = ""
    lambda_lr: float = 0.05  # projected gradient ascent step of the multipliers, per iteration (0: fixed)


@dataclasses.dataclass(frozen=True)
class Config:
    stage: str = "sft"
    name: str = ""
    seed: int = 0
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    rl: RLConfig = RLConfig()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")


class ConfigError(ValueError):
    """A bad key, value or combination in a config."""


def valid_keys(cfg: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config dataclass."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts `value` (possibly a CLI string) to the field's declared type, or raises ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None):
                if value is None or (isinstance(value, str) and value.lower() == "none"):
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot read {value!r} as {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _set(cfg: Any, path: list[str], value: Any, full_key: str) -> Any:
    hints = typing.get_type_hints(type(cfg))
    name = path[0]
    if name not in hints:
        raise KeyError(name)
    current = getattr(cfg, name)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{full_key} is a section; set one of its keys, e.g. {full_key}.<key>")
        return dataclasses.replace(cfg, **{name: _coerce(value, hints[name], full_key)})
    if not dataclasses.is_dataclass(current):
        raise KeyError(name)
    return dataclasses.replace(cfg, **{name: _set(current, path[1:], value, full_key)})


def override(cfg: Config, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """Applies dotted overrides: a mapping {"loss.beta": 0.3} (or "loss__beta") or strings "loss.beta=0.3"."""
    if not isinstance(overrides, Mapping):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value")
            key, value = item.split("=", 1)
            pairs[key.strip()] = value.strip()
        overrides = pairs
    for key, value in overrides.items():
        dotted = key.replace("__", ".")
        try:
            cfg = _set(cfg, dotted.split("."), value, dotted)
        except KeyError:
            keys = "\n  ".join(valid_keys(cfg))
            raise ConfigError(f"unknown config key {dotted!r}; valid keys are:\n  {keys}") from None
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as nested plain dicts (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def flat_dict(data: Config | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config (or its `to_dict` output) as {dotted key: leaf value}."""
    if isinstance(data, Config):
        data = to_dict(data)
    out: dict[str, Any] = {}
    for k, v in data.items():
        out |= flat_dict(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v}
    return out


def from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuilds a Config from `to_dict` output; unknown keys are errors."""
    flat = flat_dict(data)
    stage = flat.pop("stage", "sft")
    return override(Config(stage=stage), flat)


def save(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config as JSON."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def load_experiment(path: str | Path) -> types.ModuleType:
    """Imports an experiment file that defines get_config() (and optionally sweep(), metrics())."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"jaxrl_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment file {path} must define get_config()")
    return module


def _lookup(cfg: Any, key: str) -> Any:
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def check_ranges(cfg: Config, rows: Iterable[tuple[str, Range]]) -> None:
    """Raises ConfigError naming the first field outside its range."""
    for key, allowed in rows:
        value = _lookup(cfg, key)
        if not allowed.test(value):
            raise ConfigError(f"{key} must be {allowed.text}, got {value!r}")


def check_choices(choices: Mapping[str, tuple[Any, Sequence[Any]]]) -> None:
    """Raises ConfigError naming the first dotted key whose value is not one of its allowed values."""
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Checks value ranges and cross-field constraints that types cannot express; returns cfg.

    This is the structural part: the names a config gives to registries (losses, readers, estimators, rewards)
    are checked by the modules that own them, all gathered by `jaxrl.validate.validate`."""
    m, t = cfg.model, cfg.train
    choices = {
        "model.rope_scaling": (m.rope_scaling, ("none", "llama3")),
        "model.qk_norm": (m.qk_norm, ("none", "head", "full")),
        "model.norm_position": (m.norm_position, ("pre", "post")),
        "model.head": (m.head, ("lm", "scalar")),
        "model.remat": (m.remat, REMATS),
        "model.attention": (m.attention, ("auto", "xla", "cudnn", "splash")),
        "model.dtype": (m.dtype, ("float32", "bfloat16", "float16")),
        "model.param_dtype": (m.param_dtype, ("float32", "bfloat16")),
        "optim.schedule": (cfg.optim.schedule, ("constant", "linear", "cosine")),
        "loss.sft_aggregation": (cfg.loss.sft_aggregation, ("token_mean", "sequence_mean")),
        "data.truncation": (cfg.data.truncation, ("drop", "truncate")),
        "data.on_error": (cfg.data.on_error, ("raise", "skip")),
        "data.padding": (cfg.data.padding, ("max_len", "bucket", "pack")),
        "train.reference": (t.reference, ("cache", "on_the_fly")),
        "mesh.granule": (cfg.mesh.granule, ("slice", "process")),
    }
    check_choices(choices)
    check_ranges(cfg, RANGES)  # before anything divides by a count
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError(
            f"mesh.data, mesh.fsdp and mesh.tensor must be -1 (all remaining devices) at most "
            f"once, got {cfg.mesh.data}, {cfg.mesh.fsdp}, {cfg.mesh.tensor}"
        )
    if cfg.stage == "rm":
        check_ranges(cfg, [("loss.rm_center", NON_NEGATIVE)])
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        raise ConfigError(
            f"model.rope_high_freq_factor must be greater than model.rope_low_freq_factor "
            f"({m.rope_low_freq_factor}) for rope_scaling=llama3, "
            f"got {m.rope_high_freq_factor}"
        )
    if m.heads % m.kv_heads:
        raise ConfigError(f"model.heads ({m.heads}) must be a multiple of model.kv_heads ({m.kv_heads})")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})"
        )
    if (cfg.data.source == "mixture") != bool(cfg.data.mixture):
        raise ConfigError("data.mixture and data.source=mixture go together (one names the other)")
    if cfg.data.max_prompt_len >= cfg.data.max_len:
        raise ConfigError("data.max_prompt_len must be smaller than data.max_len")
    if cfg.data.padding == "pack" and cfg.stage != "sft":
        raise ConfigError(
            f"data.padding=pack packs SFT conversations; stage {cfg.stage} trains on pairs, whose "
            f"rows are scored one per example: use data.padding=bucket"
        )
    if cfg.stage in RL_STAGES:
        _validate_rl(cfg)
    return cfg


def reward_model_sources(value: str) -> list[str]:
    """The reward-model dirs named by rl.reward_model: one path, or several joined by "," (an ensemble). A
    value that is an existing path as a whole is one model, so run dirs whose names hold commas need no
    quoting."""
    value = value.strip()
    if not value:
        return []
    if Path(value).exists():
        return [value]
    return [s.strip() for s in value.split(",") if s.strip()]


def _validate_rl(cfg: Config) -> None:
    """Structural checks of the rl section for the online-RL stages (its names: jaxrl.validate)."""
    r = cfg.rl
    check_choices(
        {
            "rl.kl_mode": (r.kl_mode, ("auto", "reward", "loss")),
            "rl.value_init": (r.value_init, ("reward_model", "policy")),
            "rl.reward_norm": (r.reward_norm, ("none", "batch")),
        }
    )
    check_ranges(cfg, RL_RANGES)
    if not r.reward_model and not r.verifiable:
        raise ConfigError(
            f"stage {cfg.stage} needs a reward: set rl.reward_model (a reward-model run) "
            f"and/or rl.verifiable (gold | exact_match)"
        )
    if r.reward_transform != "none" and not r.reward_model:
        raise ConfigError(
            f"rl.reward_transform={r.reward_transform!r} transforms reward-model scores; set rl.reward_model"
        )
    # The algorithm's own rules (two samples per prompt, value init, minibatch units) are its table entry's:
    # jaxrl.rl.algorithms.check_config, through jaxrl.validate.
    rows = r.rollout_batch * r.samples_per_prompt
    if rows % r.minibatch:
        raise ConfigError(
            f"rl.minibatch ({r.minibatch}) must divide the rollout batch's {rows} sequences "
            f"(rl.rollout_batch x rl.samples_per_prompt)"
        )
