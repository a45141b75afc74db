"""Damaged state on disk is survived: a checkpoint that no longer restores is moved aside and the one before
it is used; a broken reference log-prob cache file is recomputed; metrics.jsonl is cut back to a resumed step
and always holds strict JSON."""

import json
import math
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl import checkpoint, metrics, reference

ABSTRACT = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "n": jax.ShapeDtypeStruct((4,), jnp.int32)}


def tree(step: int) -> dict:
    return {
        "w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * step + 0.5,
        "n": jnp.full((4,), step, jnp.int32),
    }


def saved_run(workdir: Path, steps=(1, 2, 3)) -> None:
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=5, asynchronous=False)
    for step in steps:
        assert ckpt.save(step, tree(step), {"step": step})
    ckpt.close()


def files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def truncate_half(step_dir: Path):
    for f in files(step_dir):
        os.truncate(f, f.stat().st_size // 2)


def empty_files(step_dir: Path):
    for f in files(step_dir):
        os.truncate(f, 0)


def delete_state_item(step_dir: Path):
    shutil.rmtree(step_dir / "state")


def delete_meta_item(step_dir: Path):
    shutil.rmtree(step_dir / "meta")


def garble_checkpoint_metadata(step_dir: Path):
    (step_dir / "_CHECKPOINT_METADATA").write_text('{"item_handlers": {"st')


def delete_state_metadata(step_dir: Path):
    (step_dir / "state" / "_METADATA").unlink()


def garble_meta_json(step_dir: Path):
    (step_dir / "meta" / "metadata").write_text("{not json")


def delete_all_metadata(step_dir: Path):
    for f in files(step_dir):
        if "metadata" in f.name.lower():
            f.unlink()


def clear_step_dir(step_dir: Path):
    for child in step_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def truncate_array_data(step_dir: Path):
    data = [f for f in files(step_dir / "state") if f.parent.name == "d"]
    assert data
    for f in data:
        os.truncate(f, f.stat().st_size // 2)


DAMAGE = [
    truncate_half,
    empty_files,
    delete_state_item,
    delete_meta_item,
    garble_checkpoint_metadata,
    delete_state_metadata,
    garble_meta_json,
    delete_all_metadata,
    clear_step_dir,
    truncate_array_data,
]


def assert_tree_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_latest_of_intact_checkpoints(tmp_path):
    saved_run(tmp_path)
    lines = []
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=5)
    step, state, meta = ckpt.restore_latest(ABSTRACT, log=lines.append)
    assert (step, meta) == (3, {"step": 3})
    assert_tree_equal(state, tree(3))
    assert lines == [] and not (tmp_path / checkpoint.DAMAGED_DIR).exists()


def test_restore_latest_without_checkpoints(tmp_path):
    lines = []
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=5)
    assert ckpt.restore_latest(ABSTRACT, log=lines.append) is None
    assert lines == []


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    saved_run(tmp_path)
    damage(tmp_path / "checkpoints" / "3")
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=5, asynchronous=False)
    assert ckpt.latest_step() == 3  # orbax still lists the damaged step
    lines = []
    step, state, meta = ckpt.restore_latest(ABSTRACT, log=lines.append)
    assert (step, meta) == (2, {"step": 2})
    assert_tree_equal(state, tree(2))

    moved = list((tmp_path / checkpoint.DAMAGED_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("3-")
    assert not (tmp_path / "checkpoints" / "3").exists()
    assert len(lines) == 1 and str(moved[0]) in lines[0] and "damaged" in lines[0], lines
    assert ckpt.manager.all_steps() == [1, 2]

    # The run goes on from step 2: step 3 is saved afresh and restores.
    assert ckpt.save(3, tree(30), {"step": 3})
    ckpt.close()
    again = checkpoint.Checkpointer(tmp_path, every=1, keep=5)
    step, state, meta = again.restore_latest(ABSTRACT, log=lines.append)
    assert (step, meta) == (3, {"step": 3})
    assert_tree_equal(state, tree(30))
    assert len(lines) == 1


def test_a_missing_step_metadata_file_alone_is_not_damage(tmp_path):
    # orbax restores without <step>/_CHECKPOINT_METADATA (older versions never wrote it): arrays are intact.
    saved_run(tmp_path)
    (tmp_path / "checkpoints" / "3" / "_CHECKPOINT_METADATA").unlink()
    lines = []
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=5)
    step, state, _ = ckpt.restore_latest(ABSTRACT, log=lines.append)
    assert step == 3 and lines == []
    assert_tree_equal(state, tree(3))


def test_a_shape_mismatch_falls_back(tmp_path):
    saved_run(tmp_path, steps=(1, 2))
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=5, asynchronous=False)
    assert ckpt.save(3, {"w": jnp.zeros((3, 3)), "n": jnp.zeros((4,), jnp.int32)}, {"step": 3})
    ckpt.wait()
    lines = []
    step, state, _ = ckpt.restore_latest(ABSTRACT, log=lines.append)
    assert step == 2
    assert_tree_equal(state, tree(2))
    assert len(lines) == 1 and "shape" in lines[0]
    ckpt.close()


def test_all_checkpoints_damaged_is_a_fresh_start(tmp_path):
    saved_run(tmp_path)
    for step, damage in zip((1, 2, 3), (truncate_half, delete_state_item, clear_step_dir), strict=True):
        damage(tmp_path / "checkpoints" / str(step))
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=5, asynchronous=False)
    lines = []
    assert ckpt.restore_latest(ABSTRACT, log=lines.append) is None
    assert ckpt.latest_step() is None
    moved = sorted(p.name.split("-")[0] for p in (tmp_path / checkpoint.DAMAGED_DIR).iterdir())
    assert moved == ["1", "2", "3"]
    assert len(lines) == 4 and "starting from scratch" in lines[-1], lines
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == []
    ckpt.close()


def test_an_in_flight_tmp_dir_is_left_alone(tmp_path):
    saved_run(tmp_path, steps=(1, 2))
    tmp = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
    tmp.mkdir()
    (tmp / "junk").write_text("half a save")
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=5, asynchronous=False)
    lines = []
    step, state, _ = ckpt.restore_latest(ABSTRACT, log=lines.append)
    assert step == 2 and lines == []
    assert_tree_equal(state, tree(2))
    assert not (tmp_path / checkpoint.DAMAGED_DIR).exists()
    ckpt.close()


# Reference log-prob cache


@pytest.fixture
def ref_case(tmp_path, monkeypatch):
    """Calls cached_reference_logps on 5 pairs with a counting stand-in for the reference forward pass."""
    n = 5
    arrays = {
        "tokens": np.arange(n * 2 * 6, dtype=np.int32).reshape(n, 2, 6),
        "loss_mask": np.ones((n, 2, 6), np.float32),
    }
    params = {"w": jnp.ones((3,), jnp.float32)}
    want = -np.arange(n * 2, dtype=np.float32).reshape(n, 2) - 1.0
    calls = []

    def fake_compute(graphdef, p, a, **kw):
        calls.append(1)
        return want.copy()

    monkeypatch.setattr(reference, "compute_reference_logps", fake_compute)

    def call():
        lines = []
        logps, path, hit = reference.cached_reference_logps(
            tmp_path, None, params, arrays, batch_size=2, mesh=None, preset="dp", log=lines.append
        )
        return logps, path, hit, lines

    return call, calls, want


def truncated_npy(path: Path, good: np.ndarray):
    np.save(path, good)
    os.truncate(path, path.stat().st_size - 8)


CACHE_DAMAGE = {
    "truncated": (truncated_npy, "unreadable"),
    "empty": (lambda p, g: p.write_bytes(b""), "empty"),
    "garbage": (lambda p, g: p.write_bytes(b"not an npy file at all"), "unreadable"),
    "wrong_shape": (lambda p, g: np.save(p, g[:3]), "shape"),
    "wrong_dtype": (lambda p, g: np.save(p, g.astype(np.float64)), "dtype"),
    "non_finite": (
        lambda p, g: np.save(p, np.where(np.arange(g.size).reshape(g.shape) == 3, np.nan, g)),
        "non-finite",
    ),
}


@pytest.mark.parametrize("kind", CACHE_DAMAGE)
def test_a_damaged_reference_cache_is_recomputed(ref_case, kind):
    call, calls, want = ref_case
    logps, path, hit, _ = call()
    assert not hit and len(calls) == 1
    damage, word = CACHE_DAMAGE[kind]
    damage(path, want)
    logps, path2, hit, lines = call()
    assert path2 == path and not hit and len(calls) == 2
    np.testing.assert_array_equal(logps, want)
    assert any(str(path) in line and word in line for line in lines), lines
    # Rewritten: the next call is a hit on the same values, and no temp file is left behind.
    logps, _, hit, lines = call()
    assert hit and len(calls) == 2
    np.testing.assert_array_equal(logps, want)
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []


# Metrics


def test_truncate_after_drops_later_rows_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "train/lo')
    assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert metrics.truncate_after(tmp_path, 4) == 3  # rows 5 and 6 and the torn line
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:4])
    assert metrics.read_metrics(tmp_path) == rows[:4]
    assert metrics.truncate_after(tmp_path, 10) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert metrics.truncate_after(tmp_path / "nowhere", 3) == 0


def test_truncate_after_keeps_a_whole_last_row_without_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}')
    assert metrics.read_metrics(tmp_path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    assert metrics.truncate_after(tmp_path, 2) == 0
    assert path.read_text() == '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n'


def test_metric_rows_are_strict_json(tmp_path, monkeypatch):
    scalars = []

    class FakeTB:
        def __init__(self, logdir):
            pass

        def add_scalar(self, name, value, step):
            scalars.append((name, value, step))

        def close(self):
            pass

    import tensorboardX

    monkeypatch.setattr(tensorboardX, "SummaryWriter", FakeTB)
    writer = metrics.MetricWriter(tmp_path)
    writer.write(
        3, {"a": float("nan"), "b": float("inf"), "c": -np.inf, "d": np.float32(2.5), "e": jnp.array(1.0)}
    )
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 3, "a": None, "b": None, "c": None, "d": 2.5, "e": 1.0}
    got = {name: value for name, value, _ in scalars}
    assert math.isnan(got["a"]) and got["b"] == math.inf and got["c"] == -math.inf and got["d"] == 2.5


def test_strict_json_converts_nested_non_finite_floats():
    obj = {
        "eval": {"loss": float("nan"), "acc": [1.0, float("inf"), {"x": -math.inf}]},
        "n": 3,
        "ok": True,
        "name": "sft",
        "none": None,
        "np": np.float32(np.nan),
        "t": (0.5, np.float64(2.0)),
    }
    out = metrics.strict_json(obj)
    assert out == {
        "eval": {"loss": None, "acc": [1.0, None, {"x": None}]},
        "n": 3,
        "ok": True,
        "name": "sft",
        "none": None,
        "np": None,
        "t": [0.5, 2.0],
    }
    json.dumps(out, allow_nan=False)
    assert obj["eval"]["loss"] != obj["eval"]["loss"]  # the input is not modified
