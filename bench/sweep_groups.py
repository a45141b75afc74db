"""Sweeps as one program: wall time of K runs one at a time against the same K runs as one vmapped group
(jaxrl.group), at the synthetic study's shapes (experiments/unpacking_synthetic.py: DPO, 120 steps of 32
pairs of 48 tokens, a 0.1M-parameter model, the study's sampled evaluation; or with --stage ppo its PPO
runs, rollout batches of 32 with 16 new tokens, two epochs of minibatches of 16, rewarded by a reward model
trained from the same SFT base, members differing in seed and the online recipe grid's settings).

    python bench/sweep_groups.py [--members 4] [--eval] [--steps 120] [--stage dpo|ppo] [--how vmap|map]

Each arm runs in a fresh directory with the persistent compilation cache off, so both pay their compiles;
prints seconds per arm and the ratio. `--how`: the group's way over its members (jaxrl.grouping.over_members:
batched, or one after another in one program; a mapped DPO group holds one loss). Without --eval the world
evaluation is off (training and the held-out loss only); with it, every member also samples its validation
curves and its final test evaluation (which a group runs per member)."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def study():
    spec = importlib.util.spec_from_file_location("study", REPO / "experiments" / "unpacking_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="default: 120 (dpo), 32 iterations (ppo)")
    parser.add_argument("--stage", choices=("dpo", "ppo"), default="dpo")
    parser.add_argument("--eval", action="store_true", help="with the study's sampled world evaluation")
    parser.add_argument("--how", choices=("vmap", "map"), default="vmap")
    args = parser.parse_args()

    from jaxrl import group, train
    from jaxrl.config import override

    module = study()
    args.steps = args.steps or (120 if args.stage == "dpo" else 32)
    cfg = override(module.get_config(), {"train.steps": args.steps, "train.progress": False})
    if not args.eval:
        cfg = override(cfg, {"data.eval_prompts_per_domain": 0})
    root = Path(tempfile.mkdtemp(prefix="bench-groups-"))
    quiet = lambda *a, **k: None  # noqa: E731
    base = root / "sft"
    train.run(
        override(
            module.sft_config(cfg),
            {"train.steps": 20, "data.eval_prompts_per_domain": 0, "train.progress": False},
        ),
        base,
        log=quiet,
    )
    kinds, names = ("clean", "noisy", "length_biased", "math_only"), ("dpo", "ipo")
    cfgs = None
    if args.stage == "ppo":
        rm = root / "rm"
        rm_cfg = {
            "stage": "rm",
            "train.init_from": str(base),
            "train.steps": 40,
            **module.stage_defaults("rm"),
        }
        train.run(override(cfg, rm_cfg), rm, log=quiet)
        online = {**module.stage_defaults("ppo"), "train.steps": args.steps, "train.progress": False}
        roles = {"train.init_from": str(base), "rl.reward_model": str(rm), "rl.prompt_set": "in_domain"}
        grid = module.ONLINE_GRID
        cfgs = [
            override(cfg, {"stage": "ppo", **online, **roles, **grid[i % len(grid)], "seed": i})
            for i in range(args.members)
        ]
    cfgs = cfgs or [
        override(
            cfg,
            {
                "train.init_from": str(base),
                "seed": i,
                "loss.name": names[i % 2],
                "data.synthetic_kind": kinds[i % 4],
            },
        )
        for i in range(args.members)
    ]
    if args.how == "map" and args.stage == "dpo":  # one loss per mapped group (jaxrl.group.group_key)
        cfgs = [override(c, {"loss.name": names[0]}) for c in cfgs]
    # Data and reference log-probs are cached per run dir: both arms build their own.
    start = time.perf_counter()
    for i, c in enumerate(cfgs):
        train.run(c, root / f"solo{i}", log=quiet)
    solo = time.perf_counter() - start
    start = time.perf_counter()
    group.run_group(cfgs, [root / f"member{i}" for i in range(args.members)], log=quiet, how=args.how)
    grouped = time.perf_counter() - start
    print(
        f"{args.stage}: members {args.members} ({args.how}), steps {args.steps}, "
        f"world eval {'on' if args.eval else 'off'}: "
        f"one at a time {solo:.1f} s, one group {grouped:.1f} s, ratio {solo / grouped:.2f}x"
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
