"""orbax-checkpoint: periodic async saves of the whole train state, keep-last-N, exact resume, final
params."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

DAMAGED_DIR = "checkpoints_damaged"


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for sharded restores."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


class Checkpointer:
    """Saves {state, meta} under <workdir>/checkpoints/<step>; meta holds the data position and run facts."""

    def __init__(self, workdir: str | Path, *, every: int, keep: int, asynchronous: bool = True):
        self.every = max(1, every)
        self.workdir = Path(workdir).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(1, every),
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            Path(workdir).absolute() / "checkpoints", options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts an async save when `step` is due (or forced); returns whether one started."""
        if not force and step % self.every:
            return False  # not due: decided without touching the filesystem, so the train loop stays cheap
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """The state (placed by the shardings in `abstract_state`) and meta saved at `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.meta

    def restore_latest(
        self, abstract_state, *, log: Callable[[str], Any] = print
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) from the newest checkpoint that restores, or None when there is none.

        A step that fails to restore (truncated or emptied files, missing or unparseable metadata, a missing
        item, a shape mismatch, tensorstore read errors, ...) is moved aside to
        <workdir>/checkpoints_damaged/<step>-<timestamp>, out of orbax's sight, with one warning line, and the
        step before it is tried. Device errors (out of memory and the like) are not damage and propagate."""
        self.manager.wait_until_finished()  # an in-flight save of this manager is not a damaged step
        self.manager.reload()
        moved = []
        while (step := self.manager.latest_step()) is not None:
            try:
                _check_step_metadata(Path(self.manager.directory) / str(step))
                state, meta = self.restore(step, abstract_state)
                _check_restored(state, meta, abstract_state)
                return step, state, meta
            except (MemoryError, jax.errors.JaxRuntimeError):
                raise
            except Exception as e:  # noqa: BLE001 - anything else reading the files means the step is unusable
                reason = _first_line(e)
            dest = self._move_aside(step)
            moved.append(step)
            log(f"warning: checkpoint step {step} is damaged ({reason}); moved it to {dest}")
            self.manager.reload()  # orbax caches its step list
            if step in self.manager.all_steps():
                raise RuntimeError(f"damaged checkpoint step {step} ({reason}) could not be moved aside")
        if moved:
            log(
                f"warning: no intact checkpoint left in {self.manager.directory} (moved aside: "
                f"{', '.join(map(str, moved))}); starting from scratch"
            )
        return None

    def _move_aside(self, step: int) -> Path:
        """Moves a step's directory to <workdir>/checkpoints_damaged/<step>-<timestamp>; returns where to."""
        src = Path(self.manager.directory) / str(step)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.workdir / DAMAGED_DIR / f"{step}-{stamp}"
        n = 1
        while dest.exists():
            n += 1
            dest = self.workdir / DAMAGED_DIR / f"{step}-{stamp}-{n}"
        if jax.process_index() == 0 and src.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dest))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxrl_checkpoint_move_aside_{step}")
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    if len(line) > limit:
        line = line[:limit] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _check_step_metadata(step_dir: Path) -> None:
    """Raises ValueError when the step's own metadata file exists but is not a JSON object.

    orbax only logs such a file and restores anyway, but a half-written or garbled file says the directory was
    damaged; a missing one is tolerated (older orbax versions never wrote it)."""
    path = step_dir / "_CHECKPOINT_METADATA"
    if not path.exists():
        return
    try:
        content = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"unparseable {path.name}: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"{path.name} holds {type(content).__name__}, not an object")


def _check_restored(state, meta, abstract_state) -> None:
    """Raises ValueError when a restore came back with a missing meta or leaves unlike the target's."""
    if not isinstance(meta, dict):
        raise ValueError(f"meta item is {type(meta).__name__}, not a dict")
    got, want = jax.tree.leaves(state), jax.tree.leaves(abstract_state)
    if len(got) != len(want):
        raise ValueError(f"restored {len(got)} arrays, expected {len(want)}")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if getattr(w, "shape", None) is not None and (
            getattr(g, "shape", None) != w.shape or getattr(g, "dtype", None) != w.dtype
        ):
            got_spec = f"{getattr(g, 'shape', None)} {getattr(g, 'dtype', None)}"
            raise ValueError(f"array {i} restored as {got_spec}, expected {w.shape} {w.dtype}")


def final_params_dir(workdir: str | Path) -> Path:
    """Where a finished run keeps its final parameters."""
    return Path(workdir).absolute() / "final" / "params"


def save_params(path: str | Path, params) -> None:
    """Writes a params pytree (blocking) with orbax."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)


def load_params(path: str | Path, abstract_params):
    """Reads params saved by `save_params` into the shapes, dtypes and shardings of `abstract_params`."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no saved parameters at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract_params)
