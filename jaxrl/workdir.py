"""The run shell shared by every stage: one process per workdir (a lock), the saved config checked before
anything is reused and committed only once a run has started, finished and failed summaries, the rule that
turns skipped (non-finite) updates into a failed run, and the progress bar."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import time
from pathlib import Path

import jax

from jaxrl import config as config_lib
from jaxrl import metrics
from jaxrl.config import Config, ConfigError
from jaxrl.files import replacing

SUMMARY_FILE = "final/summary.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# Settings that change how a run is shown, never what it computes: a finished run answers for any value.
PRESENTATION_KEYS = frozenset({"train.progress", "train.tensorboard"})


class WorkdirLocked(ConfigError):
    """Another live process holds the workdir."""


class RunFailed(RuntimeError):
    """A run ended degenerate (non-finite updates or evaluation); its summary is marked failed."""

    def __init__(self, workdir: Path, summary: dict):
        super().__init__(f"{workdir}: run failed: {summary.get('reason', 'unknown reason')}")
        self.workdir, self.summary = workdir, summary


def _lock_path(workdir: Path) -> Path:
    # Each process of a multi-host job holds its own lock, so a second job is refused on every host.
    index = jax.process_index()
    return workdir / (LOCK_FILE if index == 0 else f"{LOCK_FILE}.{index}")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {info.get('started', '?')})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def hold(workdir: str | Path, *, log=print):
    """Holds the workdir's exclusive lock for the body; raises WorkdirLocked (naming the holder) when a live
    process holds it. The lock is an flock, released by the kernel when its holder dies (even by kill -9), so
    a killed run never leaves a lock that blocks the next one; where the filesystem has no flock, the recorded
    host and pid decide whether the holder is alive."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = _lock_path(workdir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLocked(
                    f"{workdir} is in use by {_holder(path)}; wait for it or stop it"
                ) from None
            _check_recorded_holder(path, workdir, log)  # no flock here (some network filesystems)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _check_recorded_holder(path: Path, workdir: Path, log) -> None:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if _pid_alive(info["pid"]) and info["pid"] != os.getpid():
            raise WorkdirLocked(f"{workdir} is in use by {_holder(path)}; wait for it or stop it")
        log(f"warning: {path} was left by pid {info['pid']}, which is gone; taking it over")
        return
    raise WorkdirLocked(
        f"{workdir} is in use by {_holder(path)} (this filesystem has no locks: if that "
        f"process is gone, delete {path})"
    )


def config_differences(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (presentation-only settings aside)."""
    a, b = config_lib.flat_dict(old), config_lib.flat_dict(new)
    return sorted(k for k in set(a) | set(b) if k not in PRESENTATION_KEYS and a.get(k) != b.get(k))


def saved_config(workdir: str | Path) -> Config | None:
    """The config a workdir's run was started with (None when none was committed)."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return config_lib.from_dict(json.loads(path.read_text()))
    except (ValueError, ConfigError) as e:
        raise ConfigError(
            f"{path}: unreadable saved config ({e}); delete the run directory to start over"
        ) from None


def check_config(workdir: str | Path, cfg: Config) -> None:
    """Refuses a workdir whose run was started with another config, naming the keys that differ."""
    old = saved_config(workdir)
    if old is None:
        return
    diff = config_differences(old, cfg)
    if diff:
        shown = ", ".join(
            f"{k} ({_short(config_lib.flat_dict(old).get(k))} -> {_short(config_lib.flat_dict(cfg).get(k))})"
            for k in diff[:6]
        )
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise ConfigError(
            f"{workdir} holds a run made with a different config: {shown}{more}; use a new "
            f"workdir or delete this one to rerun it"
        )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def commit_config(workdir: str | Path, cfg: Config) -> None:
    """Records the run's config once it has started (a failed start leaves the workdir to a fixed config)."""
    if jax.process_index() == 0:
        with replacing(Path(workdir) / CONFIG_FILE) as tmp:
            config_lib.save(cfg, tmp)


def finished_summary(workdir: str | Path) -> dict | None:
    """A finished (or failed) run's summary; None while it has not ended."""
    path = Path(workdir) / SUMMARY_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # torn by a kill before the atomic rename existed: the run is redone from its checkpoint


def write_summary(workdir: str | Path, summary: dict) -> None:
    """Writes final/summary.json atomically as strict JSON (non-finite numbers as null)."""
    if jax.process_index() != 0:
        return
    path = Path(workdir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(metrics.strict_json(summary), indent=2, allow_nan=False) + "\n")


def skip_verdict(skipped: int, attempted: int, planned: int, max_fraction: float) -> str | None:
    """Why a run must stop for its skipped updates, or None. `attempted` updates so far (skipped included) of
    `planned` in all: the first update non-finite stops at once (before it can change the weights); more skips
    than the allowed fraction of the whole run cannot be made good by the updates left."""
    if skipped and skipped == attempted:
        return (
            f"the first {skipped} update(s) had a non-finite loss, gradient or update and were not applied; "
            f"stopped before any weight changed (check optim.lr, the data and the model's dtype)"
        )
    if skipped > max_fraction * max(planned, 1):
        return (
            f"{skipped} of {attempted} updates so far had a non-finite loss, gradient or update (skipped), "
            f"more than train.max_skipped_fraction={max_fraction} of the run's {planned}"
        )
    return None


def nonfinite_eval(eval_metrics: dict) -> list[str]:
    """Names of evaluation metrics that are not finite numbers."""
    return sorted(
        k for k, v in eval_metrics.items() if isinstance(v, (int, float)) and not math.isfinite(float(v))
    )


def fail(workdir: Path, cfg: Config, reason: str, *, log, **facts) -> RunFailed:
    """Writes a failed summary and returns the exception that ends the run."""
    summary = {"stage": cfg.stage, "status": "failed", "reason": reason, **facts}
    write_summary(workdir, summary)
    log(f"{workdir}: run failed: {reason}")
    return RunFailed(workdir, summary)


def run_in(workdir: str | Path, cfg: Config, body, *, log=print, answered=None) -> dict:
    """The shell of every stage: lock the workdir, refuse another config, answer a finished run from its
    summary (a failed one raises RunFailed again; `answered()`, when given, is called then), else
    `body(commit)` trains it; `commit()` records the config once the run has started."""
    workdir = Path(workdir).absolute()
    with hold(workdir, log=log):
        check_config(workdir, cfg)  # before the done check: a finished run never answers for another config
        summary = finished_summary(workdir)
        if summary is not None:
            if summary.get("status") == "failed":
                raise RunFailed(workdir, summary)
            log(f"{workdir}: already finished")
            if answered is not None:
                answered()
            return summary
        return body(lambda: commit_config(workdir, cfg))


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def progress(start: int, total: int, *, enabled: bool):
    """A progress bar over a run's steps (tqdm), or one that shows nothing."""
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, leave=False)
