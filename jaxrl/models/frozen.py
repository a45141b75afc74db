"""Frozen parameters (a reference, a starting point to measure KL to): held on the device, or with `offload`
in host memory between uses, each use putting them back exactly where they were."""

from __future__ import annotations

import jax


class Frozen:
    """Frozen parameters, on the device or, with offload, on the host between uses; `get()` gives them placed
    by `shardings` (by default where they were when frozen)."""

    def __init__(self, params, shardings=None, offload: bool = False):
        self.offload = offload
        self.shardings = jax.tree.map(lambda x: x.sharding, params) if shardings is None else shardings
        self._params = jax.device_get(params) if offload else params

    def get(self):
        return jax.device_put(self._params, self.shardings) if self.offload else self._params


def shares_buffers(a, b) -> bool:
    """Whether two pytrees have a device buffer in common (the same array object)."""
    ids = {id(x) for x in jax.tree.leaves(a) if isinstance(x, jax.Array)}
    return any(id(x) in ids for x in jax.tree.leaves(b))
