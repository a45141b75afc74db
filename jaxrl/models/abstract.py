"""The model's abstract shapes, defined once for every module that needs them (jaxrl.models.init, and the HF
reader, which init imports: so this is a leaf)."""

from __future__ import annotations

from flax import nnx

from jaxrl.config import ModelConfig
from jaxrl.models.transformer import Transformer


def abstract_model(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, abstract params): the parameters as a pure dict of ShapeDtypeStructs, nothing allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)
