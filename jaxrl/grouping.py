"""How a sweep's group runs over its members (jaxrl.group, jaxrl.rl.group): the `--group` modes, the way
each one resolves to on this backend, and `over_members`, one function over a leading member axis either
batched ("vmap") or one member after another ("map"). Imports no jaxrl module, so that the offline and the
online groups can both use it."""

from __future__ import annotations

import jax

MODES = ("auto", "vmap", "map", "off", "on")  # "on": vmap, the flag's first spelling
WAYS = ("vmap", "map")


def grouping(mode: str) -> str | None:
    """How a sweep groups runs: "vmap", "map" (see the module's doc), or None: one run at a time ("off").
    "auto": vmap on accelerators (a GPU or TPU step of a small model is launch-bound, and a group's members
    share its launches), map on a CPU (a step of even a tiny model is compute-bound there: batching saves
    little over mapping, and only map keeps every member bitwise its run alone;
    bench/results/sweep_groups.md)."""
    if mode == "auto":
        return "vmap" if jax.default_backend() != "cpu" else "map"
    return {"vmap": "vmap", "on": "vmap", "map": "map", "off": None}[mode]


def over_members(fn, in_axes=0, how: str = "vmap"):
    """`fn` over a leading member axis of its arguments: `jax.vmap(fn, in_axes)` for "vmap"; for "map" the
    same signature with the members computed one after another (`jax.lax.map`), each by `fn`'s own
    arithmetic. `in_axes`: 0 or None per argument (a prefix of the arguments, as vmap's)."""
    if how == "vmap":
        return jax.vmap(fn, in_axes=in_axes)
    if how != "map":
        raise ValueError(f"over_members: how={how!r}, expected one of {WAYS}")

    def mapped(*args):
        axes = in_axes if isinstance(in_axes, tuple | list) else (in_axes,) * len(args)
        full = jax.tree.map(
            lambda ax, sub: jax.tree.map(lambda _: -1 if ax is None else ax, sub),
            list(axes),
            list(args),
            is_leaf=lambda x: x is None,
        )
        leaves, treedef = jax.tree.flatten(list(args))
        flags = jax.tree.leaves(full)
        if len(flags) != len(leaves) or set(flags) - {0, -1}:
            raise ValueError(f"over_members: in_axes {in_axes!r} must be 0 or None per argument")

        pairs = list(zip(leaves, flags, strict=True))

        def member(stacked):
            it = iter(stacked)
            return fn(*jax.tree.unflatten(treedef, [next(it) if f == 0 else x for x, f in pairs]))

        return jax.lax.map(member, [x for x, f in pairs if f == 0])

    return mapped
