"""The online-RL algorithm table and program list: the table names every online stage and nothing else names
one; the loop runs exactly the listed programs (which preflight compiles), and an iteration and the world
evaluation pass under jax.transfer_guard("disallow") (no hidden host/device copy)."""

import ast
import collections
import functools
from pathlib import Path

import jax
import pytest
from test_rl import random_rm_run

from jaxrl import config as config_lib
from jaxrl import evaluate, rewards, train
from jaxrl.metrics import read_metrics
from jaxrl.rl import advantages, algorithms, context, programs, runner

PACKAGE = Path(__file__).resolve().parents[1] / "jaxrl"
# Modules that must reach an algorithm only through its table entry.
TABLE_READERS = ["rl/runner.py", "rl/context.py", "rl/programs.py", "rl/objectives.py", "preflight/*.py"]


def test_the_table_names_every_online_stage():
    assert tuple(algorithms.ALGORITHMS) == config_lib.RL_STAGES
    for name, algorithm in algorithms.ALGORITHMS.items():
        assert algorithm.name == name
        assert algorithm.estimator in advantages.ADVANTAGE_ESTIMATORS
        assert algorithm.kl in ("reward", "loss", "none")
        assert algorithm.unit in algorithms.ROWS_PER_UNIT
        assert algorithm.comparison in ("policy", "mixture")
        assert (algorithm.comparison == "mixture") <= (algorithm.unit == "pair")  # a comparison per prompt


def _string_constants(tree: ast.AST) -> set[str]:
    """String constants of a module's code, docstrings and other bare expression statements left out."""
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare
    }


def test_no_algorithm_name_outside_the_table():
    # A `stage == "online_dpo"` branch (or a {"ppo": ...} map) outside rl/algorithms.py: the table drifts.
    names = set(algorithms.ALGORITHMS)
    for pattern in TABLE_READERS:
        for path in sorted(PACKAGE.glob(pattern)):
            found = _string_constants(ast.parse(path.read_text())) & names
            assert not found, f"{path.relative_to(PACKAGE)} names online algorithms {sorted(found)}"


def test_the_scan_sees_a_stage_branch():
    code = 'def f(cfg):\n    """ppo."""\n    return cfg.stage == "online_dpo" or cfg.stage in ("grpo",)\n'
    assert _string_constants(ast.parse(code)) & set(algorithms.ALGORITHMS) == {"online_dpo", "grpo"}


def test_group_estimators_need_groups_and_online_dpo_pairs(run_config):
    from jaxrl.validate import validate

    ok = run_config("rloo", **{"rl.verifiable": "gold", "rl.samples_per_prompt": 4})
    validate(ok)
    with pytest.raises(config_lib.ConfigError, match="compares samples of one prompt"):
        validate(config_lib.override(ok, {"rl.samples_per_prompt": 1, "rl.rollout_batch": 64}))
    # Online DPO's estimator only feeds its metrics: rl.advantage does not apply to it.
    dpo = config_lib.override(ok, {"stage": "online_dpo", "rl.samples_per_prompt": 2, "rl.advantage": "rloo"})
    assert algorithms.estimator_name(dpo) == "gae" and algorithms.units(dpo) == (64, 32)
    with pytest.raises(config_lib.ConfigError, match="paired preference loss"):
        validate(config_lib.override(dpo, {"loss.name": "kto"}))
    assert algorithms.kl_placement(config_lib.override(dpo, {"rl.kl_mode": "loss"})) == "none"


def guarded(fn, calls: collections.Counter, name: str):
    """fn under jax.transfer_guard("disallow"): any implicit host<->device copy inside it raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[name] += 1
        with jax.transfer_guard("disallow"):
            return fn(*args, **kwargs)

    return wrapper


SMALL = {
    "rl.verifiable": "gold",
    "rl.num_prompts": 64,
    "rl.max_new_tokens": 8,
    "rl.rollout_batch": 16,
    "train.steps": 2,
    "train.checkpoint_every": 100,
    "data.eval_prompts_per_domain": 2,
    "data.val_prompts_per_domain": 2,
    "data.eval_samples": 2,
    "data.eval_max_new": 8,
}
GUARDED_RUNS = {
    # The reward-model ensemble path: a transformed RM score (greedy reference responses), the value model
    # from the RM, frozen models offloaded between uses, the adaptive KL coefficient, validation curves.
    "ppo": {
        "rl.reward_transform": "log_sigmoid_centered",
        "rl.value_init": "reward_model",
        "rl.offload_frozen": True,
        "rl.kl_target": 0.5,
        "rl.minibatch": 8,
        "rl.epochs": 2,
        "train.eval_every": 1,
    },
    "online_dpo": {"rl.samples_per_prompt": 2, "rl.minibatch": 16},
    # The mixture sampler (policy and reference parameters), and a constraint's Lagrangian reward.
    "nash_md": {
        "rl.samples_per_prompt": 2,
        "rl.minibatch": 16,
        "rl.constraints": '[{"verifiable": "gold", "threshold": 0.5}]',
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(GUARDED_RUNS))
def test_the_loop_runs_the_listed_programs_with_no_implicit_copy(
    stage, sft_run, run_config, tmp_path, monkeypatch
):
    overrides = SMALL | GUARDED_RUNS[stage] | {"train.init_from": str(sft_run[1])}
    if stage == "ppo":
        overrides["rl.reward_model"] = str(random_rm_run(tmp_path / "rm", run_config("rm").model, 1))
    cfg = run_config(stage, **overrides)
    calls, built = collections.Counter(), []
    monkeypatch.setattr(runner, "iterate", guarded(runner.iterate, calls, "iterate"))
    monkeypatch.setattr(evaluate, "synthetic_eval", guarded(evaluate.synthetic_eval, calls, "synthetic_eval"))
    build = context.build
    monkeypatch.setattr(context, "build", lambda *a: built.append(build(*a)) or built[-1])
    program_call = programs.Program.__call__
    monkeypatch.setattr(
        programs.Program, "__call__", lambda self, *a: calls.update([self.name]) or program_call(self, *a)
    )

    summary = train.run(cfg, tmp_path / stage, log=lambda *_: None)
    assert summary["status"] == "finished" and calls["iterate"] == 2
    assert calls["synthetic_eval"] == (4 if stage == "ppo" else 3)  # initial, (validation,) final val + test
    listed = built[0][0].programs.programs
    reward_programs = {name for name in listed if name.startswith("reward_scores")}
    # The loop calls every listed program; reward models call theirs through rewards.RewardModel.
    assert {name for name in calls if name in listed} == set(listed) - reward_programs
    assert all(listed[name].fn is rewards.score_responses for name in reward_programs)
    # ... in the run's layout, as rewards.RewardModel calls it (the preflight compiles what runs).
    ctx = built[0][0]
    assert all(listed[n].static == {"active_mesh": (ctx.mesh, ctx.preset)} for n in reward_programs)
    assert ("reference_generate" in listed) == (stage == "ppo")
    assert ("value params" in listed["train_step"].holdings) == (stage == "ppo")
    assert ("reference params" in listed["generate"].holdings) == (stage == "nash_md")
    assert calls["train_step"] == 2 * algorithms.units(cfg)[0] // algorithms.units(cfg)[1] * cfg.rl.epochs
    rows = [r for r in read_metrics(tmp_path / stage) if "objective/scores" in r]
    assert len(rows) == 2
