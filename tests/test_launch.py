"""Launchers: exact dry-run commands of the local, SLURM and TPU launchers; one job per sweep point."""

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import launch  # noqa: E402
from jaxrl import cli  # noqa: E402
from jaxrl import config as config_lib  # noqa: E402
from jaxrl import study as study_lib  # noqa: E402
from launch import local, slurm, tpu  # noqa: E402

CONFIG = "experiments/tiny_pipeline.py"
ABS_CONFIG = str(REPO / CONFIG)  # jobs() makes --config absolute, like --workdir


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def _train(workdir, *sets, config=ABS_CONFIG):
    argv = ["train", "--config", config, "--workdir", str(workdir)]
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
    runs = study_lib.expand(module, study, ["train.steps=5"])
    for job, run in zip(jobs, runs, strict=True):
        sets = [job.args[i + 1] for i, a in enumerate(job.args) if a == "--set"]
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
    sets = [base.args[i + 1] for i, a in enumerate(base.args) if a == "--set"]
    assert sets == ["stage=sft", f"train.cache_dir={study}/cache", "train.steps=7"]
    for job, beta in zip(jobs[1:], ("0.1", "0.3"), strict=True):
        assert job.after == (base.name,)
        assert job.args[-6:] == (
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
    bundled = slurm.bundle_dir(jobs[0], options)
    assert bundled.parent == study / "runs" / jobs[0].name / "launch" and bundled.name.startswith("bundle-")
    assert f"export PYTHONPATH={bundled}" in script
    command = ["jaxrl", *jobs[0].args]
    command[command.index("--config") + 1] = str(bundled / "study" / "tiny_pipeline.py")
    assert f"jaxrl-task {shlex.join(command)}" in script
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
    options = tpu.TpuOptions(name="node", zone="us-east5-a", topology="v5e-64", spot=True)
    commands = [s.commands()[0] for s in tpu.plan(jobs, options)]
    tarball = "/tmp/jaxrl-bundle-node.tgz"
    bundle = [sys.executable, "-m", "launch.bundle", "--config", ABS_CONFIG, "--out", tarball]
    train = shlex.join(["jaxrl", *_train(tmp_path / "run", "train.steps=5", config="study/tiny_pipeline.py")])
    install = (
        "set -e; rm -rf jaxrl; mkdir -p jaxrl jaxrl-logs; tar -xzf jaxrl-bundle.tgz -C jaxrl; "
        "python3 -m venv jaxrl-venv; jaxrl-venv/bin/pip install -q --upgrade pip; "
        "jaxrl-venv/bin/pip install -q './jaxrl[tpu]'"
    )
    run = (
        "set -o pipefail; mkdir -p $HOME/jaxrl-logs; cd $HOME/jaxrl; "
        "export PATH=$HOME/jaxrl-venv/bin:$PATH JAXRL_DISTRIBUTED=on; "
        f"({train} & echo $! > $HOME/jaxrl-logs/train.pid; wait $!) 2>&1 | tee -a $HOME/jaxrl-logs/train.log"
    )
    assert commands == [
        bundle,
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
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "/tmp/jaxrl-bundle-node.tgz",
            "node:jaxrl-bundle.tgz",
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
    assert tpu.plan(jobs, options)[2].kind == "poll" and tpu.plan(jobs, options)[2].until == "ACTIVE"


def test_tpu_existing_vm_sweep_and_actions(tmp_path):
    jobs = launch.jobs(CONFIG, str(tmp_path / "study"), ["train.steps=5"], sweep=True)
    options = tpu.TpuOptions(name="vm", zone="z", project="p")
    steps = tpu.plan(jobs, options)
    assert [s.argv[:5] for s in steps[:3]] == [
        (sys.executable, "-m", "launch.bundle", "--config", ABS_CONFIG),
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
        remote = ["jaxrl", *tpu.remote_args(job)]
        assert remote[remote.index("--config") + 1] == "study/tiny_pipeline.py"
        assert shlex.quote(shlex.join(remote)) not in step.argv[-1]  # quoted once, inside the bash -c script
        assert shlex.join(remote) in shlex.split(step.argv[-1].removeprefix("--command="))[2]
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


def test_tpu_config_points_at_the_bundled_study(tmp_path):
    job = launch.Job("train", "/w", launch.train_args(str(tmp_path / "anywhere" / "x.py"), "/w"))
    assert tpu.remote_args(job) == ("train", "--config", "study/x.py", "--workdir", "/w")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.py").write_text("")
    (tmp_path / "b" / "x.py").write_text("")
    two = [launch.Job(d, "/w", launch.train_args(str(tmp_path / d / "x.py"), "/w")) for d in "ab"]
    with pytest.raises(launch.LaunchError, match="--config.*both ship as study/x.py"):
        tpu.plan(two, tpu.TpuOptions(name="n", zone="z"))
    missing = [launch.Job("m", "/w", launch.train_args(str(tmp_path / "nope.py"), "/w"))]
    with pytest.raises(launch.LaunchError, match="--config .*nope.py: no such file"):
        tpu.plan(missing, tpu.TpuOptions(name="n", zone="z"))


def test_sweep_rl_jobs_wait_for_their_reward_model(tmp_path):
    study = tmp_path / "out"
    experiment = str(Path(__file__).parents[1] / "experiments" / "unpacking_synthetic.py")
    jobs = launch.jobs(experiment, str(study), sweep=True)
    names = [j.name for j in jobs]
    ppo = [j for j in jobs if j.name.startswith("ppo,") and "rl.reward_model=" in j.name]
    assert ppo
    for job in ppo:
        rm = next(a for a in job.after if a.startswith("rm,"))
        sft = next(a for a in job.after if a.startswith("sft,"))
        assert names.index(rm) < names.index(job.name) and names.index(sft) < names.index(rm)
        sets = [job.args[i + 1] for i, a in enumerate(job.args) if a == "--set"]
        assert f"rl.reward_model={study}/runs/{rm}" in sets  # the last word on rl.reward_model is the run dir
        last = [s for s in sets if s.startswith("rl.reward_model=")][-1]
        assert last == f"rl.reward_model={study}/runs/{rm}"


STUDY = """from jaxrl.config import Config, TrainConfig


def get_config():
    return Config(stage="sft", train=TrainConfig(steps=3))
"""


def _simulated_install(tmp_path):
    """The installed jaxrl and launch packages copied to a bare site dir (no pyproject.toml or .git above it,
    a marker appended to jaxrl/__init__.py), the user's study in ~/, a cwd elsewhere: what a regular
    non-editable install looks like to the launcher. Returns (site, study, elsewhere, env)."""
    import jaxrl

    site = tmp_path / "site-packages"
    for package in (jaxrl, launch):
        source = Path(package.__file__).parent
        shutil.copytree(source, site / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    with open(site / "jaxrl" / "__init__.py", "a") as f:
        f.write("# simulated install\n")
    assert not any((p / "pyproject.toml").exists() or (p / ".git").exists() for p in site.parents)
    study = tmp_path / "home" / "user" / "my_study.py"
    study.parent.mkdir(parents=True)
    study.write_text(STUDY)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    where = subprocess.run(
        [sys.executable, "-c", "import jaxrl, launch; print(jaxrl.__file__); print(launch.__file__)"],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert where == [str(site / "jaxrl" / "__init__.py"), str(site / "launch" / "__init__.py")]
    return site, study, elsewhere, env


def _cli(env, cwd, *argv):
    result = subprocess.run(
        [sys.executable, "-m", "jaxrl.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tpu_bundle_from_an_installed_jaxrl(tmp_path):
    site, study, elsewhere, env = _simulated_install(tmp_path)
    name = f"t{uuid.uuid4().hex[:10]}"
    out = _cli(
        env,
        elsewhere,
        "launch",
        "tpu",
        "--config",
        str(study),
        "--workdir",
        "/mnt/w",
        "--name",
        name,
        "--zone",
        "z",
        "--dry-run",
    )
    lines = out.splitlines()
    tarball = Path(f"/tmp/jaxrl-bundle-{name}.tgz")
    pack = [sys.executable, "-m", "launch.bundle", "--config", str(study), "--out", str(tarball)]
    assert lines[1] == shlex.join(pack)  # the first command: the bundle is built before anything remote
    run = next(line for line in lines if "jaxrl train" in line)
    script = shlex.split(shlex.split(run)[-1].removeprefix("--command="))[2]
    assert "cd $HOME/jaxrl;" in script  # where the bundle is unpacked (and pip-installed from)
    assert "(jaxrl train --config study/my_study.py --workdir /mnt/w &" in script
    assert not tarball.exists()  # a dry run builds nothing

    try:  # the printed command, run as printed, from elsewhere
        subprocess.run(pack, cwd=elsewhere, env=env, check=True, capture_output=True)
        with tarfile.open(tarball) as tar:
            names = set(tar.getnames())
            files = {n: tar.extractfile(n).read() for n in names if tar.getmember(n).isfile()}
    finally:
        tarball.unlink(missing_ok=True)
    assert {"pyproject.toml", "jaxrl/__init__.py", "jaxrl/cli.py", "jaxrl/models/transformer.py"} <= names
    assert {"launch/__init__.py", "launch/bundle.py", "launch/templates/slurm.sbatch"} <= names
    assert "study/my_study.py" in names and files["study/my_study.py"] == study.read_bytes()
    assert files["jaxrl/__init__.py"].endswith(b"# simulated install\n")  # from the install, not a checkout
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    project = tomllib.loads(files["pyproject.toml"].decode())["project"]
    assert project["name"] == "jaxrl" and "jax>=0.10.2" in project["dependencies"]
    assert project["optional-dependencies"]["tpu"] == ["jax[tpu]>=0.10.2"]
    assert project["scripts"] == {"jaxrl": "jaxrl.cli:main"}


def test_local_launch_from_an_installed_jaxrl(tmp_path):
    site, study, elsewhere, env = _simulated_install(tmp_path)
    out = _cli(
        env,
        study.parent,
        "launch",
        "local",
        "--config",
        "my_study.py",
        "--workdir",
        "w",
        "--processes",
        "2",
        "--port",
        "23456",
        "--cpu-devices",
        "1",
        "--dry-run",
    )
    train = [
        sys.executable,
        "-m",
        "jaxrl.cli",
        "train",
        "--config",
        str(study),
        "--workdir",
        str(study.parent / "w"),
    ]
    env_vars = ["env", "JAX_COORDINATOR_ADDRESS=localhost:23456", "JAX_NUM_PROCESSES=2"]
    cpu = ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=1"]
    assert out.splitlines() == [
        "# job train",
        "# 2 processes at once",
        shlex.join([*env_vars, "JAX_PROCESS_ID=0", *cpu, *train]),
        shlex.join([*env_vars, "JAX_PROCESS_ID=1", *cpu, *train]),
    ]
    # The printed program and study path work from any directory (validate instead of a training run).
    argv = shlex.split(out.splitlines()[2])
    check = [*argv[: argv.index("train")], "validate", "--config", str(study)]
    subprocess.run(check, cwd=elsewhere, env=env, check=True, capture_output=True)


def test_slurm_refuses_flags_that_would_add_script_lines(tmp_path, capsys):
    jobs = launch.jobs(CONFIG, str(tmp_path / "w"))
    bad = "gpu\n#SBATCH --wrap=rm -rf /"
    with pytest.raises(launch.LaunchError, match="^--partition ") as e:
        slurm.launch(jobs, slurm.SlurmOptions(partition=bad), dry_run=True, out=lambda _: None)
    assert "\n" not in str(e.value)
    for options, flag in (
        (slurm.SlurmOptions(account="a\rb"), "--account"),
        (slurm.SlurmOptions(partition="gpu --wrap=x"), "--partition"),
        (slurm.SlurmOptions(time="1:00:00\n#SBATCH --x"), "--time"),
        (slurm.SlurmOptions(time="soon"), "--time"),
        (slurm.SlurmOptions(setup="module load cuda\x1b"), "--setup"),
        (slurm.SlurmOptions(script_dir=str(tmp_path / "a\nb")), "--script-dir"),
    ):
        with pytest.raises(launch.LaunchError, match=f"^{flag} "):
            slurm.render(jobs[0], options)
    newline_workdir = launch.jobs(CONFIG, str(tmp_path / "w\n#SBATCH --x"))
    with pytest.raises(launch.LaunchError, match="^--workdir "):
        slurm.render(newline_workdir[0], slurm.SlurmOptions())
    newline_set = launch.jobs(CONFIG, str(tmp_path / "w"), ["name=a\nb"])
    with pytest.raises(launch.LaunchError, match="^--set "):
        slurm.render(newline_set[0], slurm.SlurmOptions())
    assert "module load cuda\nsource venv/bin/activate" in slurm.render(
        jobs[0], slurm.SlurmOptions(setup="module load cuda\nsource venv/bin/activate")
    )  # --setup is shell lines by design

    code = cli.main(
        [
            "launch",
            "slurm",
            "--config",
            CONFIG,
            "--workdir",
            str(tmp_path / "w"),
            "--partition",
            bad,
            "--dry-run",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--partition" in err
    assert not (tmp_path / "w").exists()


def test_slurm_set_value_arrives_intact_and_the_code_is_shipped(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.args"
    for name, body in (
        ("sbatch", "echo 4242"),
        ("scontrol", "echo node1"),
        ("srun", f'printf "%s\\0" "$PYTHONPATH" "$@" > {shlex.quote(str(record))}'),
    ):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    value = 'name=it\'s a "test" $(touch pwned) `touch pwned2`; touch pwned3 # \\ $HOME'
    jobs = launch.jobs(CONFIG, str(tmp_path / "w"), [value])
    options = slurm.SlurmOptions(partition="gpu")
    lines = []
    slurm.launch(jobs, options, out=lines.append)
    assert lines[-1] == "submitted train: SLURM job 4242"

    bundled = slurm.bundle_dir(jobs[0], options)
    assert (bundled / "jaxrl" / "cli.py").is_file() and (bundled / "launch" / "bundle.py").is_file()
    assert (bundled / "study" / "tiny_pipeline.py").read_text() == (REPO / CONFIG).read_text()
    expected = [
        "jaxrl",
        "train",
        "--config",
        str(bundled / "study" / "tiny_pipeline.py"),
        "--workdir",
        str(tmp_path / "w"),
        "--set",
        value,
    ]
    text = slurm.script_path(jobs[0], options).read_text()
    words = shlex.split(text[text.index("\nsrun ") :].replace("\\\n", " "))
    assert words[words.index("jaxrl-task") + 1 :] == expected  # one quoted word per argument

    # bash runs the script as written: srun receives the value intact, nothing in it is executed
    slurm_env = {**os.environ, "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1"}
    script = slurm.script_path(jobs[0], options)
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=slurm_env, check=True)
    pythonpath, *args = [a.decode() for a in record.read_bytes().split(b"\0")[:-1]]
    assert pythonpath.split(":")[0] == str(bundled)
    assert args[args.index("jaxrl-task") + 1 :] == expected
    assert not list(tmp_path.glob("pwned*"))
