"""Conversion between Hugging Face checkpoint directories and jaxrl run directories, both directions.

What the weights do not hold travels with them: the checkpoint's architecture name and bos/eos/pad token ids
(in the run dir's `hf.json`), its generation_config.json and its tokenizer files, so HF -> run dir -> HF gives
back the same ids and generation config. An export of a run trained from a converted run or an HF checkpoint
(`train.init_from`, followed back) takes them from there.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxrl import checkpoint, sharding
from jaxrl import config as config_lib
from jaxrl.config import Config, ConfigError, MeshConfig
from jaxrl.models.hf_config import ARCHITECTURE_KEYS, SPECIAL_TOKEN_KEYS, is_hf_dir
from jaxrl.models.hf_save import GENERATION_FILE, TOKENIZER_FILES

# ARCHITECTURE_KEYS (which preflight imports from here), the token keys and the file names are the HF
# modules' own lists, named once.
HF_FILE = "hf.json"  # in a run dir: the source checkpoint's architecture and special token ids
EXPORT_KEYS = ("model.param_dtype",)  # with mesh.*: the --set keys an export (run -> HF) takes


def with_hf_architecture(cfg: Config, hf_dir: str | Path) -> Config:
    """The config with its model architecture taken from an HF checkpoint (compute settings kept)."""
    from jaxrl.models import hf

    source = hf.config_from_hf(hf.read_hf_config(hf_dir))
    arch = {k: getattr(source, k) for k in ARCHITECTURE_KEYS}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **arch))


def parse_hf_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings as config.json entries; VALUE is read as JSON (`[1, 2]`, `null`), else as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--hf-set {item!r}: expected KEY=VALUE (VALUE in JSON: eos_token_id=[1,2])")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def is_hf_source(path: str | Path) -> bool:
    """An HF checkpoint dir to import: config.json names `architectures`, or only a `model_type` (so that an
    unsupported one is a one-line error, not read as a jaxrl run)."""
    cfg_file = Path(path) / "config.json"
    return is_hf_dir(path) or (cfg_file.is_file() and "model_type" in json.loads(cfg_file.read_text()))


def _override_keys(overrides: Sequence[str] | Mapping[str, Any]) -> list[str]:
    items = overrides.keys() if isinstance(overrides, Mapping) else [o.partition("=")[0] for o in overrides]
    return [k.strip().replace("__", ".") for k in items]


def hf_to_run(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    mesh_cfg: MeshConfig | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    hf_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a finished jaxrl run directory (config.json, final/params, tokenizer files, generation config
    and hf.json) from an HF checkpoint, usable as train.init_from or train.reference_from.

    `overrides` are dotted overrides of the run's config (model.dtype, model.param_dtype: the dtype the
    parameters are stored in, mesh.*, ...); the architecture comes from the checkpoint and cannot be changed.
    `hf_overrides` sets or replaces the kept bos/eos/pad token ids."""
    from jaxrl import validate as validate_lib
    from jaxrl.models import hf
    from jaxrl.models import init as model_init

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if (out_dir / "config.json").exists():
        raise ConfigError(f"{out_dir} already holds a run; choose an empty directory")
    hf_config = hf.read_hf_config(hf_dir)
    head = hf.config_from_hf(hf_config).head  # unsupported architectures and features fail here, one line
    stage = "rm" if head == "scalar" else "sft"
    base = with_hf_architecture(Config(stage=stage, mesh=mesh_cfg or MeshConfig()), hf_dir)
    cfg = validate_lib.validate(config_lib.override(base, overrides))
    changed = [f"model.{k}" for k in ARCHITECTURE_KEYS if getattr(cfg.model, k) != getattr(base.model, k)]
    if changed:
        raise ConfigError(f"{', '.join(changed)}: the architecture comes from the checkpoint, not --set")
    if model_init.stage_model_config(cfg).head != head:
        raise ConfigError(
            f"stage={cfg.stage} needs a {model_init.stage_model_config(cfg).head} head; "
            f"{hf.architecture_of(hf_config)} has a {head} head"
        )
    bad = sorted(set(hf_overrides or {}) - set(SPECIAL_TOKEN_KEYS))
    if bad:
        raise ConfigError(f"--hf-set {bad}: an import keeps only {list(SPECIAL_TOKEN_KEYS)}")
    mesh = sharding.make_mesh(cfg.mesh)
    _, params = hf.load_hf(
        hf_dir, mesh=mesh, preset=cfg.mesh.preset, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save_params(checkpoint.final_params_dir(out_dir), params)
    for name in (*TOKENIZER_FILES, GENERATION_FILE):
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, out_dir / name)
    kept = {
        "architecture": hf.architecture_of(hf_config),
        **{k: hf_config[k] for k in SPECIAL_TOKEN_KEYS if hf_config.get(k) is not None},
        **(hf_overrides or {}),
    }
    (out_dir / HF_FILE).write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
    summary = {"converted_from": str(hf_dir.absolute()), "stage": cfg.stage}
    (out_dir / "final" / "summary.json").write_text(json.dumps(summary) + "\n")
    config_lib.save(cfg, out_dir / "config.json")  # last: a run dir with a config is a finished conversion
    return out_dir


def hf_origin(run_dir: str | Path, max_hops: int = 16) -> tuple[Path, dict] | None:
    """(directory, {architecture, special token ids}) of the HF checkpoint a run descends from: the run itself
    when converted (hf.json), else its `train.init_from` followed back to a converted run or an HF dir."""
    from jaxrl.models import hf

    path = Path(run_dir)
    for _ in range(max_hops):
        if is_hf_dir(path):
            source = hf.read_hf_config(path)
            names = source.get("architectures") or []
            kept = {k: source[k] for k in SPECIAL_TOKEN_KEYS if source.get(k) is not None}
            return path, kept | ({"architecture": names[0]} if len(names) == 1 else {})
        if (path / HF_FILE).is_file():
            return path, json.loads((path / HF_FILE).read_text())
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            return None
        init_from = json.loads(cfg_file.read_text()).get("train", {}).get("init_from")
        if not init_from:
            return None
        path = Path(init_from)
    return None


def _export_architecture(name: str | None, head: str) -> str | None:
    """The origin's family (Mistral stays Mistral) with the head of the exported model."""
    from jaxrl.models import hf

    if name not in hf.ARCHITECTURES:
        return None
    family = name.rsplit("For", 1)[0]
    return f"{family}For{'SequenceClassification' if head == 'scalar' else 'CausalLM'}"


def run_to_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    mesh_cfg: MeshConfig | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    hf_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Writes an HF checkpoint from a finished jaxrl run: policies as *ForCausalLM, reward models as
    *ForSequenceClassification, with the architecture family, token ids and generation config of the
    checkpoint the run descends from (`hf_origin`), if any.

    `overrides` takes mesh.* and model.param_dtype (the dtype the weights are saved in); `hf_overrides` sets
    config.json entries (e.g. pad_token_id), over the kept ones; entries that would change the model are
    refused."""
    from jaxrl.models import hf
    from jaxrl.models import init as model_init

    keys = _override_keys(overrides)
    bad = [k for k in keys if k not in EXPORT_KEYS and not k.startswith("mesh.")]
    if bad:
        raise ConfigError(
            f"--set {bad}: an export takes only mesh.* and {', '.join(EXPORT_KEYS)} "
            f"(config.json entries: --hf-set)"
        )
    cfg = config_lib.validate(config_lib.override(Config(mesh=mesh_cfg or MeshConfig()), overrides))
    mesh = sharding.make_mesh(cfg.mesh)
    params, model_cfg = model_init.load_run_params(run_dir, mesh, cfg.mesh.preset)
    origin = hf_origin(run_dir)
    origin_dir, kept = origin if origin is not None else (None, {})
    if tokenizer_dir is None:
        tokenizer_dir = next(
            (
                d
                for d in (Path(run_dir), origin_dir)
                if d is not None and (d / "tokenizer_config.json").exists()
            ),
            None,
        )
    architecture = _export_architecture(kept.get("architecture"), model_cfg.head)
    ids = {k: v for k, v in kept.items() if k in SPECIAL_TOKEN_KEYS}
    out = hf.save_hf(
        out_dir,
        model_cfg,
        params,
        architecture=architecture,
        tokenizer_dir=tokenizer_dir,
        save_dtype=cfg.model.param_dtype if "model.param_dtype" in keys else None,
        config_overrides={**ids, **(hf_overrides or {})},
    )
    given = Path(tokenizer_dir) / GENERATION_FILE if tokenizer_dir is not None else None
    if (
        model_cfg.head == "lm"
        and origin_dir is not None
        and (origin_dir / GENERATION_FILE).is_file()
        and not (given is not None and given.is_file())
    ):
        shutil.copyfile(origin_dir / GENERATION_FILE, Path(out) / GENERATION_FILE)
    return out
