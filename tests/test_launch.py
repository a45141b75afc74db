"""Launchers: exact dry-run commands of the local, SLURM and TPU launchers; one job per sweep point."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import launch  # noqa: E402
from jaxrl import cli  # noqa: E402
from jaxrl import config as config_lib  # noqa: E402
from jaxrl import sweep as sweep_lib  # noqa: E402
from launch import local, slurm, tpu  # noqa: E402

CONFIG = "experiments/tiny_pipeline.py"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def _train(workdir, *sets):
    argv = ["train", "--config", CONFIG, "--workdir", str(workdir)]
    for s in sets:
        argv += ["--set", s]
    return tuple(argv)


def test_single_job(tmp_path):
    jobs = launch.jobs(CONFIG, str(tmp_path / "run"), ["train.steps=5"])
    assert jobs == [launch.Job("train", str(tmp_path / "run"), _train(tmp_path / "run", "train.steps=5"))]
    assert jobs[0].argv() == ["jaxrl", *_train(tmp_path / "run", "train.steps=5")]


def test_bad_override_fails_before_launch(tmp_path):
    with pytest.raises(config_lib.ConfigError):
        launch.jobs(CONFIG, str(tmp_path), ["train.nope=1"])


def test_sweep_one_job_per_point(tmp_path):
    study = tmp_path / "study"
    jobs = launch.jobs(CONFIG, str(study), ["train.steps=5"], sweep=True)
    cache = f"train.cache_dir={study}/cache"
    expected = []
    for name in ("dpo", "ipo", "simpo"):
        rid = f"sft,loss.name={name}"
        run_dir = study / "runs" / rid
        expected.append(
            launch.Job(rid, str(run_dir), _train(run_dir, "train.steps=5", f"loss.name={name}", cache))
        )
    assert jobs == expected
    # Each job's overrides rebuild exactly the config the in-process sweep runner would train.
    module = config_lib.load_experiment(CONFIG)
    runs = sweep_lib.expand(module, study, ["train.steps=5"])
    for job, run in zip(jobs, runs, strict=True):
        sets = [job.train_args[i + 1] for i, a in enumerate(job.train_args) if a == "--set"]
        assert config_lib.override(module.get_config(), sets) == run.cfg
        assert job.workdir == str(study / "runs" / run.id)


def test_sweep_base_runs_come_first_and_are_waited_for(tmp_path):
    experiment = tmp_path / "study.py"
    experiment.write_text(
        "from jaxrl import config\n"
        "def get_config():\n"
        "    return config.override(config.Config(stage='dpo'), {'train.steps': 3})\n"
        "def sft_config(cfg):\n"
        "    return config.override(config.Config(stage='sft'), {'train.steps': 7})\n"
        "def sweep():\n"
        "    return [{'loss.beta': 0.1}, {'loss.beta': 0.3}]\n"
    )
    study = tmp_path / "out"
    jobs = launch.jobs(str(experiment), str(study), sweep=True)
    assert len(jobs) == 3
    base = jobs[0]
    assert base.name.startswith("sft,") and base.after == ()
    sets = [base.train_args[i + 1] for i, a in enumerate(base.train_args) if a == "--set"]
    assert sets == ["stage=sft", f"train.cache_dir={study}/cache", "train.steps=7"]
    for job, beta in zip(jobs[1:], ("0.1", "0.3"), strict=True):
        assert job.after == (base.name,)
        assert job.train_args[-6:] == (
            "--set",
            f"loss.beta={beta}",
            "--set",
            f"train.cache_dir={study}/cache",
            "--set",
            f"train.init_from={study}/runs/{base.name}",
        )


def test_local_dry_run_commands(tmp_path):
    jobs = launch.jobs(CONFIG, str(tmp_path / "run"), ["train.steps=5"])
    steps = local.plan(jobs, num_processes=2, port=12345, cpu_devices=4)
    train = list(_train(tmp_path / "run", "train.steps=5"))
    env = ["env", "JAX_COORDINATOR_ADDRESS=localhost:12345", "JAX_NUM_PROCESSES=2"]
    cpu = ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4"]
    assert [s.commands() for s in steps] == [
        [
            [*env, "JAX_PROCESS_ID=0", *cpu, "jaxrl", *train],
            [*env, "JAX_PROCESS_ID=1", *cpu, "jaxrl", *train],
        ]
    ]
    lines = []
    local.launch(jobs, num_processes=2, port=12345, cpu_devices=4, dry_run=True, out=lines.append)
    assert shlex.join([*env, "JAX_PROCESS_ID=1", *cpu, "jaxrl", *train]) in lines[0]


def test_slurm_dry_run_commands_and_script(tmp_path):
    study = tmp_path / "study"
    jobs = launch.jobs(CONFIG, str(study), ["train.steps=5"], sweep=True)
    options = slurm.SlurmOptions(nodes=4, gpus_per_node=8, partition="gpu", port=29500)
    steps = slurm.plan(jobs, options)
    assert [s.commands() for s in steps] == [
        [["sbatch", "--parsable", str(Path(job.workdir) / "launch" / f"{job.name}.sbatch")]] for job in jobs
    ]
    script = slurm.render(jobs[0], options)
    assert "#SBATCH --nodes=4" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --partition=gpu" in script
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert 'export JAX_COORDINATOR_ADDRESS="${head_node}:29500"' in script
    assert 'export JAX_NUM_PROCESSES="$SLURM_NNODES"' in script
    assert f"jaxrl-task {shlex.join(jobs[0].argv())}" in script
    assert "{{" not in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)  # the rendered script parses as bash


def test_slurm_dependencies_wait_for_base_runs(tmp_path):
    jobs = [
        launch.Job("sft,abc", str(tmp_path / "a"), ("train",)),
        launch.Job("dpo,x", str(tmp_path / "b"), ("train",), after=("sft,abc",)),
    ]
    steps = slurm.plan(jobs, slurm.SlurmOptions(script_dir=str(tmp_path / "scripts")))
    assert [list(s.argv) for s in steps] == [
        ["sbatch", "--parsable", str(tmp_path / "scripts" / "sft,abc.sbatch")],
        [
            "sbatch",
            "--parsable",
            "--dependency=afterok:{job:sft,abc}",
            str(tmp_path / "scripts" / "dpo,x.sbatch"),
        ],
    ]


def _ssh(script, name="node", zone="us-east5-a"):
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        name,
        f"--zone={zone}",
        "--worker=all",
        f"--command=bash -c {shlex.quote(script)}",
    ]


def test_tpu_dry_run_commands_queued_resource(tmp_path):
    jobs = launch.jobs(CONFIG, str(tmp_path / "run"), ["train.steps=5"])
    options = tpu.TpuOptions(name="node", zone="us-east5-a", topology="v5e-64", spot=True, repo=str(REPO))
    commands = [s.commands()[0] for s in tpu.plan(jobs, options)]
    train = shlex.join(["jaxrl", *_train(tmp_path / "run", "train.steps=5")])
    install = (
        "set -e; rm -rf jaxrl; mkdir -p jaxrl jaxrl-logs; tar -xzf jaxrl-src.tgz -C jaxrl; "
        "python3 -m venv jaxrl-venv; jaxrl-venv/bin/pip install -q --upgrade pip; "
        "jaxrl-venv/bin/pip install -q -e './jaxrl[tpu]'"
    )
    run = (
        "set -o pipefail; mkdir -p $HOME/jaxrl-logs; cd $HOME/jaxrl; "
        "export PATH=$HOME/jaxrl-venv/bin:$PATH JAXRL_DISTRIBUTED=on; "
        f"({train} & echo $! > $HOME/jaxrl-logs/train.pid; wait $!) 2>&1 | tee -a $HOME/jaxrl-logs/train.log"
    )
    assert commands == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            "node",
            "--node-id=node",
            "--zone=us-east5-a",
            "--accelerator-type=v5litepod-64",
            "--runtime-version=v2-alpha-tpuv5-lite",
            "--spot",
        ],
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "describe",
            "node",
            "--zone=us-east5-a",
            "--format=value(state.state)",
        ],
        [
            "tar",
            "-czf",
            "/tmp/jaxrl-src-node.tgz",
            "--exclude=.git",
            "--exclude=.venv",
            "--exclude=runs",
            "--exclude=__pycache__",
            "--exclude=*.egg-info",
            "-C",
            str(REPO),
            ".",
        ],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "/tmp/jaxrl-src-node.tgz",
            "node:jaxrl-src.tgz",
            "--zone=us-east5-a",
            "--worker=all",
        ],
        _ssh(install),
        _ssh(run),
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            "node",
            "--zone=us-east5-a",
            "--force",
            "--quiet",
        ],
    ]
    assert tpu.plan(jobs, options)[1].kind == "poll" and tpu.plan(jobs, options)[1].until == "ACTIVE"


def test_tpu_existing_vm_sweep_and_actions(tmp_path):
    jobs = launch.jobs(CONFIG, str(tmp_path / "study"), ["train.steps=5"], sweep=True)
    options = tpu.TpuOptions(name="vm", zone="z", project="p", repo=str(REPO))
    steps = tpu.plan(jobs, options)
    assert [s.argv[:5] for s in steps[:3]] == [
        ("tar", "-czf", "/tmp/jaxrl-src-vm.tgz", "--exclude=.git", "--exclude=.venv"),
        ("gcloud", "compute", "tpus", "tpu-vm", "scp"),
        ("gcloud", "compute", "tpus", "tpu-vm", "ssh"),
    ]
    runs = steps[3:]
    assert len(runs) == 3  # one job per sweep point, no queued resource to create or delete
    for step, job in zip(runs, jobs, strict=True):
        assert list(step.argv[:8]) == [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            "vm",
            "--zone=z",
            "--project=p",
        ]
        assert (
            shlex.quote(shlex.join(job.argv())) not in step.argv[-1]
        )  # quoted once, inside the bash -c script
        assert shlex.join(job.argv()) in shlex.split(step.argv[-1].removeprefix("--command="))[2]
    stop = tpu.plan(jobs[:1], options, action="stop")
    logs = tpu.plan(jobs[:1], options, action="logs")
    name = jobs[0].name
    assert stop[0].commands() == [
        _ssh(f"kill $(cat $HOME/jaxrl-logs/{name}.pid) 2>/dev/null || true", "vm", "z")[:7]
        + ["--project=p"]
        + _ssh(f"kill $(cat $HOME/jaxrl-logs/{name}.pid) 2>/dev/null || true", "vm", "z")[7:]
    ]
    assert logs[0].argv[-1] == "--command=bash -c " + shlex.quote(
        f"tail -n 200 -f $HOME/jaxrl-logs/{name}.log"
    )
    assert tpu.plan(jobs, options, action="delete")[0].commands() == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            "vm",
            "--zone=z",
            "--project=p",
            "--force",
            "--quiet",
        ]
    ]


def test_cli_launch_dry_run_prints_and_runs_nothing(tmp_path, capsys):
    workdir = tmp_path / "study"
    code = cli.main(
        [
            "launch",
            "local",
            "--config",
            CONFIG,
            "--workdir",
            str(workdir),
            "--set",
            "train.steps=5",
            "--sweep",
            "--processes",
            "2",
            "--port",
            "23456",
            "--cpu-devices",
            "4",
            "--dry-run",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("JAX_PROCESS_ID=0") == 3 and out.count("JAX_PROCESS_ID=1") == 3
    assert f"--workdir {workdir}/runs/sft,loss.name=simpo --set train.steps=5 --set loss.name=simpo" in out
    assert not workdir.exists()

    code = cli.main(
        [
            "launch",
            "tpu",
            "--config",
            CONFIG,
            "--workdir",
            str(workdir),
            "--name",
            "n",
            "--zone",
            "z",
            "--topology",
            "v5p-128",
            "--dry-run",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5" in out
    assert "# repeated until it prints ACTIVE" in out

    code = cli.main(
        ["launch", "slurm", "--config", CONFIG, "--workdir", str(workdir), "--nodes", "2", "--dry-run"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and f"sbatch --parsable {workdir}/launch/train.sbatch" in out
    assert not workdir.exists()


def test_tpu_config_path_is_relative_to_the_shipped_checkout(tmp_path):
    job = launch.Job("train", "/w", launch.train_args(str(REPO / CONFIG), "/w"))
    assert tpu.remote_args(job, str(REPO)) == ("train", "--config", CONFIG, "--workdir", "/w")
    outside = launch.Job("train", "/w", launch.train_args(str(tmp_path / "x.py"), "/w"))
    with pytest.raises(ValueError, match="outside"):
        tpu.remote_args(outside, str(REPO))


def test_sweep_rl_jobs_wait_for_their_reward_model(tmp_path):
    study = tmp_path / "out"
    experiment = str(Path(__file__).parents[1] / "experiments" / "unpacking_synthetic.py")
    jobs = launch.jobs(experiment, str(study), sweep=True)
    names = [j.name for j in jobs]
    ppo = [j for j in jobs if j.name.startswith("ppo,")]
    assert ppo
    for job in ppo:
        rm = next(a for a in job.after if a.startswith("rm,"))
        sft = next(a for a in job.after if a.startswith("sft,"))
        assert names.index(rm) < names.index(job.name) and names.index(sft) < names.index(rm)
        sets = [job.train_args[i + 1] for i, a in enumerate(job.train_args) if a == "--set"]
        assert f"rl.reward_model={study}/runs/{rm}" in sets  # the last word on rl.reward_model is the run dir
        assert [s for s in sets if s.startswith("rl.reward_model=")][-1] == f"rl.reward_model={study}/runs/{rm}"
