"""A study's results: one row per finished run (with its paired difference against its SFT base and its
benchmark scores), the table over seeds (Markdown, CSV), the plots, and the comparisons of the findings."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxrl import config as config_lib
from jaxrl.study import Run


def base_labels(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """For shared base runs (which have no overrides of their own), the settings that tell them apart: the
    config keys whose values differ between base runs of one stage (seed and paths aside)."""
    bases = [r for r in runs if r.kind == "base"]
    flat = {r.id: config_lib.flat_dict(r.cfg) for r in bases}
    labels: dict[str, dict[str, Any]] = {r.id: {} for r in bases}
    for stage in {r.cfg.stage for r in bases}:
        group = [r.id for r in bases if r.cfg.stage == stage]
        keys = {k for rid in group for k in flat[rid]}
        for key in sorted(keys - {"seed", "train.init_from", "train.cache_dir"}):
            if len({json.dumps(flat[rid].get(key), sort_keys=True) for rid in group}) > 1:
                for rid in group:
                    labels[rid][key] = flat[rid].get(key)
    return labels


def collect(runs: list[Run], workdir: Path, evaluation=None) -> list[dict]:
    """One row per finished run: its overrides (for a shared base, what tells it apart from the other bases),
    base/point kind, train/eval metrics, and the benchmark scores of the study's `evaluation` (an
    `jaxrl.eval.jobs.EvalSpec`: harness/<task> columns)."""
    from jaxrl import workdir as workdir_lib
    from jaxrl.eval import jobs as eval_jobs

    rows = []
    labels = base_labels(runs)
    summaries = {r.id: workdir_lib.finished_summary(workdir / "runs" / r.id) for r in runs}
    failed = {rid for rid, s in summaries.items() if s is not None and s.get("status") == "failed"}
    for r in runs:
        summary = summaries[r.id]
        if summary is None and any(d in failed for d in r.deps):
            failed.add(r.id)  # in dependency order, so a failure propagates down the chain
            summary = {"status": "not run", "reason": "a run it depends on failed"}
        if summary is None:
            continue
        row = {"run": r.id, "kind": r.kind, "stage": r.cfg.stage, **labels.get(r.id, {}), **r.point}
        if r.kind == "base":
            row["seed"] = r.cfg.seed
        row["status"] = summary.get("status", "finished")
        row["skipped_steps"] = summary.get("skipped_steps", 0)
        if row["status"] != "finished":
            row["reason"] = summary.get("reason", "")
        row |= {f"train/{k}": v for k, v in summary.get("train", {}).items()}
        row |= {f"eval/{k}": v for k, v in summary.get("eval", {}).items()}
        row |= {f"val/{k}": v for k, v in summary.get("val", {}).items()}
        row |= _against_base(r, summary, runs, summaries)
        if evaluation is not None and evaluation.evaluates(r.cfg.stage):
            row |= eval_jobs.scores(workdir / "runs" / r.id, evaluation)
        rows.append(row)
    return rows


def _against_base(r: Run, summary: dict, runs: list[Run], summaries: dict) -> dict:
    """The paired gold difference of a policy run against its own SFT base (same seed, same prompts and
    sampling keys), prompt by prompt: eval/gold_reward_delta and its standard error."""
    from jaxrl.evaluate import paired_difference

    stages = {x.id: x.cfg.stage for x in runs}
    bases = [d for d in r.deps if stages.get(d) == "sft"]
    base = summaries.get(bases[0]) if bases else None
    mine = summary.get("eval_per_prompt")
    if not base or not mine or not base.get("eval_per_prompt"):
        return {}
    try:
        delta, se = paired_difference(mine, base["eval_per_prompt"])
    except ValueError:
        return {}  # scored on other prompts: no pairing
    return {"eval/gold_reward_delta": delta, "eval/gold_reward_delta_se": se}


# Two-sided 95% quantiles of Student's t by degrees of freedom (normal beyond the table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float], standard_errors: list[float]) -> float | None:
    """Half-width of a 95% interval for the mean of an arm: over seeds (Student's t) when there are several,
    over prompts and samples (the run's own standard error) when there is one seed."""
    if len(values) > 1:
        return _T95.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / np.sqrt(len(values))
    if len(standard_errors) == 1:
        return 1.96 * standard_errors[0]
    return None


def aggregate(rows: list[dict], metrics: list[str], group_keys: list[str]) -> list[dict]:
    """Mean, spread (sample std) and count over seeds for each group of runs with the same other overrides."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k, "")) for k in group_keys), []).append(row)
    out = []
    for key, members in groups.items():
        agg = dict(zip(group_keys, key, strict=True))
        agg["seeds"] = len(members)
        agg["skipped"] = sum(int(r.get("skipped_steps") or 0) for r in members)
        agg["failed"] = sum(r.get("status", "finished") != "finished" for r in members)
        for m in metrics:
            values = [
                r[m]
                for r in members
                if r.get("status", "finished") == "finished" and isinstance(r.get(m), (int, float))
            ]
            agg[m] = float(np.mean(values)) if values else None
            agg[f"{m} std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            errors = [
                r[f"{m}_se"]
                for r in members
                if r.get("status", "finished") == "finished" and isinstance(r.get(f"{m}_se"), (int, float))
            ]
            if errors:  # the metric has its own standard error: 95% intervals, over seeds and per seed
                agg[f"{m} ci95"] = interval(values, errors)
                agg[f"{m} seed_ci95"] = 1.96 * max(errors)
        out.append(agg)
    return out


RUN_FACTS = ("status", "skipped_steps", "reason")  # per-run facts of a row, not settings that define an arm


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_results(rows: list[dict], metrics: list[str], workdir: Path) -> tuple[Path, Path, str]:
    """results.md and results.csv (mean ± std over seeds per arm); returns their paths and the Markdown."""
    point_keys = sorted(
        {k for r in rows for k in r if "/" not in k and k not in ("run", "kind", "stage", "seed") + RUN_FACTS}
    )
    group_keys = ["stage"] + point_keys
    table = aggregate(rows, metrics, group_keys)
    table.sort(key=lambda r: tuple(str(r.get(k, "")) for k in group_keys))
    # Skipped updates and failed runs are shown whenever any arm has them: a degenerate arm never passes for
    # an ordinary row.
    facts = [k for k in ("skipped", "failed") if any(r[k] for r in table)]
    header = group_keys + ["seeds"] + facts + metrics
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cells = [_fmt(r.get(k)) for k in group_keys + ["seeds"]]
        cells += [
            ("FAILED " if k == "failed" else "") + f"{r[k]} of {r['seeds']}" if r[k] else "" for k in facts
        ]
        for m in metrics:
            mean, std, ci = r.get(m), r.get(f"{m} std"), r.get(f"{m} ci95")
            spread = ci if ci is not None else std
            cells.append(
                ""
                if mean is None
                else (f"{mean:.3f} ± {spread:.3f}" if spread is not None else f"{mean:.3f}")
            )
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    md_path, csv_path = workdir / "results.md", workdir / "results.csv"
    md_path.write_text(markdown)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(
            f,
            fieldnames=group_keys
            + ["seeds", "skipped", "failed"]
            + [x for m in metrics for x in (m, f"{m} std", f"{m} ci95", f"{m} seed_ci95")],
        )
        writer.writeheader()
        for r in table:
            writer.writerow({k: r.get(k) for k in writer.fieldnames})
    return md_path, csv_path, markdown


def _arm_label(row: dict) -> str:
    keys = [k for k in row if "/" not in k and k not in ("run", "kind", "seed") + RUN_FACTS]
    return " ".join(f"{row[k]}" for k in keys if row[k] not in ("", None))


def _algorithm(row: dict) -> str:
    """The algorithm of a row, for colours: the stage, with the loss for the DPO family and the reward source
    for online stages rewarded by a verifiable reward alone."""
    stage = row.get("stage", "")
    if stage == "dpo" and row.get("loss.name"):
        return f"dpo:{row['loss.name']}"
    if row.get("rl.verifiable") and not row.get("rl.reward_model"):
        return f"{stage} ({row['rl.verifiable']} reward)"
    return stage


def write_plots(rows: list[dict], workdir: Path) -> list[Path]:
    """Two PNGs: test gold reward per arm (bars: mean over seeds with its 95% interval; dots: each domain),
    arms sorted by gold reward; and validation curves of gold reward against KL to the reference over
    training, one line per arm, with the best-of-N frontier of the SFT base (as in Gao et al., 2022)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policy_rows = [r for r in rows if "eval/gold_reward" in r]
    if not policy_rows:
        return []
    domains = sorted({k.split("/")[-1] for r in policy_rows for k in r if k.startswith("eval/gold_reward/")})
    arms: dict[str, list[dict]] = {}
    for r in policy_rows:
        arms.setdefault(_arm_label(r), []).append(r)

    def mean(arm: str, key: str) -> float:
        values = [r[key] for r in arms[arm] if isinstance(r.get(key), (int, float))]
        return float(np.mean(values)) if values else float("nan")

    labels = sorted(arms, key=lambda a: mean(a, "eval/gold_reward"))
    paths = []

    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.28 * len(labels) + 1.2)))
    y = np.arange(len(labels))
    spread = [
        interval(
            [r["eval/gold_reward"] for r in arms[a]],
            [r["eval/gold_reward_se"] for r in arms[a] if "eval/gold_reward_se" in r],
        )
        or 0.0
        for a in labels
    ]
    ax.barh(y, [mean(a, "eval/gold_reward") for a in labels], xerr=spread, color="0.8", label="all domains")
    markers = "os^Dv<>p"
    for i, d in enumerate(domains):
        ax.scatter(
            [mean(a, f"eval/gold_reward/{d}") for a in labels],
            y,
            s=14,
            marker=markers[i % len(markers)],
            label=d,
            zorder=3,
        )
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("gold reward (sampled, test prompts); bar: mean over seeds with its 95% interval")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths.append(workdir / "gold_reward_by_domain.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    paths.append(_curves_plot(plt, arms, labels, workdir))
    plt.close("all")
    return paths


def validation_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, KL, gold) of a run's validation evaluations over training, from its metrics.jsonl."""
    from jaxrl.metrics import read_metrics

    return [
        (int(r["step"]), float(r["val/kl"]), float(r["val/gold_reward"]))
        for r in read_metrics(run_dir)
        if isinstance(r.get("val/kl"), (int, float)) and isinstance(r.get("val/gold_reward"), (int, float))
    ]


def _curves_plot(plt, arms: dict[str, list[dict]], labels: list[str], workdir: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    algorithms = sorted({_algorithm(arms[a][0]) for a in labels})
    colours = plt.get_cmap("tab10" if len(algorithms) <= 10 else "tab20")
    bases = [
        arms[a][0] for a in labels if arms[a][0].get("kind") == "base" and arms[a][0].get("stage") == "sft"
    ]
    start = (
        [(0, 0.0, bases[0]["val/gold_reward"])]
        if bases and isinstance(bases[0].get("val/gold_reward"), float)
        else []
    )
    for arm in labels:
        first = arms[arm][0]
        if first.get("kind") == "base":
            continue
        curve = validation_curve(workdir / "runs" / first["run"])  # the arm's first seed
        if curve:
            curve = start + curve  # every arm starts at its SFT base (the first base: seeds share a grid)
            ax.plot(
                [kl for _, kl, _ in curve],
                [g for _, _, g in curve],
                "-o",
                markersize=2.5,
                linewidth=1,
                color=colours(algorithms.index(_algorithm(first))),
                alpha=0.8,
            )
            ax.annotate(arm, (curve[-1][1], curve[-1][2]), fontsize=5, alpha=0.8)
    for alg in algorithms:
        if alg != "sft":
            ax.plot([], [], color=colours(algorithms.index(alg)), label=alg)
    for base in bases[:1]:
        frontier = []
        for prefix in ("val/", "eval/"):  # the validation split's frontier, else the test split's
            frontier = frontier or sorted(
                (base[f"{k}_kl_bound"], base[k])
                for k in base
                if re.fullmatch(rf"{prefix}best_of_\d+", k) and f"{k}_kl_bound" in base
            )
        if frontier:
            ax.plot(
                [kl for kl, _ in frontier],
                [g for _, g in frontier],
                "k--",
                linewidth=1.2,
                label="best-of-N on gold from the SFT base",
            )
        if isinstance(base.get("val/gold_reward"), float):
            ax.scatter([0.0], [base["val/gold_reward"]], color="black", zorder=4, s=18, label="SFT base")
    ax.set_xlabel("KL(policy || SFT base), nats per response (validation samples)")
    ax.set_ylabel("gold reward of sampled responses (validation prompts)")
    ax.set_title("validation curves over training, one line per arm (first seed)", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = workdir / "gold_reward_vs_kl.png"
    fig.savefig(path, dpi=120)
    return path


def compare(rows: list[dict], a: dict, b: dict, metric: str = "eval/gold_reward") -> dict | None:
    """The difference a - b of a metric between two arms (rows whose settings include `a`, resp. `b`), with a
    95% interval: paired by seed over the seeds both arms ran (Student's t) when there are several, else from
    the two runs' own standard errors. None when either arm has no finished run."""

    def pick(match: dict) -> dict[int, dict]:
        return {
            int(r.get("seed", 0)): r
            for r in rows
            if r.get("status", "finished") == "finished"
            and isinstance(r.get(metric), (int, float))
            and all(r.get(k) == v for k, v in match.items())
        }

    runs_a, runs_b = pick(a), pick(b)
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    diffs = [runs_a[s][metric] - runs_b[s][metric] for s in seeds]
    if len(seeds) > 1:
        hw = interval(diffs, [])
    else:
        errors = [runs[seeds[0]].get(f"{metric}_se") for runs in (runs_a, runs_b)]
        hw = 1.96 * float(np.hypot(*errors)) if all(isinstance(e, (int, float)) for e in errors) else None
    return {"difference": float(np.mean(diffs)), "ci95": hw, "seeds": len(seeds)}


def verdict(result: dict | None, expected_sign: int = 1) -> str:
    """ "agrees" when the 95% interval excludes zero on the expected side, "disagrees" on the other side, else
    "cannot tell" (also without a measurement)."""
    if result is None or result["ci95"] is None:
        return "cannot tell"
    low, high = result["difference"] - result["ci95"], result["difference"] + result["ci95"]
    if low > 0 or high < 0:
        return "agrees" if (low > 0) == (expected_sign > 0) else "disagrees"
    return "cannot tell"


def write_findings(findings: list[dict], workdir: Path) -> str:
    """findings.md: one row per claim (the paper's claim, what was measured with its interval, a verdict)."""
    lines = [
        "| claim (Ivison et al., 2024) | measured | 95% interval | seeds | verdict |",
        "|---|---|---|---|---|",
    ]
    for f in findings:
        r = f.get("result")
        measured = "" if r is None else f"{r['difference']:+.3f}"
        ci = "" if r is None or r["ci95"] is None else f"± {r['ci95']:.3f}"
        lines.append(
            f"| {f['claim']} | {f.get('what', '')} {measured} | {ci} | {'' if r is None else r['seeds']} "
            f"| {f['verdict']} |"
        )
    markdown = "\n".join(lines) + "\n"
    (workdir / "findings.md").write_text(markdown)
    return markdown
