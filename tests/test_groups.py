"""Sweeps as one program: runs that share shapes train as one vmapped group, and each member writes what it
would have written alone (metrics, evaluation, summary, checkpoints), resumes exactly, and fails alone."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_run_config

from jaxrl import config as config_lib
from jaxrl import group, grouping, losses, sweep, train
from jaxrl import workdir as workdir_lib

QUIET = lambda *a, **k: None  # noqa: E731
TIMING = ("tokens_per_s", "tflops_per_s")
# vmapped matmuls batch the same products differently from the solo program: losses agree to a few ulps
# after 8 updates (measured: train losses within 1e-6 relative, eval losses within 3e-6); metrics that are
# differences of nearly equal numbers (reward margins near zero) are compared with an absolute tolerance.
RTOL, ATOL = 1e-5, 1e-5


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(solo: Path, member: Path) -> None:
    """Same rows, same keys, same values (timing aside) in metrics.jsonl, and the same summary."""
    a, b = rows(solo), rows(member)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb), f"step {ra['step']}: {sorted(set(ra) ^ set(rb))}"
        for k, v in ra.items():
            if k.endswith(TIMING) or k.startswith("time/") or not isinstance(v, float):
                continue
            margin = ra.get(k.replace("accuracies", "margins"), 1.0)
            if k.endswith("accuracies") and abs(margin) < 1e-4:
                continue  # a count of margins > 0 while every margin is within rounding of 0 (step 1)
            np.testing.assert_allclose(rb[k], v, rtol=RTOL, atol=ATOL, err_msg=f"step {ra['step']} {k}")
    sa, sb = (workdir_lib.finished_summary(d) for d in (solo, member))
    assert sa["status"] == sb["status"] == "finished"
    assert sa["steps"] == sb["steps"] and sa["skipped_steps"] == sb["skipped_steps"]
    assert set(sa["eval"]) == set(sb["eval"])
    for k, v in sa["eval"].items():
        np.testing.assert_allclose(sb["eval"][k], v, rtol=RTOL, atol=ATOL, err_msg=f"eval {k}")


def solo_and_group(tmp_path: Path, cfgs: list, **kw) -> list:
    for i, cfg in enumerate(cfgs):
        train.run(cfg, tmp_path / f"solo{i}", log=QUIET)
    return group.run_group(cfgs, [tmp_path / f"member{i}" for i in range(len(cfgs))], log=QUIET, **kw)


def short(stage: str, **overrides):
    return tiny_run_config(
        stage, **{"train.steps": 8, "train.log_every": 2, "train.checkpoint_every": 4, **overrides}
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("group_base")
    train.run(short("sft"), workdir, log=QUIET)
    return str(workdir)


def test_sft_group_over_seeds_and_learning_rates_matches_solo(tmp_path):
    cfgs = [
        short("sft", seed=0),
        short("sft", seed=3, **{"optim.lr": 3e-4}),
        short("sft", seed=5, **{"optim.schedule": "cosine", "optim.warmup_ratio": 0.25}),
    ]
    keys = {group.group_key(c) for c in cfgs[:2]}
    assert len(keys) == 1 and group.group_key(cfgs[2]) not in keys  # the schedule's shape is in the key
    results = solo_and_group(tmp_path, cfgs[:2])
    assert all(r["status"] == "finished" for r in results)
    for i in range(2):
        assert_same_run(tmp_path / f"solo{i}", tmp_path / f"member{i}")


def test_rm_group_over_datasets_matches_solo(tmp_path, base):
    cfgs = [
        short("rm", **{"data.synthetic_kind": kind, "train.init_from": base, "optim.lr": lr})
        for kind, lr in (("clean", 1e-3), ("noisy", 5e-4))
    ]
    solo_and_group(tmp_path, cfgs)
    for i in range(2):
        assert_same_run(tmp_path / f"solo{i}", tmp_path / f"member{i}")


# Paired losses with a reference and no state carried across steps (bco_pair carries its reward shift in the
# train state, so it groups only with itself). An alias is its target's function under a second name: one
# alias stays (two branches of the group's switch sharing one function), the others would repeat that case.
KEPT_ALIAS = min(losses.PREFERENCE_LOSS_ALIASES)
PAIRED_WITH_REFERENCE = sorted(
    n
    for n, s in losses.PREFERENCE_LOSSES.items()
    if s.needs_reference
    and s.paired
    and not s.running_shift
    and (n not in losses.PREFERENCE_LOSS_ALIASES or n == KEPT_ALIAS)
)


def test_every_dpo_family_loss_in_one_group_matches_solo(tmp_path, base):
    """One vmapped program for every paired loss with a reference (one alias among them): each member selects
    its own loss by index and logs exactly its own metrics."""
    cfgs = [
        short(
            "dpo",
            # Seeds alternate (0, 1): members still differ in seed, beta and loss, and each seed's
            # initialiser and state constructor (the seed is a constant in them) compile once, not per member.
            **{"loss.name": name, "loss.beta": 0.1 + 0.05 * i, "seed": i % 2, "train.init_from": base},
            # Four steps on 64 pairs (one epoch), one checkpoint: what is compared is every member's metrics,
            # evaluation and summary, and the solo runs (one program per loss) are most of the cost.
            **{"train.steps": 4, "train.checkpoint_every": 4, "data.num_train": 64, "data.num_eval": 16},
        )
        for i, name in enumerate(PAIRED_WITH_REFERENCE)
    ]
    assert len({group.group_key(c) for c in cfgs}) == 1 and "bco_pair" not in PAIRED_WITH_REFERENCE
    assert losses.PREFERENCE_LOSS_ALIASES[KEPT_ALIAS] in PAIRED_WITH_REFERENCE  # its function's other branch
    bco = short("dpo", **{"loss.name": "bco_pair", "train.init_from": base})
    assert group.group_key(bco) != group.group_key(short("dpo", **{"train.init_from": base}))
    solo_and_group(tmp_path, cfgs)
    for i in range(len(cfgs)):
        assert_same_run(tmp_path / f"solo{i}", tmp_path / f"member{i}")


def test_reference_free_losses_and_on_the_fly_reference(tmp_path, base):
    # Four steps (rows at 2 and 4, one checkpoint), as in the loss-family test: a member whose reference is
    # lost, or moves with its policy, differs from its solo run from the first row on.
    four = {"train.steps": 4, "train.init_from": base}
    free = [
        short("dpo", **{"loss.name": n, "loss.beta": b, **four}) for n, b in (("simpo", 2.0), ("orpo", 0.1))
    ]
    on_the_fly = short("dpo", **{"train.reference": "on_the_fly", **four})
    assert group.group_key(free[0]) == group.group_key(free[1])
    assert group.group_key(on_the_fly) != group.group_key(free[0])  # one holds a reference, one does not
    solo_and_group(tmp_path, free)
    for i in range(2):
        assert_same_run(tmp_path / f"solo{i}", tmp_path / f"member{i}")
    fly = [on_the_fly, config_lib.override(on_the_fly, {"seed": 1, "loss.name": "ipo"})]
    solo_and_group(tmp_path / "fly", fly)
    for i in range(2):
        assert_same_run(tmp_path / "fly" / f"solo{i}", tmp_path / "fly" / f"member{i}")


def test_world_evaluation_of_members_matches_solo(tmp_path, base):
    """Validation curves during training and the final sampled evaluation, per member."""
    world = {
        "data.eval_prompts_per_domain": 4,
        "data.val_prompts_per_domain": 2,
        "data.eval_samples": 2,
        "train.eval_every": 4,
        "train.init_from": base,
    }
    cfgs = [short("dpo", **world), short("dpo", **world, **{"data.synthetic_kind": "noisy", "seed": 1})]
    solo_and_group(tmp_path, cfgs)
    for i in range(2):
        assert_same_run(tmp_path / f"solo{i}", tmp_path / f"member{i}")
        assert any("val/gold_reward" in r for r in rows(tmp_path / f"member{i}"))


def test_kill_and_rerun_resumes_every_member_exactly(tmp_path, base):
    cfgs = [
        short("dpo", **{"train.init_from": base, "seed": s, "loss.name": n})
        for s, n in ((0, "dpo"), (1, "ipo"))
    ]
    for i, cfg in enumerate(cfgs):
        train.run(cfg, tmp_path / f"solo{i}", log=QUIET)
    dirs = [tmp_path / f"member{i}" for i in range(2)]
    stopped = group.run_group(cfgs, dirs, log=QUIET, stop_after=6)  # checkpoint at 4, then 6 (forced)
    assert stopped == [{"stopped_at": 6}] * 2
    results = group.run_group(cfgs, dirs, log=QUIET)
    assert [r["status"] for r in results] == ["finished"] * 2
    for i in range(2):
        assert_same_run(tmp_path / f"solo{i}", dirs[i])
    again = group.run_group(cfgs, dirs, log=QUIET)  # finished members are answered, not retrained
    assert [r["steps"] for r in again] == [8, 8]


def test_partly_finished_group_runs_only_the_rest(tmp_path, base):
    cfgs = [short("dpo", **{"train.init_from": base, "seed": s}) for s in (0, 1, 2)]
    dirs = [tmp_path / f"member{i}" for i in range(3)]
    train.run(cfgs[1], dirs[1], log=QUIET)
    before = (dirs[1] / "metrics.jsonl").read_text()
    results = group.run_group(cfgs, dirs, log=QUIET)
    assert [r["status"] for r in results] == ["finished"] * 3
    assert (dirs[1] / "metrics.jsonl").read_text() == before


def test_a_failing_member_fails_alone(tmp_path, base):
    good = short("dpo", **{"train.init_from": base})
    bad = config_lib.override(good, {"optim.lr": 1e30, "seed": 1})
    train.run(good, tmp_path / "solo0", log=QUIET)
    with pytest.raises(workdir_lib.RunFailed) as solo_failure:
        train.run(bad, tmp_path / "solo1", log=QUIET)
    results = group.run_group([good, bad], [tmp_path / "member0", tmp_path / "member1"], log=QUIET)
    assert results[0]["status"] == "finished"
    assert isinstance(results[1], workdir_lib.RunFailed)
    assert results[1].summary["reason"] == solo_failure.value.summary["reason"]
    assert_same_run(tmp_path / "solo0", tmp_path / "member0")
    steps = lambda d: [r["step"] for r in rows(d)] if (d / "metrics.jsonl").exists() else []  # noqa: E731
    assert steps(tmp_path / "solo1") == steps(tmp_path / "member1")


def test_memory_guard_splits_a_group_that_does_not_fit(tmp_path, base):
    cfgs = [short("dpo", **{"train.init_from": base, "seed": s}) for s in range(2)]
    lines = []
    results = group.run_group(cfgs, [tmp_path / f"m{i}" for i in range(2)], log=lines.append, budget=1)
    assert [r["status"] for r in results] == ["finished"] * 2
    splits = [line for line in lines if "split in two" in line]
    assert len(splits) == 1 and splits[0].startswith("a group of 2 needs")


def test_auto_maps_on_a_cpu_and_the_modes_name_their_way():
    assert grouping.grouping("auto") == "map"  # the tests run on CPU; on a GPU or TPU it is "vmap"
    assert grouping.grouping("on") == grouping.grouping("vmap") == "vmap"
    assert grouping.grouping("map") == "map" and grouping.grouping("off") is None
    with pytest.raises(ValueError, match="how="):
        group.run_group([short("sft")], ["unused"], how="on")


def test_over_members_maps_what_vmap_batches():
    """The same values and shapes either way, with stacked (0) and shared (None) arguments as pytrees."""

    def f(a, b, c):
        return {"y": a["x"] @ b + a["z"].sum(), "c": c * 2.0}, b.sum()

    k = jax.random.split(jax.random.key(0), 3)
    a = {"x": jax.random.normal(k[0], (3, 2, 4)), "z": jnp.arange(6.0).reshape(3, 2)}
    b, c = jax.random.normal(k[1], (4, 5)), jax.random.normal(k[2], (3, 7))
    for axes in ((0, None, 0), ({"x": 0, "z": 0}, None, 0)):
        batched = jax.vmap(f, in_axes=axes)(a, b, c)
        mapped = grouping.over_members(f, axes, "map")(a, b, c)
        assert jax.tree.structure(mapped) == jax.tree.structure(batched)
        for m, v in zip(jax.tree.leaves(mapped), jax.tree.leaves(batched), strict=True):
            assert m.shape == v.shape
            np.testing.assert_allclose(m, v, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="0 or None"):
        grouping.over_members(f, (1, None, 0), "map")(a, b, c)


def test_mapped_groups_are_bitwise_their_runs_alone():
    """tests/test_groups_exact.py in a process with XLA's CPU fusion emitters on (see its doc): one passed
    test, not a skip."""
    from test_groups_exact import EXACT_FLAG

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["XLA_FLAGS"] = f"{EXACT_FLAG} --xla_force_host_platform_device_count=8"
    here = Path(__file__).parent
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "test_groups_exact.py"],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-6000:] + out.stderr[-3000:]


def test_keys_split_what_cannot_share_a_program():
    dpo = short("dpo")
    assert group.group_key(dpo) == group.group_key(config_lib.override(dpo, {"loss.name": "ipo", "seed": 3}))
    assert group.group_key(dpo) != group.group_key(config_lib.override(dpo, {"train.batch_size": 8}))
    assert group.group_key(dpo) != group.group_key(config_lib.override(dpo, {"model.layers": 1}))
    # A mapped group holds one loss (no switch between losses: see group.group_key).
    ipo = config_lib.override(dpo, {"loss.name": "ipo"})
    assert group.group_key(dpo, "map") != group.group_key(ipo, "map")
    assert group.group_key(dpo, "map") == group.group_key(config_lib.override(dpo, {"seed": 3}), "map")
    assert group.group_key(config_lib.override(dpo, {"data.padding": "bucket"})) is None
    # Online runs group too (tests/test_rl_groups.py), but not a LoRA policy (its base is its reference).
    assert group.group_key(short("ppo")) is not None
    assert group.group_key(short("ppo", **{"model.lora_rank": 4})) is None


STUDY = textwrap.dedent("""
    from jaxrl.config import Config, DataConfig, ModelConfig, TrainConfig, override

    def get_config():
        return Config(stage="dpo",
                      model=ModelConfig(vocab_size=256, hidden=32, layers=1, heads=2, kv_heads=1, mlp=64,
                                        dtype="float32"),
                      data=DataConfig(num_train=64, num_eval=16, max_len=48, max_prompt_len=24,
                                      eval_prompts_per_domain=0),
                      train=TrainConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=2,
                                        tensorboard=False, progress=False))

    def sft_config(cfg):
        return override(cfg, {"stage": "sft", "train.steps": 4, "loss.name": "dpo", "loss.beta": 0.1})

    def sweep():
        return [{"loss.name": n, "loss.beta": b} for n, b in (("dpo", 0.1), ("ipo", 0.5), ("dpo", 0.3))]

    def metrics():
        return ["eval/loss"]
""")


def test_sweep_groups_match_one_at_a_time(tmp_path, capfd):
    study = tmp_path / "study.py"
    study.write_text(STUDY)
    module = config_lib.load_experiment(str(study))
    lines = []
    off = sweep.run_sweep(module, tmp_path / "off", group="off", log=QUIET)
    capfd.readouterr()
    auto = sweep.run_sweep(module, tmp_path / "auto", group="on", log=lines.append)
    assert "(a group of 3" in capfd.readouterr().out
    points = lambda rows: {r["run"]: r for r in rows if r["kind"] == "point"}  # noqa: E731
    assert len(points(off)) == 3 and points(off).keys() == points(auto).keys()
    for run, a in points(off).items():
        np.testing.assert_allclose(points(auto)[run]["eval/loss"], a["eval/loss"], rtol=RTOL, err_msg=run)
        assert_same_run(tmp_path / "off" / "runs" / run, tmp_path / "auto" / "runs" / run)
    with pytest.raises(config_lib.ConfigError, match="--group"):
        sweep.run_sweep(module, tmp_path / "x", group="sometimes")
