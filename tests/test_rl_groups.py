"""Online runs as one program (jaxrl.rl.group): PPO runs that differ in seed, learning rate and KL coefficient
iterate as one vmapped group, and each member writes what it would have written alone and resumes exactly
after a kill in the middle of the group."""

import jax
import pytest
from conftest import shared_by_workers, tiny_run_config
from test_groups import assert_same_run

from jaxrl import config as config_lib
from jaxrl import group, train
from jaxrl.rl import group as rl_group

QUIET = lambda *a, **k: None  # noqa: E731


def roles_in(path) -> dict:
    return {"train.init_from": str(path / "sft"), "rl.reward_model": str(path / "rm")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An SFT base, a reward model trained from it (the value model starts from the reward model) and each
    PPO config run alone (built once for both test workers)."""

    def build(path):
        train.run(tiny_run_config("sft", **{"train.steps": 8}), path / "sft", log=QUIET)
        rm = tiny_run_config("rm", **{"train.steps": 8, "train.init_from": str(path / "sft")})
        train.run(rm, path / "rm", log=QUIET)
        for i, cfg in enumerate(ppo_configs(roles_in(path))):
            train.run(cfg, path / f"solo{i}", log=QUIET)
        return 0

    return shared_by_workers(tmp_path_factory, "rl_group_roles", build)[0]


@pytest.fixture
def roles(built) -> dict:
    return roles_in(built)


@pytest.fixture
def solo(built) -> list:
    return [built / f"solo{i}" for i in range(2)]


def ppo_configs(roles: dict) -> list:
    common = {
        **roles,
        "train.steps": 4,
        "train.checkpoint_every": 2,
        "train.eval_every": 2,
        "rl.rollout_batch": 16,
        "rl.minibatch": 8,
        "rl.epochs": 2,
        "rl.num_prompts": 64,
        "rl.max_new_tokens": 8,
        "rl.kl_target": 0.5,  # the adaptive KL coefficient is per member
        "data.eval_prompts_per_domain": 4,
        "data.val_prompts_per_domain": 4,
        "data.eval_samples": 2,
    }
    return [
        tiny_run_config("ppo", **common, **{"seed": 0, "rl.kl_coef": 0.05, "optim.lr": 3e-4}),
        tiny_run_config("ppo", **common, **{"seed": 1, "rl.kl_coef": 0.1, "optim.lr": 1e-4}),
    ]


def test_online_keys_put_seeds_rates_and_roles_in_members_and_shapes_in_the_key(roles):
    a, b = ppo_configs(roles)
    assert group.group_key(a) == group.group_key(b) is not None

    for other in ({"rl.rollout_batch": 32}, {"rl.epochs": 1}, {"rl.clip": 0.1}, {"stage": "grpo"}):
        assert group.group_key(config_lib.override(a, other)) != group.group_key(a), other
    assert rl_group.group_key(config_lib.override(a, {"model.lora_rank": 4})) is None
    assert rl_group.group_key(config_lib.override(a, {"rl.offload_frozen": True})) is None


def test_ppo_members_of_a_vmapped_group_match_their_runs_alone(roles, solo, tmp_path):
    dirs = [tmp_path / f"member{i}" for i in range(2)]
    results = group.run_group(ppo_configs(roles), dirs, log=QUIET)
    assert all(r["status"] == "finished" for r in results)
    for alone, member in zip(solo, dirs, strict=True):
        assert_same_run(alone, member)


def test_a_group_killed_midway_resumes_every_member_exactly_and_the_memory_guard_splits(
    roles, solo, tmp_path
):
    dirs = [tmp_path / f"member{i}" for i in range(2)]
    cfgs = ppo_configs(roles)
    assert group.run_group(cfgs, dirs, log=QUIET, stop_after=2) == [{"stopped_at": 2}] * 2
    # The rest under a memory budget no group fits: the guard splits it, each member resumes on its own.
    lines = []
    results = group.run_group(cfgs, dirs, log=lambda m, *a, **k: lines.append(str(m)), budget=1)
    assert any("a group of 2 online runs needs" in line and "split" in line for line in lines), lines
    assert all(r["status"] == "finished" for r in results)
    for alone, member in zip(solo, dirs, strict=True):
        assert_same_run(alone, member)


def _grouped(cfgs, dirs, monkeypatch) -> "rl_group.GroupPrograms":
    made = []
    programs_cls = rl_group.GroupPrograms
    monkeypatch.setattr(rl_group, "GroupPrograms", lambda *a: made.append(programs_cls(*a)) or made[-1])
    results = group.run_group(cfgs, dirs, log=QUIET)
    assert all(r["status"] == "finished" for r in results)
    return made[0]


def _shapes(tree) -> dict:
    return {k: v.shape for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


SHORT = {
    "train.steps": 2,
    "train.checkpoint_every": 2,
    "rl.rollout_batch": 8,
    "rl.minibatch": 16,
    "rl.samples_per_prompt": 2,
    "rl.num_prompts": 32,
    "rl.max_new_tokens": 6,
    "rl.verifiable": "gold",
    "optim.lr": 1e-4,
    "data.val_prompts_per_domain": 0,
}


def test_members_started_from_one_run_share_one_reference(built, tmp_path, monkeypatch):
    """Members started from one run hold one reference (no member axis; the other members' copies freed), here
    through the policy/reference mixture sampler and the rollout statistics, and train as the same group with
    a stack of equal references does (to 1e-5; equal to the last digit when written). Against runs alone a
    Nash-MD member drifts by rounding (loss/kl 1.2e-5 apart at step 2, with or without sharing)."""
    cfgs = [
        tiny_run_config("nash_md", **SHORT, seed=s, **{"train.init_from": str(built / "sft")}) for s in (0, 1)
    ]
    g = _grouped(cfgs, [tmp_path / f"shared{i}" for i in range(2)], monkeypatch)
    assert g.shared_ref and g.runs[1].ctx.ref is g.runs[0].ctx.ref
    assert _shapes(g.ref) == _shapes(g.runs[0].ctx.ref.get())
    monkeypatch.setattr(rl_group, "shares_reference", lambda runs: False)
    g = _grouped(cfgs, [tmp_path / f"stacked{i}" for i in range(2)], monkeypatch)
    assert not g.shared_ref and g.runs[1].ctx.ref is not g.runs[0].ctx.ref
    assert _shapes(g.ref) == {k: (2, *s) for k, s in _shapes(g.runs[0].ctx.ref.get()).items()}
    for i in range(2):
        assert_same_run(tmp_path / f"stacked{i}", tmp_path / f"shared{i}")


def test_members_with_references_of_their_own_keep_a_stack(tmp_path, monkeypatch):
    """No init_from: each member's reference is its seed's random initialisation, so the group stacks them,
    and each member trains as it would alone."""
    cfgs = [tiny_run_config("grpo", **SHORT, seed=s) for s in (0, 1)]
    for i, cfg in enumerate(cfgs):
        train.run(cfg, tmp_path / f"solo{i}", log=QUIET)
    g = _grouped(cfgs, [tmp_path / f"member{i}" for i in range(2)], monkeypatch)
    assert not g.shared_ref
    assert _shapes(g.ref) == {k: (2, *s) for k, s in _shapes(g.runs[0].ctx.ref.get()).items()}
    for i in range(2):
        assert_same_run(tmp_path / f"solo{i}", tmp_path / f"member{i}")
