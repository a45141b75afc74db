"""What an online-RL run builds once besides its train state: the tokenizer, the prompt set, the mesh, the
roles (policy, frozen reference, reward, value), their lineage and the run's programs (`rl.programs`).

Roles: the policy (train.init_from, an SFT run), a frozen reference (the same init, no optimizer state), the
reward (rl.reward_model and/or rl.verifiable) and, for algorithms with a value model, a scalar head
initialised from the reward model or the policy (rl.value_init) with its own optimizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl import config as config_lib
from jaxrl import rewards, sampling, sharding
from jaxrl.config import Config, ConfigError
from jaxrl.data import pipeline
from jaxrl.models import init as model_init
from jaxrl.models import lora
from jaxrl.models.frozen import Frozen
from jaxrl.rl import algorithms, programs


def fixed_left_pad(prompts: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`sampling.left_pad` to a fixed width, so every rollout batch has one shape (one compile)."""
    ids, mask = sampling.left_pad(prompts, pad_id)
    extra = width - ids.shape[1]
    return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (extra, 0))))


@jax.jit
def stream_key(seed_stream_step):
    """A sampling key folded from (seed, stream, step) [3] int32 on device: each use of randomness in a run
    (rollouts, held-out evaluation) has its own stream."""
    seed, stream, step = seed_stream_step
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), stream), step)


def _synthetic_prompt_sets() -> tuple[str, ...]:
    from jaxrl.synthetic import PROMPT_SETS

    return PROMPT_SETS


def prompt_set(cfg: Config, tok) -> tuple[list, np.ndarray, np.ndarray, list[str]]:
    """Policy-training prompt records and their fixed-width left-padded ids / masks [n, P]; a report."""
    r = cfg.rl
    if r.prompt_set in _synthetic_prompt_sets():
        from jaxrl.synthetic import make_prompt_set

        records = make_prompt_set(r.prompt_set, r.num_prompts, seed=cfg.seed)
    else:
        from jaxrl.data import readers

        if not Path(r.prompt_set).exists():
            raise ConfigError(
                f"rl.prompt_set {r.prompt_set!r} is neither a synthetic prompt set "
                f"{_synthetic_prompt_sets()} nor an existing prompts file"
            )
        records = list(readers.read(r.prompt_set, "prompts", on_error=cfg.data.on_error).records)
        # Held-out prompts from this file are its last rl.eval_prompts (jaxrl.rl.heldout): not trained on.
        held = 0 if r.eval_prompt_set else r.eval_prompts
        records = records[: min(r.num_prompts, max(len(records) - held, 0))]
    encoded = [tok.encode_prompt(rec.prompt) for rec in records]
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= cfg.data.max_prompt_len]
    report = [
        f"prompts {r.prompt_set}: {len(keep)} of {len(records)} kept (longer than "
        f"data.max_prompt_len={cfg.data.max_prompt_len} dropped)"
    ]
    if len(keep) < r.rollout_batch:
        raise ConfigError(f"only {len(keep)} prompts fit data.max_prompt_len, fewer than rl.rollout_batch")
    ids, mask = fixed_left_pad([encoded[i] for i in keep], cfg.data.max_prompt_len, tok.pad_id)
    return [records[i] for i in keep], ids, mask, report


def _config_hash(source: str) -> str | None:
    path = Path(source) / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else None


def lineage(cfg: Config) -> dict:
    """Which checkpoints this run's roles come from (paths and config hashes)."""
    r = cfg.rl
    sources = {"policy_init": cfg.train.init_from, "reference": cfg.train.init_from}
    for k, source in enumerate(config_lib.reward_model_sources(r.reward_model)):
        sources[f"reward_model{k}"] = source
    for spec in rewards.parse_constraints(r.constraints):
        for k, source in enumerate(config_lib.reward_model_sources(spec.reward_model)):
            sources[f"constraint_{spec.name}_reward_model{k}"] = source
    if algorithms.of(cfg).needs_value:
        sources["value_init"] = (
            config_lib.reward_model_sources(r.reward_model)[0]
            if r.value_init == "reward_model"
            else cfg.train.init_from
        )
    out = {
        name: {"path": str(Path(p).absolute()) if p else "", "config_hash": _config_hash(p) if p else None}
        for name, p in sources.items()
    }
    out["verifiable"] = r.verifiable
    return out


def _value_params(cfg: Config, reward_fn, policy_params, mesh, preset, log):
    """(value graphdef, initial value params): the first reward model's, or the policy's with a fresh head."""
    if cfg.rl.value_init == "reward_model":
        rm = reward_fn.models[0]
        return rm.graphdef, rm.params
    # A LoRA policy's value model is its merged weights with a fresh head, trained in full.
    policy_cfg = model_init.stage_model_config(cfg)
    value_cfg = dataclasses.replace(lora.base_config(policy_cfg), head="scalar")
    graphdef, _ = model_init.abstract_model(value_cfg)
    fresh = model_init.init_params(value_cfg, cfg.seed + 1, mesh, preset)
    if policy_cfg.lora_rank:
        policy_params = lora.merge(policy_params, policy_cfg)
    return graphdef, model_init.merge_init(fresh, policy_params, log)


def fetch(arrays) -> tuple[np.ndarray, ...]:
    """Host copies of device arrays; every process gets the whole batch (to decode and score it)."""
    if jax.process_count() == 1:
        return tuple(np.asarray(a) for a in jax.device_get(arrays))
    from jax.experimental import multihost_utils

    return tuple(np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in arrays)


def decode(tok, tokens_BN: np.ndarray, mask_BN: np.ndarray) -> list[str]:
    """The texts of sampled responses (their valid tokens)."""
    return [
        tok.decode(row[: int(n)].tolist()) for row, n in zip(tokens_BN, mask_BN.sum(axis=-1), strict=True)
    ]


@dataclasses.dataclass
class Context:
    """What a run builds once besides the train state: tokenizer, prompts, mesh, models, frozen roles and the
    run's programs, with the device scalars its loop passes to them."""

    cfg: Config
    algorithm: algorithms.Algorithm
    tok: object
    records: list
    prompt_ids: np.ndarray  # [n, P] left-padded to data.max_prompt_len
    prompt_mask: np.ndarray
    order: pipeline.BatchOrder
    mesh: object
    preset: str
    batch_sharding: object
    replicated: object  # hyperparameters, keys and minibatch indices
    graphdef: object
    value_graphdef: object
    ref: Frozen
    reward_fn: rewards.CompositeReward
    programs: programs.RunPrograms
    temperature: jax.Array  # the sampling temperature, on device
    # Per-row mixture coefficients [B] of the sampler, on device (odd rows rl.mixture_coef), for algorithms
    # whose comparisons come from the policy/reference mixture; None otherwise.
    mixture_coef: jax.Array | None
    update_hp: object  # the update's fixed hyperparameters on device, or None: the iteration's RLHParams
    units: int  # what a rollout batch trains on: sequences, or pairs of them
    mb_units: int  # ... per minibatch
    heldout: object = None  # held-out prompts (jaxrl.rl.heldout.HeldOut; the runner loads them), or None


def mixture_coefs(cfg: Config, batch_sharding):
    """The sampler's per-row mixture coefficients [B] on device: 0 on the policy's rows, rl.mixture_coef on
    the comparison rows; None when the algorithm samples every row from the policy."""
    if algorithms.of(cfg).comparison != "mixture":
        return None
    r = cfg.rl
    coef_B = np.zeros(r.rollout_batch * r.samples_per_prompt, np.float32)
    coef_B[1::2] = r.mixture_coef
    return jax.device_put(coef_B, batch_sharding)


class ReferenceResponder:
    """Greedy reference responses to a prompt batch (for reward transforms centred on them), by the run's
    `reference_generate` program; the context is attached once built (the reward function needs this
    first)."""

    def __init__(self, replicated):
        self.context: Context | None = None
        # Greedy decoding ignores the key; both are placed once, so a call copies nothing implicitly.
        self.key, self.temperature = jax.device_put((jax.random.PRNGKey(0), np.float32(0.0)), replicated)

    def __call__(self, prompts: rewards.PromptBatch):
        ctx = self.context
        arrays = jax.device_put((prompts.ids_BP, prompts.mask_BP), ctx.batch_sharding)
        program = ctx.programs["reference_generate"]
        tokens, _, mask = program(ctx.graphdef, ctx.ref.get(), *arrays, self.key, self.temperature)
        tokens, mask = fetch((tokens, mask))
        return tokens, mask, decode(ctx.tok, tokens, mask)


def build(cfg: Config, workdir: Path, log) -> tuple[Context, dict, list[str]]:
    """Tokenizer, prompts, mesh, the policy / reference / reward / value roles and the run's programs; the
    initial trainables (policy and value parameters); a report of the prompt set."""
    r, t = cfg.rl, cfg.train
    mesh, preset = sharding.make_mesh(cfg.mesh), cfg.mesh.preset
    log(sharding.describe(mesh, cfg.mesh))
    units, mb_units = programs.check_divisible(cfg, mesh, preset)
    batch_sharding, replicated = sharding.batch_sharding(mesh, preset), NamedSharding(mesh, PartitionSpec())
    tok = pipeline.load_tokenizer(cfg)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}"
        )
    if jax.process_index() == 0 and hasattr(tok, "save"):
        tok.save(workdir / "tokenizer.json")
    records, prompt_ids, prompt_mask, report = prompt_set(cfg, tok)

    model_cfg = model_init.stage_model_config(cfg)
    graphdef, abstract_params = model_init.abstract_model(model_cfg)
    params = model_init.init_params(lora.base_config(model_cfg), cfg.seed, mesh, preset)
    if t.init_from:
        params = model_init.merge_init(params, model_init.load_run_params(t.init_from, mesh, preset)[0], log)
    else:
        log("warning: no train.init_from: the policy and its reference are the random initialisation")
    shardings = sharding.tree_shardings(abstract_params, preset, mesh)
    if model_cfg.lora_rank:
        # LoRA: the reference is the policy's own frozen base with the adapters off (the same arrays, which
        # the train step never donates), so it is neither a second copy nor offloaded.
        params = lora.init_params(model_cfg, params, cfg.seed, mesh, preset)
        ref = Frozen(lora.adapters_off(params), shardings, offload=False)
    else:
        # The train state is built from these by a jit, so it holds new buffers: donating it never frees
        # the ref.
        ref = Frozen(params, shardings, r.offload_frozen)
    responder = ReferenceResponder(replicated)
    reward_fn = rewards.make_reward_fn(
        r, tokenizer=tok, mesh=mesh, preset=preset, reference_responder=responder
    )
    algorithm = algorithms.of(cfg)
    trainable = {"policy": params, "value": None}
    value_graphdef = None
    if algorithm.needs_value:
        value_graphdef, trainable["value"] = _value_params(cfg, reward_fn, params, mesh, preset, log)
    roles = programs.Roles(
        graphdef=graphdef,
        params=programs.abstract(params),
        value_graphdef=value_graphdef,
        value_params=None if trainable["value"] is None else programs.abstract(trainable["value"]),
        rewards=tuple((m.graphdef, model_init.abstract_model(m.model_cfg)[1]) for m in reward_fn.all_models),
    )
    run_programs = programs.programs(cfg, mesh, roles, eos_id=tok.eos_id, pad_id=tok.pad_id)
    update_hp = None if algorithm.hparams is None else jax.device_put(algorithm.hparams(cfg), replicated)
    ctx = Context(
        cfg=cfg,
        algorithm=algorithm,
        tok=tok,
        records=records,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        order=pipeline.BatchOrder(len(records), r.rollout_batch, cfg.seed),
        mesh=mesh,
        preset=preset,
        batch_sharding=batch_sharding,
        replicated=replicated,
        graphdef=graphdef,
        value_graphdef=value_graphdef,
        ref=ref,
        reward_fn=reward_fn,
        programs=run_programs,
        temperature=jax.device_put(np.float32(r.temperature), replicated),
        mixture_coef=mixture_coefs(cfg, batch_sharding),
        update_hp=update_hp,
        units=units,
        mb_units=mb_units,
    )
    responder.context = ctx
    return ctx, trainable, report
