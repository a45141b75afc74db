"""A loaded HF checkpoint for notebooks: `load_model(path)` gives an HFModel, called on token ids for logits
(LM) or per-sequence scores (reward model).

Reward convention: a *ForSequenceClassification model scores every position; the sequence's reward is the
score at its last real token, i.e. the rightmost position where `mask_BT` is set (`last_token_scores`). This
equals transformers' pooling (the rightmost token that is not `pad_token_id`) when `mask_BT = tokens != pad`,
for right or left padding, and stays right when the pad id equals the eos id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl.config import ModelConfig
from jaxrl.models.abstract import abstract_model
from jaxrl.models.hf_config import read_hf_config
from jaxrl.models.hf_weights import load_hf
from jaxrl.models.transformer import Transformer
from jaxrl.sharding import use_mesh
from jaxrl.steps import last_token_index


def last_token_scores(scores_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Per-sequence scores [B]: the score at the rightmost position where mask_BT is set (0 if none is)."""
    return jnp.take_along_axis(scores_BT, last_token_index(mask_BT)[:, None], axis=1)[:, 0]


def _pad_batch(tokens, pad_id: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(tokens [B,T], mask [B,T], was_single): ragged lists are right-padded with pad_id."""
    if isinstance(tokens, (np.ndarray, jax.Array)):
        tokens = np.asarray(tokens)
        single = tokens.ndim == 1
        tokens_BT = tokens[None] if single else tokens
        return tokens_BT.astype(np.int32), np.ones(tokens_BT.shape, np.int32), single
    rows = list(tokens)
    single = bool(rows) and not isinstance(rows[0], (list, tuple, np.ndarray))
    rows = [rows] if single else rows
    T = max(len(r) for r in rows)
    tokens_BT = np.full((len(rows), T), pad_id, np.int32)
    mask_BT = np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        tokens_BT[b, : len(row)] = row
        mask_BT[b, : len(row)] = 1
    return tokens_BT, mask_BT, single


class HFModel:
    """A loaded checkpoint for notebooks: call it on token ids for logits (LM) or per-sequence scores (RM)."""

    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        *,
        hf_config: Mapping,
        tokenizer=None,
        mesh=None,
        preset: str = "fsdp",
    ):
        self.config, self.params, self.hf_config, self.tokenizer = config, params, dict(hf_config), tokenizer
        self.mesh, self.preset = mesh, preset
        self.graphdef, _ = abstract_model(config)
        pad = hf_config.get("pad_token_id")
        self.pad_id = int(pad if pad is not None else (tokenizer.pad_id if tokenizer is not None else 0))
        self._forward = jax.jit(self._apply)

    @property
    def module(self) -> Transformer:
        """The nnx module holding these parameters."""
        return nnx.merge(self.graphdef, self.params)

    def _apply(self, params, tokens_BT, mask_BT):
        ctx = use_mesh(self.mesh, self.preset) if self.mesh is not None else contextlib.nullcontext()
        # As the sampler does: pads form segment 0 and never attend to or from real tokens, and positions
        # count real tokens only, so a left-padded row gives its unpadded logits (pad positions are junk).
        valid_BT = (mask_BT != 0).astype(jnp.int32)
        positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
        with ctx:
            out = nnx.merge(self.graphdef, params)(tokens_BT, positions_BT, valid_BT)
        return last_token_scores(out, mask_BT) if self.config.head == "scalar" else out

    def __call__(self, tokens, mask=None) -> jax.Array:
        """Logits [B,T,V] (LM) or scores [B] at each sequence's last real token (RM).

        `tokens` is [B,T] or [T] (ids), or a list of ragged id lists (right-padded here); `mask` [B,T] marks
        the real tokens of a padded array, left- or right-padded (default: all real). Real tokens never attend
        to pads and their positions start at 0 at the first real token (transformers' generate convention).
        """
        tokens_BT, mask_BT, single = _pad_batch(tokens, self.pad_id)
        if mask is not None:
            mask_BT = np.asarray(mask, np.int32).reshape(tokens_BT.shape)
        out = self._forward(self.params, jax.device_put(tokens_BT), jax.device_put(mask_BT))
        return out[0] if single else out

    def __repr__(self) -> str:
        kind = "reward model" if self.config.head == "scalar" else "LM"
        return (
            f"HFModel({self.hf_config.get('architectures')}, {kind}, tokenizer={self.tokenizer is not None})"
        )


def load_model(
    path: str | Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    preset: str = "fsdp",
    dtype: str = "float32",
    param_dtype: str = "float32",
) -> HFModel:
    """One call for notebooks: parameters, config and (when present) the checkpoint's chat tokenizer."""
    path = Path(path)
    cfg, params = load_hf(path, mesh=mesh, preset=preset, dtype=dtype, param_dtype=param_dtype)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from jaxrl.data.chat import HFChatTokenizer

        tokenizer = HFChatTokenizer.from_dir(path)
    return HFModel(cfg, params, hf_config=read_hf_config(path), tokenizer=tokenizer, mesh=mesh, preset=preset)
