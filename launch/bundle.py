"""What the launchers ship to remote workers: the installed `jaxrl` and `launch` packages (wherever they were
imported from: a checkout, an editable or a regular install), a generated pyproject.toml (from the installed
distribution's metadata) that makes the bundle pip-installable, and the user's study files under `study/`.

    <bundle>/pyproject.toml   name, version, dependencies, extras, `jaxrl` script of the installed jaxrl
    <bundle>/jaxrl/ ...       copy of the installed package (no __pycache__)
    <bundle>/launch/ ...
    <bundle>/study/<file>.py  each study (--config) file, wherever it lives on this machine

`python -m launch.bundle --config STUDY.py [--config ...] --out DEST` writes DEST as a directory, or as a
gzipped tarball when DEST ends in .tgz / .tar.gz; it imports neither jaxrl nor JAX. Workers either
`pip install '<bundle>[tpu]'` (TPU) or put <bundle> first on PYTHONPATH (SLURM), and run
`jaxrl train --config <bundle>/study/<file>.py ...`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from launch import LaunchError

PACKAGES = ("jaxrl", "launch")
STUDY_DIR = "study"


def package_dir(name: str) -> Path:
    """The directory the package `name` is imported from (found without importing it)."""
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise LaunchError(f"cannot find the installed package {name!r} to ship to the workers")
    return Path(locations[0]).resolve()


def study_name(config: str) -> str:
    """Where a study file lands in the bundle, relative to the bundle's root: study/<file name>."""
    return f"{STUDY_DIR}/{Path(config).name}"


def study_files(configs: Sequence[str]) -> dict[str, Path]:
    """{bundle-relative name: absolute source path} of the study files; two files of one name are refused."""
    out: dict[str, Path] = {}
    for config in configs:
        path = Path(config).expanduser().absolute()
        if re.search(r"[\x00-\x1f\x7f]", path.name):
            raise LaunchError(f"--config {config!r}: control characters in the file name are refused")
        if not path.is_file():
            raise LaunchError(f"--config {config}: no such file")
        name = study_name(str(path))
        if name in out and out[name] != path:
            raise LaunchError(f"--config: {out[name]} and {path} would both ship as {name}")
        out[name] = path
    return out


def _split_extra(requirement: str) -> tuple[str, str | None]:
    """`req; extra == "tpu"` -> ("req", "tpu"); other markers are kept on the requirement."""
    req, _, marker = requirement.partition(";")
    marker = marker.strip()
    m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
    if not m:
        return requirement.strip(), None
    rest = f"{marker[: m.start()]} {marker[m.end() :]}".strip()
    rest = re.sub(r"^and\s+|\s+and$", "", re.sub(r"\s+and\s+and\s+", " and ", rest)).strip()
    return (req.strip() + (f"; {rest}" if rest else "")), m.group(1)


def project_metadata() -> dict:
    """name, version, requires_python, dependencies, optional (extra -> requirements), scripts of jaxrl:
    from the installed distribution's metadata, else from a pyproject.toml beside the package (a plain
    checkout on sys.path)."""
    try:
        dist = importlib.metadata.distribution("jaxrl")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        deps: list[str] = []
        extras = dist.metadata.get_all("Provides-Extra") or []
        optional: dict[str, list[str]] = {extra: [] for extra in extras}
        for requirement in dist.requires or []:
            req, extra = _split_extra(requirement)
            (optional.setdefault(extra, []) if extra else deps).append(req)
        scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
        return {
            "name": dist.metadata["Name"],
            "version": dist.version,
            "requires_python": dist.metadata.get("Requires-Python") or "",
            "dependencies": deps,
            "optional": optional,
            "scripts": scripts,
        }
    pyproject = package_dir("jaxrl").parent / "pyproject.toml"
    if not pyproject.is_file():
        raise LaunchError("jaxrl is neither an installed distribution nor in a tree with pyproject.toml")
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    return {
        "name": project["name"],
        "version": project["version"],
        "requires_python": project.get("requires-python", ""),
        "dependencies": list(project.get("dependencies", [])),
        "optional": {k: list(v) for k, v in project.get("optional-dependencies", {}).items()},
        "scripts": dict(project.get("scripts", {})),
    }


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def pyproject_text(meta: dict) -> str:
    """A pyproject.toml that installs the bundle's jaxrl and launch packages (every file in them) with the
    installed distribution's dependencies, extras and scripts."""
    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f"name = {json.dumps(meta['name'])}",
        f"version = {json.dumps(meta['version'])}",
    ]
    if meta["requires_python"]:
        lines.append(f"requires-python = {json.dumps(meta['requires_python'])}")
    lines += [f"dependencies = {_toml_list(meta['dependencies'])}", "", "[project.optional-dependencies]"]
    lines += [f"{json.dumps(k)} = {_toml_list(v)}" for k, v in sorted(meta["optional"].items())]
    lines += ["", "[project.scripts]"]
    lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in sorted(meta["scripts"].items())]
    lines += [
        "",
        "[tool.setuptools.packages.find]",
        f"include = {_toml_list([p + '*' for p in PACKAGES])}",
        "",
        "[tool.setuptools.package-data]",
        '"*" = ["*"]',
        "",
    ]
    return "\n".join(lines)


def _package_files(name: str) -> list[tuple[str, Path]]:
    root = package_dir(name)
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".pyo"):
            files.append((f"{name}/{rel.as_posix()}", path))
    return files


def digest(configs: Sequence[str]) -> str:
    """12 hex digits of a hash of everything the bundle of `configs` holds (names and bytes)."""
    studies = study_files(configs)
    stamps = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in studies.values())
    return _digest(tuple(configs), stamps)


@functools.lru_cache(maxsize=64)
def _digest(configs: tuple[str, ...], stamps: tuple) -> str:  # stamps: the study files' (path, mtime, size)
    h = hashlib.sha256(pyproject_text(project_metadata()).encode())
    entries = [f for name in PACKAGES for f in _package_files(name)] + sorted(study_files(configs).items())
    for rel, path in entries:
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def ensure_tree(configs: Sequence[str], dest: str | Path) -> Path:
    """The bundle as directory `dest`, written (atomically: a temporary sibling renamed) unless it exists; for
    content-addressed destinations (see digest) that running jobs may be reading."""
    dest = Path(dest).absolute()
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write_tree(configs, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def write_tree(configs: Sequence[str], dest: Path) -> dict[str, Path]:
    """Writes the bundle as directory `dest` (replacing it); returns the shipped study files."""
    studies = study_files(configs)
    meta = project_metadata()
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in PACKAGES:
        for rel, path in _package_files(name):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
    (dest / STUDY_DIR).mkdir()
    for name, path in studies.items():
        shutil.copyfile(path, dest / name)
    (dest / "pyproject.toml").write_text(pyproject_text(meta))
    return studies


def build(configs: Sequence[str], dest: str | Path) -> Path:
    """The bundle at `dest`: a .tgz / .tar.gz file (entries relative to the bundle root) or a directory."""
    dest = Path(dest).absolute()
    if not dest.name.endswith((".tgz", ".tar.gz")):
        write_tree(configs, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bundle"
        write_tree(configs, root)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(root.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
        dest.write_bytes(buffer.getvalue())
    return dest


def command(configs: Sequence[str], dest: str, python: str | None = None) -> tuple[str, ...]:
    """The argv that builds the bundle (what the plans show and run)."""
    argv = [python or sys.executable, "-m", "launch.bundle"]
    for config in configs:
        argv += ["--config", str(config)]
    return (*argv, "--out", str(dest))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="study file to ship (repeatable)")
    parser.add_argument("--out", required=True, help="bundle directory, or a .tgz / .tar.gz file")
    args = parser.parse_args(argv)
    try:
        path = build(args.config, args.out)
    except LaunchError as e:
        print(f"launch.bundle: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
