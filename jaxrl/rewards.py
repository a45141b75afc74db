"""Rewards for online RL behind one interface: `RewardFn(prompts, responses_tokens, responses_mask, texts)`
returns scores [B].

Parts, each chosen by name from a registry:
  reward models   `head="scalar"` run directories, scored at the last response token of prompt + response
                  (the left-pad / positions / segment convention of `jaxrl.sampling`)
  ensembles       mean, min (worst case), uncertainty (mean − k·std) over several reward models
  transforms      log_sigmoid_centered: log σ(r − r_ref), r_ref the score of the reference policy's greedy
                  response to the same prompt ("Transforming and Combining Rewards", Wang et al. 2024);
                  applied per reward model before the ensemble, so a sum of transformed rewards is a soft AND
  verifiable      gold (the synthetic world's gold reward of the decoded text) and exact_match (the text
                  against PromptRecord.ground_truth); added to the reward-model score, untransformed
  shaping         batch normalisation, a missing-EOS penalty (added) and a per-token length penalty
  constraints     rl.constraints: further rewards (reward models, ensembled and transformed as above, or a
                  verifiable reward), each a component "constraint/<name>" [B] beside the objective's "score";
                  `jaxrl.rl.constraints` weighs them in with their Lagrange multipliers

A reward model must share the policy's tokenizer: scoring re-reads the policy's token ids (re-tokenising text
for a different tokenizer is not supported, as in TRL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl import config as config_lib
from jaxrl import sharding
from jaxrl.config import ConfigError
from jaxrl.data.records import PromptRecord
from jaxrl.models import init as model_init


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Prompts of a rollout batch: their records and left-padded token ids / validity mask [B, P]."""

    records: Sequence[PromptRecord]
    ids_BP: np.ndarray
    mask_BP: np.ndarray


RewardFn = Callable[[PromptBatch, np.ndarray, np.ndarray, Sequence[str]], np.ndarray]


def join_prompt_response(prompt_BP, prompt_mask_BP, response_BN):
    """(tokens, positions, segment ids) [B, P+N] of left-padded prompts followed by responses, as in
    `jaxrl.sampling`: pads are segment 0, positions count real tokens only."""
    tokens_BT = jnp.concatenate([prompt_BP, response_BN.astype(prompt_BP.dtype)], axis=1)
    valid_BT = jnp.concatenate([prompt_mask_BP, jnp.ones(response_BN.shape, prompt_mask_BP.dtype)], axis=1)
    positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
    return tokens_BT, positions_BT, valid_BT


@functools.partial(jax.jit, static_argnames=("graphdef", "active_mesh"))
def score_responses(
    graphdef, params, prompt_BP, prompt_mask_BP, response_BN, response_mask_BN, active_mesh=None
):
    """Scalar-head score [B] read at the last response token (the EOS when the response has one).

    `active_mesh`: the (mesh, preset) the trace belongs to, so that its activations are constrained to the
    run's layout and `model.attention=auto` resolves for the mesh's platform (a static argument: a cache hit
    never reuses another mesh's trace). Without it the compiler places activations by propagation alone."""
    model = nnx.merge(graphdef, params)
    tokens_BT, positions_BT, segments_BT = join_prompt_response(prompt_BP, prompt_mask_BP, response_BN)
    with sharding.use_mesh(*active_mesh) if active_mesh is not None else contextlib.nullcontext():
        scores_BT = model.scores(model.hidden(tokens_BT, positions_BT, segments_BT))
    N, P = response_BN.shape[1], prompt_BP.shape[1]
    last_B = jnp.max(jnp.where(response_mask_BN > 0, jnp.arange(N), 0), axis=-1)
    return jnp.take_along_axis(scores_BT, (P + last_B)[:, None], axis=-1)[:, 0]


def gold_scores(prompts: PromptBatch, tokens_BN, mask_BN, texts: Sequence[str]) -> np.ndarray:
    """The synthetic world's gold reward [B] of each decoded response."""
    from jaxrl.synthetic import gold_reward

    return np.asarray([gold_reward(r, t) for r, t in zip(prompts.records, texts, strict=True)], np.float32)


def _normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().split())


def exact_match_scores(prompts: PromptBatch, tokens_BN, mask_BN, texts: Sequence[str]) -> np.ndarray:
    """1 where the response equals the record's ground_truth (case and whitespace normalised), else 0 [B]."""
    out = []
    for record, text in zip(prompts.records, texts, strict=True):
        if record.ground_truth is None:
            raise ValueError(f"exact_match reward: prompt {record.id!r} has no ground_truth")
        out.append(float(_normalise_answer(text) == _normalise_answer(record.ground_truth)))
    return np.asarray(out, np.float32)


VERIFIABLE_REWARDS: dict[str, RewardFn] = {"gold": gold_scores, "exact_match": exact_match_scores}


def ensemble_mean(scores_KB: np.ndarray, coef: float) -> np.ndarray:
    """Mean over reward models [B]."""
    return np.mean(scores_KB, axis=0)


def ensemble_min(scores_KB: np.ndarray, coef: float) -> np.ndarray:
    """Worst case over reward models [B]."""
    return np.min(scores_KB, axis=0)


def ensemble_uncertainty(scores_KB: np.ndarray, coef: float) -> np.ndarray:
    """Mean − coef · std over reward models [B] (uncertainty-weighted optimisation)."""
    return np.mean(scores_KB, axis=0) - coef * np.std(scores_KB, axis=0)


ENSEMBLES: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "mean": ensemble_mean,
    "min": ensemble_min,
    "uncertainty": ensemble_uncertainty,
}


def transform_none(scores_B: np.ndarray, reference_B: np.ndarray | None) -> np.ndarray:
    """The raw score [B]."""
    return scores_B


def log_sigmoid_centered(scores_B: np.ndarray, reference_B: np.ndarray | None) -> np.ndarray:
    """log σ(r − r_ref) [B]: saturates once a response beats the reference, so no single prompt dominates."""
    return -np.logaddexp(0.0, -(scores_B - reference_B)).astype(np.float32)


TRANSFORMS: dict[str, Callable] = {"none": transform_none, "log_sigmoid_centered": log_sigmoid_centered}
NEEDS_REFERENCE_SCORES = ("log_sigmoid_centered",)


def check_config(rl: config_lib.RLConfig) -> None:
    """rl.ensemble, rl.reward_transform and rl.verifiable name registered ones, rl.constraints parses
    (ConfigError otherwise)."""
    config_lib.check_choices(
        {
            "rl.ensemble": (rl.ensemble, tuple(ENSEMBLES)),
            "rl.reward_transform": (rl.reward_transform, tuple(TRANSFORMS)),
            "rl.verifiable": (rl.verifiable, ("",) + tuple(VERIFIABLE_REWARDS)),
        }
    )
    parse_constraints(rl.constraints)


@dataclasses.dataclass(frozen=True)
class ConstraintSpec:
    """One entry of rl.constraints: the constraint E[reward] >= threshold on a reward (reward-model run dirs,
    several joined by "," an ensemble under rl.ensemble, or a verifiable reward), its multiplier's start."""

    name: str
    threshold: float
    reward_model: str = ""
    verifiable: str = ""
    lambda_init: float = 0.0


CONSTRAINT_KEYS = ("name", "reward_model", "verifiable", "threshold", "lambda_init")
_CONSTRAINT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def parse_constraints(text: str) -> list[ConstraintSpec]:
    """rl.constraints parsed: a JSON list of {"reward_model" | "verifiable", "threshold", "name",
    "lambda_init"}; "" is no constraint. ConfigError names the entry and key at fault."""
    if not text.strip():
        return []
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"rl.constraints must be a JSON list of constraints: {e}") from None
    if not isinstance(entries, list):
        raise ConfigError("rl.constraints must be a JSON list of constraints")
    specs = []
    for index, entry in enumerate(entries):
        where = f"rl.constraints[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{where} must be an object with a 'reward_model' or 'verifiable' and a 'threshold'"
            )
        if unknown := sorted(set(entry) - set(CONSTRAINT_KEYS)):
            raise ConfigError(f"{where} has unknown keys {unknown}; valid keys are {list(CONSTRAINT_KEYS)}")
        reward_model, verifiable = entry.get("reward_model", ""), entry.get("verifiable", "")
        if not isinstance(reward_model, str) or not isinstance(verifiable, str):
            raise ConfigError(f"{where}: 'reward_model' and 'verifiable' are strings")
        if bool(reward_model) == bool(verifiable):
            raise ConfigError(f"{where} needs one reward: a 'reward_model' or a 'verifiable', not both")
        if verifiable and verifiable not in VERIFIABLE_REWARDS:
            raise ConfigError(
                f"{where}.verifiable must be one of {tuple(VERIFIABLE_REWARDS)}, got {verifiable!r}"
            )
        if not _finite_number(entry.get("threshold")):
            raise ConfigError(f"{where}.threshold must be a finite number, got {entry.get('threshold')!r}")
        lambda_init = entry.get("lambda_init", 0.0)
        if not _finite_number(lambda_init) or lambda_init < 0:
            raise ConfigError(f"{where}.lambda_init must be finite and >= 0, got {lambda_init!r}")
        name = entry.get("name", verifiable or f"c{index}")
        if not isinstance(name, str) or not _CONSTRAINT_NAME.match(name):
            raise ConfigError(f"{where}.name must be letters, digits, '_', '.' or '-', got {name!r}")
        if name in {spec.name for spec in specs}:
            raise ConfigError(f"{where}.name {name!r} is used twice; give each constraint its own name")
        specs.append(
            ConstraintSpec(name, float(entry["threshold"]), reward_model, verifiable, float(lambda_init))
        )
    return specs


def constraint_reward_model_sources(rl: config_lib.RLConfig) -> list[str]:
    """The reward-model dirs of rl.constraints, in order (after the objective's rl.reward_model ones)."""
    specs = parse_constraints(rl.constraints)
    return [s for spec in specs for s in config_lib.reward_model_sources(spec.reward_model)]


def missing_eos(tokens_BN: np.ndarray, mask_BN: np.ndarray, eos_id: int) -> np.ndarray:
    """True [B] where the response holds no EOS (it was cut at the length budget)."""
    return ~np.any((np.asarray(tokens_BN) == eos_id) & np.asarray(mask_BN, bool), axis=-1)


def _check_tokenizer(source: Path, tokenizer) -> None:
    saved = source / "tokenizer.json"
    if not saved.exists() or not hasattr(tokenizer, "to_json"):
        return
    data = json.loads(saved.read_text())
    if data.get("format") == tokenizer.to_json().get("format") and data != tokenizer.to_json():
        raise ConfigError(
            f"reward model {source} has a different tokenizer from the policy's; "
            f"scoring re-reads the policy's token ids, so they must match"
        )


class RewardModel:
    """A scalar-head run scoring prompt + response at the last response token; params are placed once, or
    kept on the host between calls with `offload`."""

    def __init__(self, source: str | Path, *, mesh, preset: str, tokenizer=None, offload: bool = False):
        self.source = Path(source)
        params, model_cfg = model_init.load_run_params(self.source, mesh, preset)
        if model_cfg.head != "scalar":
            raise ConfigError(f"reward model {source} is not a scalar-head (stage rm) run")
        if tokenizer is not None:
            _check_tokenizer(self.source, tokenizer)
            if tokenizer.vocab_size > model_cfg.vocab_size:
                raise ConfigError(
                    f"reward model {source}: vocab {model_cfg.vocab_size} < tokenizer's "
                    f"{tokenizer.vocab_size}"
                )
        self.model_cfg = model_cfg
        self.graphdef, abstract = model_init.abstract_model(model_cfg)
        self.shardings = sharding.tree_shardings(abstract, preset, mesh)
        self.batch_sharding = sharding.batch_sharding(mesh, preset)
        self.divisor = sharding.batch_divisor(mesh, preset)
        self.active_mesh = (mesh, preset)
        self.offload = offload
        self._params = jax.device_get(params) if offload else params

    @property
    def params(self):
        """Device parameters (placed by the rule table when offloaded)."""
        return jax.device_put(self._params, self.shardings) if self.offload else self._params

    def __call__(self, prompts: PromptBatch, tokens_BN, mask_BN, texts=None) -> np.ndarray:
        arrays = (prompts.ids_BP, prompts.mask_BP, np.asarray(tokens_BN), np.asarray(mask_BN))
        if arrays[0].shape[0] % self.divisor == 0:
            arrays = jax.device_put(arrays, self.batch_sharding)
        scores = score_responses(self.graphdef, self.params, *arrays, active_mesh=self.active_mesh)
        return np.asarray(jax.device_get(scores), np.float32)


# Reference responses (for centred transforms) as (tokens [B, N], mask [B, N], texts) of a prompt batch.
ReferenceResponder = Callable[[PromptBatch], tuple[np.ndarray, np.ndarray, list[str]]]


@dataclasses.dataclass
class ConstraintReward:
    """A constraint's reward: its reward models (ensembled and transformed as the objective's) or a verifiable
    reward; `spec` holds its name, threshold and initial multiplier."""

    spec: ConstraintSpec
    models: Sequence[RewardFn] = ()
    # Greedy reference responses' scores by prompt, for centred transforms (as CompositeReward's own cache).
    reference_cache: dict = dataclasses.field(default_factory=dict)


class CompositeReward:
    """Reward models (ensembled, transformed) + verifiable rewards + shaping, as one RewardFn.

    `components()` returns every named part (for logging as rewards/<name>); calling it returns the total.
    Constraint rewards are components "constraint/<name>" that the total leaves out."""

    def __init__(
        self,
        *,
        models: Sequence[RewardFn] = (),
        verifiable: str = "",
        ensemble: str = "mean",
        uncertainty_coef: float = 1.0,
        transform: str = "none",
        normalize: str = "none",
        missing_eos_penalty: float = 0.0,
        length_penalty: float = 0.0,
        eos_id: int = 2,
        reference_responder: ReferenceResponder | None = None,
        constraints: Sequence[ConstraintReward] = (),
    ):
        if not models and not verifiable:
            raise ConfigError(
                "a reward needs a reward model (rl.reward_model) or a verifiable reward (rl.verifiable)"
            )
        if transform in NEEDS_REFERENCE_SCORES and (not models or reference_responder is None):
            raise ConfigError(f"reward transform {transform!r} needs reward models and reference responses")
        for constraint in constraints:
            if bool(constraint.models) == bool(constraint.spec.verifiable):
                raise ConfigError(
                    f"constraint {constraint.spec.name!r} needs reward models or a verifiable reward"
                )
        self.models = list(models)
        self.constraints = list(constraints)
        self.verifiable = VERIFIABLE_REWARDS[verifiable] if verifiable else None
        self.verifiable_name = verifiable
        self.ensemble, self.uncertainty_coef = ENSEMBLES[ensemble], uncertainty_coef
        self.transform_name, self.transform = transform, TRANSFORMS[transform]
        self.normalize = normalize
        self.missing_eos_penalty, self.length_penalty, self.eos_id = (
            missing_eos_penalty,
            length_penalty,
            eos_id,
        )
        self.reference_responder = reference_responder
        # Greedy reference responses are deterministic: score each prompt's once, keyed by its token ids.
        self._reference_cache: dict[bytes, np.ndarray] = {}

    @property
    def all_models(self) -> list[RewardFn]:
        """The objective's reward models, then each constraint's (the order of the run's reward programs)."""
        return self.models + [m for c in self.constraints for m in c.models]

    def _reference_scores(self, prompts: PromptBatch, models=None, cache=None) -> np.ndarray:
        models = self.models if models is None else models
        cache = self._reference_cache if cache is None else cache
        keys = [prompts.ids_BP[i][prompts.mask_BP[i] > 0].tobytes() for i in range(len(prompts.records))]
        if any(k not in cache for k in keys):
            tokens, mask, texts = self.reference_responder(prompts)
            scores_KB = np.stack([m(prompts, tokens, mask, texts) for m in models])
            for i, k in enumerate(keys):
                cache[k] = scores_KB[:, i]
        return np.stack([cache[k] for k in keys], axis=1)

    def _model_reward(self, raw_KB: np.ndarray, prompts: PromptBatch, models, cache) -> np.ndarray:
        """Reward models' raw scores [K, B] transformed (per model) and ensembled [B]."""
        reference_KB = (
            self._reference_scores(prompts, models, cache)
            if self.transform_name in NEEDS_REFERENCE_SCORES
            else None
        )
        transformed_KB = np.stack(
            [
                self.transform(raw_KB[k], None if reference_KB is None else reference_KB[k])
                for k in range(len(raw_KB))
            ]
        )
        return self.ensemble(transformed_KB, self.uncertainty_coef)

    def _constraint_components(self, prompts: PromptBatch, tokens_BN, mask_BN, texts) -> dict:
        out = {}
        for c in self.constraints:
            if c.models:
                raw_KB = np.stack([m(prompts, tokens_BN, mask_BN, texts) for m in c.models])
                value_B = self._model_reward(raw_KB, prompts, c.models, c.reference_cache)
            else:
                value_B = VERIFIABLE_REWARDS[c.spec.verifiable](prompts, tokens_BN, mask_BN, texts)
            out[f"constraint/{c.spec.name}"] = np.asarray(value_B, np.float32)
        return out

    def components(
        self, prompts: PromptBatch, tokens_BN, mask_BN, texts: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Named reward parts [B] and their total under "score"."""
        out = {}
        score_B = np.zeros(len(texts), np.float32)
        if self.models:
            raw_KB = np.stack([m(prompts, tokens_BN, mask_BN, texts) for m in self.models])
            for k, raw_B in enumerate(raw_KB):
                out[f"rm{k}" if len(self.models) > 1 else "rm"] = raw_B
            score_B = score_B + self._model_reward(raw_KB, prompts, self.models, self._reference_cache)
        if self.verifiable is not None:
            out[self.verifiable_name] = self.verifiable(prompts, tokens_BN, mask_BN, texts)
            score_B = score_B + out[self.verifiable_name]
        if self.normalize == "batch":
            score_B = (score_B - score_B.mean()) / (score_B.std() + 1e-8)
        eos_missing_B = missing_eos(tokens_BN, mask_BN, self.eos_id)
        out["missing_eos_penalty"] = np.where(eos_missing_B, self.missing_eos_penalty, 0.0).astype(np.float32)
        out["length_penalty"] = -self.length_penalty * np.sum(np.asarray(mask_BN, np.float32), axis=-1)
        out["score"] = (score_B + out["missing_eos_penalty"] + out["length_penalty"]).astype(np.float32)
        return out | self._constraint_components(prompts, tokens_BN, mask_BN, texts)

    def __call__(self, prompts: PromptBatch, tokens_BN, mask_BN, texts: Sequence[str]) -> np.ndarray:
        return self.components(prompts, tokens_BN, mask_BN, texts)["score"]


def make_reward_fn(
    rl_cfg, *, tokenizer, mesh, preset: str, reference_responder: ReferenceResponder | None = None
) -> CompositeReward:
    """The configured reward (cfg.rl): reward models from `rl.reward_model` (comma-separated run dirs), and
    the constraint rewards of `rl.constraints`."""

    def load(value: str) -> list[RewardModel]:
        return [
            RewardModel(s, mesh=mesh, preset=preset, tokenizer=tokenizer, offload=rl_cfg.offload_frozen)
            for s in config_lib.reward_model_sources(value)
        ]

    models = load(rl_cfg.reward_model)
    constraints = [
        ConstraintReward(spec, load(spec.reward_model)) for spec in parse_constraints(rl_cfg.constraints)
    ]
    return CompositeReward(
        models=models,
        verifiable=rl_cfg.verifiable,
        ensemble=rl_cfg.ensemble,
        uncertainty_coef=rl_cfg.uncertainty_coef,
        transform=rl_cfg.reward_transform,
        normalize=rl_cfg.reward_norm,
        missing_eos_penalty=rl_cfg.missing_eos_penalty,
        length_penalty=rl_cfg.length_penalty,
        eos_id=tokenizer.eos_id,
        reference_responder=reference_responder,
        constraints=constraints,
    )
