"""Members of a mapped group (`jaxrl.grouping.over_members`, how="map") are bitwise their runs alone: every
value of metrics.jsonl (timings aside) and of the summary's evaluation, for SFT, RM, DPO and PPO, and after a
kill in the middle of the group and a rerun.

Bitwise under XLA's default CPU code generation. The suite's fast flags (tests/conftest.py) turn the CPU
fusion emitters off, and without them a member's loop body compiles differently from its solo program (a
few ulps apart), so this file skips in the suite's process and
`tests/test_groups.py::test_mapped_groups_are_bitwise_their_runs_alone` runs it in a process of its own with
the emitters on."""

import json
import os
from pathlib import Path

import pytest
from conftest import tiny_run_config

from jaxrl import group, train
from jaxrl import workdir as workdir_lib

EXACT_FLAG = "--xla_cpu_use_fusion_emitters=true"
pytestmark = pytest.mark.skipif(
    EXACT_FLAG not in os.environ.get("XLA_FLAGS", ""),
    reason="run by tests/test_groups.py::test_mapped_groups_are_bitwise_their_runs_alone, with XLA's CPU "
    "fusion emitters on",
)
QUIET = lambda *a, **k: None  # noqa: E731
TIMING = ("tokens_per_s", "tflops_per_s")


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_bitwise(solo: Path, member: Path) -> None:
    a, b = rows(solo), rows(member)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb), f"step {ra['step']}: {sorted(set(ra) ^ set(rb))}"
        for k, v in ra.items():
            if not (k.endswith(TIMING) or k.startswith("time/")):
                assert rb[k] == v, f"{member.name} step {ra['step']} {k}: {rb[k]!r} != {v!r} alone"
    sa, sb = (workdir_lib.finished_summary(d) for d in (solo, member))
    assert sa["status"] == sb["status"] == "finished" and sa["steps"] == sb["steps"]
    assert sb["eval"] == sa["eval"]


def short(stage: str, **overrides):
    return tiny_run_config(
        stage, **{"train.steps": 8, "train.log_every": 2, "train.checkpoint_every": 4, **overrides}
    )


def solo_and_mapped(path: Path, cfgs: list, **kw) -> list[tuple[Path, Path]]:
    for i, cfg in enumerate(cfgs):
        train.run(cfg, path / f"solo{i}", log=QUIET)
    dirs = [path / f"member{i}" for i in range(len(cfgs))]
    results = group.run_group(cfgs, dirs, log=QUIET, how="map", **kw)
    assert [r["status"] for r in results] == ["finished"] * len(cfgs)
    return [(path / f"solo{i}", d) for i, d in enumerate(dirs)]


def test_mapped_members_are_bitwise_their_runs_alone(tmp_path):
    base = tmp_path / "base"
    train.run(short("sft"), base, log=QUIET)
    sft = [short("sft", seed=0), short("sft", seed=3, **{"optim.lr": 3e-4})]
    pairs = solo_and_mapped(tmp_path / "sft", sft)
    rm = [
        short("rm", **{"train.init_from": str(base)}),
        short("rm", **{"train.init_from": str(base), "seed": 2, "data.synthetic_kind": "noisy"}),
    ]
    pairs += solo_and_mapped(tmp_path / "rm", rm)

    # DPO members differing in seed, beta and data, with a sampled evaluation; killed after step 6 (a
    # checkpoint at 4, then a forced one at 6) and rerun.
    world = {"data.eval_prompts_per_domain": 2, "data.eval_samples": 2, "train.init_from": str(base)}
    dpo = [
        short("dpo", **world),
        short("dpo", **world, **{"seed": 1, "loss.beta": 0.3, "data.synthetic_kind": "noisy"}),
    ]
    assert len({group.group_key(c, "map") for c in dpo}) == 1
    for i, cfg in enumerate(dpo):
        train.run(cfg, tmp_path / "dpo" / f"solo{i}", log=QUIET)
    dirs = [tmp_path / "dpo" / f"member{i}" for i in range(2)]
    assert group.run_group(dpo, dirs, log=QUIET, how="map", stop_after=6) == [{"stopped_at": 6}] * 2
    assert [r["status"] for r in group.run_group(dpo, dirs, log=QUIET, how="map")] == ["finished"] * 2
    pairs += [(tmp_path / "dpo" / f"solo{i}", d) for i, d in enumerate(dirs)]

    # PPO with the gold reward and the value model from the policy: rollouts, scoring, the adaptive KL
    # coefficient, updates and the sampled evaluation per member.
    ppo = {
        "train.init_from": str(base),
        "train.steps": 3,
        "train.checkpoint_every": 3,
        "train.eval_every": 3,
        "rl.verifiable": "gold",
        "rl.value_init": "policy",
        "rl.rollout_batch": 8,
        "rl.minibatch": 8,
        "rl.epochs": 2,
        "rl.num_prompts": 32,
        "rl.max_new_tokens": 6,
        "rl.kl_target": 0.5,
        "data.eval_prompts_per_domain": 2,
        "data.val_prompts_per_domain": 2,
        "data.eval_samples": 2,
    }
    online = [
        tiny_run_config("ppo", **ppo, **{"seed": 0, "rl.kl_coef": 0.05, "optim.lr": 3e-4}),
        tiny_run_config("ppo", **ppo, **{"seed": 1, "rl.kl_coef": 0.1, "optim.lr": 1e-4}),
    ]
    pairs += solo_and_mapped(tmp_path / "ppo", online)
    for solo, member in pairs:
        assert_bitwise(solo, member)
