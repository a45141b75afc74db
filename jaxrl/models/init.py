"""Model init for every runner: the model a stage trains, its abstract shapes, fresh parameters in their
sharded layout, the parameters of a finished run (or an HF checkpoint), and `train.init_from` merged into
fresh ones."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl import checkpoint, sharding
from jaxrl import config as config_lib
from jaxrl.config import Config, ConfigError
from jaxrl.models.abstract import abstract_model  # re-exported: model_init.abstract_model
from jaxrl.models.transformer import Transformer


def stage_model_config(cfg: Config):
    """The model config a stage trains: a scalar head for reward models, an LM head otherwise."""
    return dataclasses.replace(cfg.model, head="scalar" if cfg.stage == "rm" else "lm")


def init_params(model_cfg, seed: int, mesh, preset: str):
    """Freshly initialised parameters, created directly in their sharded layout."""
    return _init_program(model_cfg, mesh, preset)(jax.random.key(seed))


@functools.lru_cache(maxsize=16)
def _init_program(model_cfg, mesh, preset: str):
    """The jitted initialisation of a model on a mesh, the seed's key an argument: one compile serves every
    seed (a sweep's seeds, a group's members)."""
    _, abstract = abstract_model(model_cfg)
    shardings = sharding.tree_shardings(abstract, preset, mesh)
    make = lambda key: nnx.to_pure_dict(nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(params=key)))[1])
    return jax.jit(make, out_shardings=shardings)


def load_run_params(source: str | Path, mesh, preset: str):
    """(params, model config) of a finished run's workdir or of an HF checkpoint directory, placed by the rule
    table (an HF checkpoint is read tensor by tensor straight into its shards)."""
    from jaxrl.models import hf

    source_dir = Path(source)
    if hf.is_hf_dir(source_dir):
        source_model, params = hf.load_hf(source_dir, mesh=mesh, preset=preset)
        return params, source_model
    source_cfg_file = source_dir / "config.json"
    if not source_cfg_file.exists():
        raise ConfigError(f"{source} is neither a jaxrl run directory nor an HF checkpoint (no config.json)")
    source_cfg = config_lib.from_dict(json.loads(source_cfg_file.read_text()))
    # A LoRA run's final parameters are merged into its base: a model without adapters.
    source_model = dataclasses.replace(stage_model_config(source_cfg), lora_rank=0)
    _, abstract = abstract_model(source_model)
    target = checkpoint.abstract_with_shardings(abstract, sharding.tree_shardings(abstract, preset, mesh))
    return checkpoint.load_params(checkpoint.final_params_dir(source_dir), target), source_model


def merge_init(fresh, loaded, log) -> dict:
    """Takes every loaded top-level module whose shapes match; keeps fresh ones (e.g. a new scalar head)."""
    merged = {}
    for name, value in fresh.items():
        if name in loaded and jax.tree.map(jnp.shape, loaded[name]) == jax.tree.map(jnp.shape, value):
            merged[name] = loaded[name]
        elif name in loaded:
            raise ConfigError(f"init_from: shapes of {name!r} differ from this run's model config")
        else:
            log(f"init_from: {name!r} not in the source, freshly initialised")
            merged[name] = value
    return merged
