"""Reference log-probs computed once per (reference model, tokenised dataset), cached under a content hash."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl import sharding, steps
from jaxrl.files import replacing

CACHE_VERSION = 1


def _leaf_sums(x):
    x = x.astype(jnp.float32).reshape(-1)
    # A fixed, position-dependent weight makes permutations and sign flips change the sum.
    w = jnp.sin(jnp.arange(x.size, dtype=jnp.float32) * 0.7390851) + 1.5
    return jnp.stack([jnp.sum(x), jnp.sum(x * w), jnp.sum(jnp.abs(x))])


@jax.jit
def _tree_sums(params):
    """The plain, weighted and absolute sums [3] of every leaf (jitted once; compiled once per tree shape)."""
    return jax.tree.map(_leaf_sums, params)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "preset"))
def reference_forward(params, tokens, mask, *, graphdef, mesh, preset):
    """Summed completion log-probs [B, K] of a batch of pairs (K = 2) or ranked lists under the reference."""
    with sharding.use_mesh(mesh, preset):
        batch = {"tokens": tokens, "loss_mask": mask}
        logp_B2, _ = steps.policy_seq_logps(nnx.merge(graphdef, params), batch)
        return logp_B2


def params_fingerprint(params) -> str:
    """A content hash of a params pytree: two weighted sums per leaf on device, hashed on the host."""
    sums = jax.device_get(_tree_sums(params))
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        digest.update(f"{sharding.path_str(path)}:{leaf.shape}:{leaf.dtype};".encode())
    for value in jax.tree.leaves(sums):
        digest.update(np.asarray(value, np.float32).tobytes())
    return digest.hexdigest()[:20]


def arrays_fingerprint(arrays: dict[str, np.ndarray], keys=("tokens", "loss_mask")) -> str:
    """A content hash of the tokenised examples (token ids and loss masks)."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
        digest.update(str(arrays[key].shape).encode())
    return digest.hexdigest()[:20]


def compute_reference_logps(
    graphdef,
    params,
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int,
    mesh,
    preset: str,
    bucket_multiple: int | None = None,
) -> np.ndarray:
    """Summed completion log-probs [N, K] of every row of every pair (K = 2) or list under the reference.

    With `bucket_multiple`, pairs go through in order of length and each batch is cut to the smallest multiple
    that holds it (as data.padding=bucket does for training), so the pass computes few padded positions; the
    log-probs are the same (positions after a row's last loss position never change it)."""
    from jaxrl.data import pipeline

    n = arrays["tokens"].shape[0]
    divisor = sharding.batch_divisor(mesh, preset)
    batch_size = max(divisor, batch_size // divisor * divisor)
    batch_sharding = sharding.batch_sharding(mesh, preset)
    forward = functools.partial(reference_forward, graphdef=graphdef, mesh=mesh, preset=preset)
    order = np.arange(n)
    if bucket_multiple:
        lengths = pipeline.example_lengths(arrays)
        order = np.argsort(lengths, kind="stable")
    out = np.zeros(arrays["tokens"].shape[:2], np.float32)
    for start in range(0, n, batch_size):
        # The last batch wraps around; its extra rows are discarded.
        idx = order[np.arange(start, start + batch_size) % n]
        width = (
            pipeline.bucket_width(lengths, idx, bucket_multiple, arrays["tokens"].shape[-1])
            if bucket_multiple
            else None
        )
        tokens = jax.device_put(arrays["tokens"][idx][..., :width], batch_sharding)
        mask = jax.device_put(arrays["loss_mask"][idx][..., :width], batch_sharding)
        logp = np.asarray(jax.device_get(forward(params, tokens, mask)))
        count = min(batch_size, n - start)
        out[order[start : start + count]] = logp[:count]
    return out


def _read_cached(path: Path, expected: tuple[int, ...]) -> tuple[np.ndarray | None, str | None]:
    """(logps, None) for a sound cache file, else (None, what is wrong with it)."""
    try:
        size = path.stat().st_size
        if size == 0:
            return None, "empty file"
        logps = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - truncated, garbled or unreadable: recompute
        text = str(e).strip()
        return None, f"unreadable: {type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    if not isinstance(logps, np.ndarray):
        return None, f"holds {type(logps).__name__}, not an array"
    if logps.shape != expected:
        return None, f"shape {logps.shape}, expected {expected}"
    if logps.dtype != np.float32:
        return None, f"dtype {logps.dtype}, expected float32"
    if not np.all(np.isfinite(logps)):
        return None, f"{int(np.size(logps) - np.isfinite(logps).sum())} non-finite values"
    return logps, None


def cached_reference_logps(
    cache_dir: str | Path,
    graphdef,
    params,
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int,
    mesh,
    preset: str,
    log=print,
    bucket_multiple: int | None = None,
) -> tuple[np.ndarray, Path, bool]:
    """Reference log-probs [N, K] from the cache, computed and stored on a miss: (logps, file, hit)."""
    key = hashlib.sha256(
        f"v{CACHE_VERSION}:{params_fingerprint(params)}:{arrays_fingerprint(arrays)}".encode()
    ).hexdigest()[:24]
    path = Path(cache_dir) / "ref_logps" / f"{key}.npy"
    expected = tuple(arrays["tokens"].shape[:2])
    if path.exists():
        logps, problem = _read_cached(path, expected)
        if problem is None:
            log(f"reference log-probs: cache hit {path}")
            return logps, path, True
        log(f"warning: reference log-prob cache {path} is unusable ({problem}); recomputing it")
    logps = compute_reference_logps(
        graphdef,
        params,
        arrays,
        batch_size=batch_size,
        mesh=mesh,
        preset=preset,
        bucket_multiple=bucket_multiple,
    )
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:  # concurrent runs sharing the cache never read half a file
            np.save(tmp, logps)
        path.with_suffix(".json").write_text(json.dumps({"examples": int(logps.shape[0])}) + "\n")
    log(f"reference log-probs: computed {logps.shape[0]} pairs -> {path}")
    return logps, path, False
