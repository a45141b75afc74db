"""The sweep layer: expansion, shared bases, idempotence, resume after a kill, results table; every sweep
point of the shipped studies validates and builds an abstract train state."""

import json
import textwrap

import jax
import pytest

from jaxrl import config as config_lib
from jaxrl import group as group_lib
from jaxrl import results as results_lib
from jaxrl import steps, sweep, train
from jaxrl import study as study_lib
from jaxrl.models import init as model_init

TINY_STUDY = textwrap.dedent("""
    from jaxrl.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, override

    def get_config():
        return Config(stage="dpo",
                      model=ModelConfig(vocab_size=256, hidden=32, layers=1, heads=2, kv_heads=1, mlp=64,
                                        dtype="float32"),
                      optim=OptimConfig(lr=1e-3),
                      data=DataConfig(num_train=64, num_eval=16, eval_prompts_per_domain=2, eval_max_new=4),
                      train=TrainConfig(steps=3, batch_size=8, log_every=1, checkpoint_every=2,
                                        tensorboard=False, progress=False))

    def sft_config(cfg):
        sft = {"stage": "sft", "loss.name": "dpo", "data.synthetic_kind": "clean", "train.steps": 4}
        return override(cfg, sft)

    def sweep():
        return [{"loss.name": n, "seed": s} for n in ("dpo", "ipo") for s in (0, 1)]

    def metrics():
        return ["eval/rewards/accuracies", "eval/gold_reward", "eval/kl"]
""")


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "tiny_study.py"
    path.write_text(TINY_STUDY)
    return config_lib.load_experiment(path)


def test_expand_ids_from_overrides_and_shared_bases(study, tmp_path):
    runs = study_lib.expand(study, tmp_path / "w")
    points = [r for r in runs if r.kind == "point"]
    bases = [r for r in runs if r.kind == "base"]
    assert [r.id for r in points] == [
        "dpo,loss.name=dpo,seed=0",
        "dpo,loss.name=dpo,seed=1",
        "dpo,loss.name=ipo,seed=0",
        "dpo,loss.name=ipo,seed=1",
    ]
    assert len(bases) == 2  # one SFT base per seed, shared by both losses
    assert runs.index(bases[0]) < runs.index(points[0])  # bases run first
    for r in points:
        base = next(b for b in bases if b.cfg.seed == r.cfg.seed)
        assert r.cfg.train.init_from == str(tmp_path.absolute() / "w" / "runs" / base.id)
        assert r.cfg.train.cache_dir == str(tmp_path.absolute() / "w" / "cache")
    # Ids depend only on the overrides: expanding again gives the same ids.
    assert [r.id for r in study_lib.expand(study, tmp_path / "w")] == [r.id for r in runs]


def test_equal_points_collapse_and_colliding_ids_are_an_error(study, tmp_path):
    study.sweep = lambda: [{"loss.name": "dpo"}, {"loss__name": "dpo"}]
    assert (
        len([r for r in study_lib.expand(study, tmp_path) if r.kind == "point"]) == 1
    )  # same config: one run
    study.sweep = lambda: [{"name": "a/b"}, {"name": "a_b"}]  # both slug to name=a_b
    with pytest.raises(config_lib.ConfigError, match="run id"):
        study_lib.expand(study, tmp_path)


@pytest.mark.slow
def test_sweep_is_idempotent_and_resumes_after_a_kill(study, tmp_path, monkeypatch):
    """One run at a time (`--group off`; grouped sweeps resume in tests/test_groups.py)."""
    workdir = tmp_path / "w"
    real_run, calls = train.run, []

    def killed_after_two(cfg, wd, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the sweep is killed while starting its third run
        calls.append(str(wd))
        return real_run(cfg, wd, **kw)

    monkeypatch.setattr(train, "run", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(study, workdir, log=lambda *a: None, group="off")
    finished_first = sorted(calls)
    assert len(finished_first) == 2

    calls.clear()
    monkeypatch.setattr(
        train, "run", lambda cfg, wd, **kw: (calls.append(str(wd)), real_run(cfg, wd, **kw))[1]
    )
    rows = sweep.run_sweep(study, workdir, log=lambda *a: None, group="off")
    assert len(calls) == 6 - 2 and not set(calls) & set(finished_first)  # only what was missing
    assert len(rows) == 6

    calls.clear()
    rows_again = sweep.run_sweep(study, workdir, log=lambda *a: None, group="off")
    assert calls == [] and rows_again == rows  # everything already finished
    grouped = []
    monkeypatch.setattr(group_lib, "run_group", lambda cfgs, *a, **kw: grouped.append(cfgs))
    rows_grouped = sweep.run_sweep(study, workdir, log=lambda *a: None, group="auto")
    assert calls == grouped == [] and rows_grouped == rows  # nor when the runs could group

    md, csv_path, markdown = results_lib.write_results(rows, study.metrics(), workdir)
    assert "eval/rewards/accuracies" in markdown and md.exists() and csv_path.exists()
    dpo_line = next(line for line in markdown.splitlines() if "| dpo | dpo |" in line)
    assert "±" in dpo_line and "| 2 |" in dpo_line  # two seeds aggregated with a spread
    assert [p.name for p in results_lib.write_plots(rows, workdir)] == [
        "gold_reward_by_domain.png",
        "gold_reward_vs_kl.png",
    ]
    for row in rows:
        assert json.loads((workdir / "runs" / row["run"] / "config.json").read_text())["seed"] in (0, 1)


RL_STUDY = TINY_STUDY.replace(
    "def sweep():",
    textwrap.dedent("""\
    def stage_defaults(stage):
        if stage == "ppo":
            return {"rl.rollout_batch": 8, "rl.minibatch": 8, "rl.max_new_tokens": 4, "rl.num_prompts": 32,
                    "train.steps": 2, "data.max_len": 16, "data.max_prompt_len": 12}
        return {}

    def reward_model(point):
        name = point.get("rl.reward_model")
        return {"stage": "rm", "data.synthetic_kind": name, "seed": point.get("seed", 0)} if name else None

    def sweep():
        return [{"stage": "ppo", "rl.reward_model": d, "rl.prompt_set": p}
                for d in ("clean", "noisy") for p in ("in_domain", "mixed")] + [
               {"stage": "rm", "data.synthetic_kind": "clean", "seed": 0}]

    def unused_sweep():"""),
)


@pytest.fixture
def rl_study(tmp_path):
    path = tmp_path / "rl_study.py"
    path.write_text(RL_STUDY)
    return config_lib.load_experiment(path)


def test_reward_models_are_shared_dependencies_of_the_rl_points(rl_study, tmp_path):
    workdir = tmp_path.absolute() / "w"
    runs = study_lib.expand(rl_study, workdir)
    ids = [r.id for r in runs]
    rms = [r for r in runs if r.cfg.stage == "rm"]
    ppo = [r for r in runs if r.cfg.stage == "ppo"]
    (sft,) = [r for r in runs if r.kind == "base"]
    # One reward model per dataset, the listed rm point and clean's dependency being one run.
    assert sorted(r.id for r in rms) == [
        "rm,data.synthetic_kind=clean,seed=0,stage=rm",
        "rm,data.synthetic_kind=noisy,seed=0,stage=rm",
    ]
    assert len(ppo) == 4
    for r in ppo:
        data = r.point["rl.reward_model"]
        rm = next(x for x in rms if x.cfg.data.synthetic_kind == data)
        assert r.cfg.rl.reward_model == str(workdir / "runs" / rm.id)  # the symbolic name became the run dir
        assert (
            r.deps == (sft.id, rm.id)
            and ids.index(rm.id) < ids.index(r.id)
            and ids.index(sft.id) < ids.index(rm.id)
        )
        assert r.cfg.rl.rollout_batch == 8 and r.cfg.train.steps == 2  # stage defaults apply ...
        assert "rollout_batch" not in r.id and "train.steps" not in r.id  # ... without entering the id
    assert all(r.cfg.train.steps == 3 for r in rms)  # rm has no stage defaults here
    rl_study.reward_model = lambda point: {"stage": "dpo"}
    with pytest.raises(config_lib.ConfigError, match="not an rm run"):
        study_lib.expand(rl_study, workdir)


def test_reward_model_sources_keep_a_path_with_commas_whole(tmp_path):
    run_dir = tmp_path / "rm,data=clean,seed=0"
    assert config_lib.reward_model_sources(f"{tmp_path}/a, {tmp_path}/b") == [
        f"{tmp_path}/a",
        f"{tmp_path}/b",
    ]
    assert config_lib.reward_model_sources(str(run_dir)) == [str(tmp_path / "rm"), "data=clean", "seed=0"]
    run_dir.mkdir()
    assert config_lib.reward_model_sources(str(run_dir)) == [str(run_dir)]
    assert config_lib.reward_model_sources(" ") == []


@pytest.mark.slow
def test_sweep_trains_the_reward_model_before_the_ppo_points_that_use_it(rl_study, tmp_path):
    rl_study.sweep = lambda: [{"stage": "ppo", "rl.reward_model": "clean", "rl.prompt_set": "mixed"}]
    workdir = tmp_path / "w"
    rows = sweep.run_sweep(rl_study, workdir, log=lambda *a: None)
    assert [r["stage"] for r in rows] == ["sft", "rm", "ppo"]
    (ppo,) = [r for r in rows if r["stage"] == "ppo"]
    assert "eval/gold_reward" in ppo
    # The reward model (a run dir with commas in its name) was loaded as one model, and is the value model's
    # init.
    lineage = json.loads((workdir / "runs" / ppo["run"] / "lineage.json").read_text())
    rm_dir = str(workdir.absolute() / "runs" / "rm,data.synthetic_kind=clean,seed=0,stage=rm")
    assert lineage["reward_model0"]["path"] == rm_dir and lineage["value_init"]["path"] == rm_dir
    assert lineage["reward_model0"]["config_hash"] is not None and "reward_model1" not in lineage


def test_aggregate_mean_and_spread():
    rows = [{"stage": "dpo", "loss.name": "dpo", "seed": s, "eval/x": v} for s, v in ((0, 1.0), (1, 3.0))]
    (agg,) = results_lib.aggregate(rows, ["eval/x"], ["stage", "loss.name"])
    assert agg["eval/x"] == 2.0 and agg["eval/x std"] == pytest.approx(2**0.5) and agg["seeds"] == 2


def _abstract_state(cfg):
    model_cfg = model_init.stage_model_config(cfg)
    _, abstract = model_init.abstract_model(model_cfg)
    tx, _ = steps.make_optimizer(cfg.optim, cfg.train.steps)
    return jax.eval_shape(lambda: steps.new_train_state(abstract, tx, cfg.seed, None))


@pytest.mark.parametrize(
    "study_file",
    ["experiments/unpacking_synthetic.py", "experiments/tulu25.py", "experiments/tiny_pipeline.py"],
)
def test_every_sweep_point_validates_and_builds_an_abstract_state(study_file, tmp_path):
    import inspect

    module = config_lib.load_experiment(study_file)
    if "full" in inspect.signature(module.sweep).parameters:
        original = module.sweep
        module.sweep = lambda: original(full=True)
    runs = study_lib.expand(module, tmp_path)  # validates every run, shared bases and reward models included
    assert any(r.kind == "point" for r in runs)
    shapes, built = set(), set()
    for run in runs:
        key = (run.cfg.stage == "rm", run.cfg.model)
        if key in built:
            continue
        built.add(key)
        state = _abstract_state(run.cfg)
        leaves = jax.tree.leaves(state.params)
        assert leaves and all(hasattr(x, "shape") for x in leaves)
        shapes.add(sum(x.size for x in leaves))
    if study_file.endswith("tulu25.py"):
        assert any(12e9 < n < 14e9 for n in shapes)  # Llama 2 13B


def test_shared_bases_are_told_apart_in_the_table(study, tmp_path):
    study.sweep = lambda: [
        {"loss.name": "dpo", "seed": s, "model.hidden": h} for s in (0, 1) for h in (32, 48)
    ]
    runs = study_lib.expand(study, tmp_path)
    bases = [r for r in runs if r.kind == "base"]
    assert len(bases) == 4
    labels = results_lib.base_labels(runs)
    assert sorted(labels[b.id]["model.hidden"] for b in bases) == [32, 32, 48, 48]
    assert all(set(labels[b.id]) == {"model.hidden"} for b in bases)  # the seed is a column of its own


def test_a_study_variant_is_chosen_in_one_place():
    import types

    study = types.ModuleType("study")
    study.sweep = lambda full=False: [{"seed": s} for s in (range(4) if full else range(1))]
    study.metrics = lambda: ["eval/loss"]
    assert study_lib.has_full(study) and study_lib.variant(study, full=False) is study
    full = study_lib.variant(study, full=True)
    assert full.sweep() == [{"seed": s} for s in range(4)] and full.metrics() == ["eval/loss"]
    assert study.sweep() == [{"seed": 0}]  # the study module itself is left as it was
    plain = types.ModuleType("plain")
    plain.sweep = lambda: [{}]
    assert not study_lib.has_full(plain)
    with pytest.raises(config_lib.ConfigError, match="no `full` argument"):
        study_lib.variant(plain, full=True, label="plain.py")
