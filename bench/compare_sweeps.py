"""Compares two sweep workdirs of one study value by value: whether the results files are byte-identical, and
for every run both hold, every logged value of metrics.jsonl (timings aside) and the final evaluation.

    python bench/compare_sweeps.py /tmp/q/full_off /tmp/q/full_auto

Prints the runs that differ, the metrics that differ with how many rows and the largest relative difference,
and the count of summaries whose evaluation differs. A run's id can hold a hash of an absolute path (the
SFT bases hash their cache dir), so runs are compared by the ids the two workdirs share."""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from jaxrl.metrics import read_metrics
from jaxrl.workdir import finished_summary

RESULT_FILES = ("results.csv", "results.md", "selected.json")
TIMING_SUFFIXES = ("tokens_per_s", "tflops_per_s")


def is_timing(key: str) -> bool:
    return key.startswith("time/") or key.endswith(TIMING_SUFFIXES)


def logged_rows(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not is_timing(k)} for row in read_metrics(run)]


def relative(a, b) -> float:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(a - b) / max(abs(a), abs(b), 1e-30)
    return float("inf")


def compare(a: Path, b: Path) -> dict:
    out = {"files": {}, "runs_only_in_one": 0, "same": 0, "differ": [], "keys": collections.Counter()}
    for name in RESULT_FILES:
        pa, pb = a / name, b / name
        if not (pa.exists() or pb.exists()):
            out["files"][name] = "in neither"
        elif pa.exists() and pb.exists():
            out["files"][name] = "identical" if pa.read_bytes() == pb.read_bytes() else "DIFFERENT"
        else:
            out["files"][name] = f"only in {a if pa.exists() else b}"
    ids_a = {p.name for p in (a / "runs").iterdir()}
    ids_b = {p.name for p in (b / "runs").iterdir()}
    out["runs_only_in_one"] = len(ids_a ^ ids_b)
    worst = collections.defaultdict(float)
    evals = evals_differ = 0
    for run in sorted(ids_a & ids_b):
        ra, rb = a / "runs" / run, b / "runs" / run
        if (ra / "metrics.jsonl").exists() and (rb / "metrics.jsonl").exists():
            xs, ys = logged_rows(ra), logged_rows(rb)
            if xs == ys:
                out["same"] += 1
            else:
                out["differ"].append(run)
                if len(xs) != len(ys):
                    out["keys"]["(row count)"] += 1
                for x, y in zip(xs, ys, strict=False):
                    for k in set(x) | set(y):
                        if x.get(k) != y.get(k):
                            out["keys"][k] += 1
                            worst[k] = max(worst[k], relative(x.get(k), y.get(k)))
        sa, sb = finished_summary(ra), finished_summary(rb)
        if sa is not None and sb is not None:
            evals += 1
            evals_differ += sa.get("eval") != sb.get("eval")
    out["worst"] = dict(worst)
    out["summaries"], out["evals_differ"] = evals, evals_differ
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    out = compare(args.a, args.b)
    for name, state in out["files"].items():
        print(f"{name}: {state}")
    print(f"runs in only one workdir: {out['runs_only_in_one']}")
    for run in out["differ"]:
        print(f"differs: {run}")
    print(f"metrics.jsonl equal (timings aside): {out['same']}, differ: {len(out['differ'])}")
    for key, rows in out["keys"].most_common():
        print(f"  {key}: {rows} rows, largest relative difference {out['worst'].get(key, float('nan')):.3g}")
    print(f"summaries compared: {out['summaries']}, evaluation differs in {out['evals_differ']}")


if __name__ == "__main__":
    main()
