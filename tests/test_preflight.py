"""Preflight: TPU slice names, an ahead-of-time compile for a small TPU topology (libtpu), the fake-CPU
fallback, the memory report, the cost (FLOPs, bytes, roofline estimate) and the "does not fit" failure."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl import cli, preflight
from jaxrl.preflight import GIB, Holding, PreflightReport, ProgramReport
from jaxrl.preflight.cost import program_cost
from jaxrl.preflight.report import compile_program


def _libtpu_reason() -> str | None:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return "libtpu is not installed (pip install 'jaxrl[tpu]'); the TPU compile is skipped"
    try:
        preflight.tpu_devices(preflight.parse_topology("v5e-8"))
    except Exception as e:  # noqa: BLE001 - report why libtpu cannot describe topologies here
        return f"libtpu is installed but cannot describe a v5e-8 topology on this machine: {e}"
    return None


LIBTPU_MISSING = _libtpu_reason()
needs_libtpu = pytest.mark.skipif(LIBTPU_MISSING is not None, reason=LIBTPU_MISSING or "")


@pytest.mark.parametrize(
    "name, canonical, chips, shape, accelerator, libtpu_name, hbm",
    [
        ("v5p-128", "v5p-128", 64, (4, 4, 4), "v5p-128", "v5:4x4x4", 95),
        ("v5p-256", "v5p-256", 128, (4, 4, 8), "v5p-256", "v5:4x4x8", 95),
        ("v5e-64", "v5e-64", 64, (8, 8), "v5litepod-64", "v5e:8x8", 16),
        ("v5litepod-16", "v5e-16", 16, (4, 4), "v5litepod-16", "v5e:4x4", 16),
        ("v4-8", "v4-8", 4, (2, 2, 1), "v4-8", "v4:2x2x1", 32),
        ("v4-32", "v4-32", 16, (2, 2, 4), "v4-32", "v4:2x2x4", 32),
        ("v6e-256", "v6e-256", 256, (16, 16), "v6e-256", "v6e:16x16", 32),
        ("v5p:4x4x12", "v5p-384", 192, (4, 4, 12), "v5p-384", "v5:4x4x12", 95),
    ],
)
def test_topology_names(name, canonical, chips, shape, accelerator, libtpu_name, hbm):
    t = preflight.parse_topology(name)
    assert (t.name, t.chips, t.shape, t.accelerator_type, t.libtpu_name) == (
        canonical,
        chips,
        shape,
        accelerator,
        libtpu_name,
    )
    assert t.hbm_bytes == hbm * GIB


@pytest.mark.parametrize("name", ["v5p-7", "v9-8", "v5p", "v5e-48", "v4:2x2"])
def test_bad_topologies(name):
    with pytest.raises(preflight.PreflightError):
        preflight.parse_topology(name)


def _program(name, holdings, **sizes):
    values = dict(arguments=0, outputs=0, aliased=0, temporaries=0, code=0) | sizes
    return ProgramReport(name=name, holdings=holdings, compile_s=1.0, **values)


def test_peak_counts_resident_arrays_outside_each_program():
    topo = preflight.parse_topology("v5p-8")
    train = _program(
        "train_step",
        ("policy params", "policy optimizer state"),
        arguments=10,
        outputs=10,
        aliased=9,
        temporaries=5,
        code=1,
    )
    forward = _program("reference", ("reference params",), arguments=4, outputs=1, temporaries=7, code=2)
    report = PreflightReport(
        "cfg",
        "ppo",
        topo,
        "tpu",
        "",
        {"data": 1, "fsdp": 4, "tensor": 1},
        "fsdp",
        40,
        [train, forward],
        [Holding("policy params", 3), Holding("policy optimizer state", 6), Holding("reference params", 4)],
        [],
    )
    assert train.own == 10 + 10 - 9 + 5 + 1
    assert report.peak_of(train) == train.own + 4 + 2  # + the reference params + the other program's code
    assert report.peak_of(forward) == forward.own + 9 + 1  # + the policy's params and moments + train code
    assert report.peak == max(report.peak_of(train), report.peak_of(forward)) and report.fits
    offloaded = PreflightReport(
        **{
            **report.__dict__,
            "holdings": [
                Holding("policy params", 3),
                Holding("policy optimizer state", 6),
                Holding("reference params", 4, offloaded=True),
            ],
        }
    )
    assert offloaded.peak_of(train) == train.own + 2


@needs_libtpu
def test_tpu_compile_of_a_tiny_dpo_config(run_config):
    cfg = run_config("dpo", **{"mesh.data": 1, "mesh.fsdp": -1})
    report = preflight.run(cfg, "v5e-8", backend="tpu", log=lambda *_: None)
    assert report.backend == "tpu" and report.topology.chips == 8
    assert report.mesh_shape == {"data": 1, "fsdp": 8, "tensor": 1}
    assert [p.name for p in report.programs] == ["train_step", "reference_logps"]
    train = report.programs[0]
    assert train.arguments > 0 and train.code > 0 and train.aliased > 0  # the state is donated
    assert {h.name for h in report.holdings} == {"train params", "train optimizer state", "reference params"}
    assert report.fits and 0 < report.peak < 1 * GIB
    text = report.format()
    assert "TPU compile (libtpu)" in text and "v5e:2x4" in text and "fits" in text
    _assert_cost_fields(report, cfg)
    if (
        "splash" in report.attention
    ):  # a Mosaic kernel: its work is not in the analysis, and the report says so
        assert "Pallas kernel" in train.cost_note and f"cost: train_step: {train.cost_note}" in text


@needs_libtpu
def test_offloaded_layer_inputs_are_host_memory_in_a_tpu_compile(run_config):
    """model.remat=offload on a TPU compile: the train step's saved layer inputs are pinned host memory (the
    compiler's host temporaries, reported as such), not HBM temporaries; "full" keeps them on the chip."""
    reports = {}
    for remat in ("full", "offload"):
        cfg = run_config("dpo", **{"mesh.data": 1, "mesh.fsdp": -1, "model.remat": remat})
        reports[remat] = preflight.run(cfg, "v5e-8", backend="tpu", log=lambda *_: None)
    full, offload = (reports[r].programs[0] for r in ("full", "offload"))
    assert full.name == offload.name == "train_step"
    assert full.host_temporaries == 0 and offload.host_temporaries > 0
    assert "host memory: train_step" in reports["offload"].format()
    assert "host memory: " not in reports["full"].format()


def _assert_cost_fields(report, cfg):
    """Every program has a known cost and estimate; the train step's loops are the accumulation loop and the
    scanned layers inside it, so its cost is per optimizer step; the table and the JSON carry them."""
    for p in report.programs:
        assert p.flops > 0 and p.bytes_accessed > 0 and p.estimate_s(report.topology.chip) > 0, p
    train = report.programs[0]
    accum, layers = cfg.train.grad_accum, cfg.model.layers
    if accum > 1:
        assert str(accum) in train.loops and f"{accum}x{layers}" in train.loops, train.loops
    else:
        assert str(layers) in train.loops, train.loops
    # At least the policy's matmuls over the whole batch, forward and backward (2 + 4 FLOPs per parameter
    # and token), spread over the chips.
    tokens = cfg.train.batch_size * (1 if cfg.stage == "sft" else 2) * cfg.data.max_len
    body = cfg.model.layers * 3 * cfg.model.hidden * cfg.model.mlp
    assert train.flops > 6 * body * tokens / report.topology.devices
    text = report.format()
    assert (
        "est_ms" in text
        and "GFLOP" in text
        and "estimate (roofline from the compiler's cost analysis" in text
    )
    row = report.to_dict()["programs"][0]
    assert row["flops"] == train.flops and row["estimate_s"] == train.estimate_s(report.topology.chip)
    assert row["measured_s"] is None


def _matmul_args(m, k, n, *, layers=0):
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    a = jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=NamedSharding(mesh, P("x", None)))
    w_shape = (layers, k, n) if layers else (k, n)
    w = jax.ShapeDtypeStruct(w_shape, jnp.float32, sharding=NamedSharding(mesh, P()))
    return a, w


def test_cost_of_a_known_matmul_is_per_device_and_its_estimate_is_the_roofline():
    m, k, n = 256, 128, 64
    report = compile_program(
        "matmul", jax.jit(lambda a, w: a @ w), _matmul_args(m, k, n), (), lambda *_: None
    )
    assert report.flops == 2 * m * n * k / 8  # rows sharded over the 8 devices: per device
    # a, w and the output once each at least (per device: an eighth of a and of the output, all of w)
    assert report.bytes_accessed >= 4 * (m * k / 8 + k * n + m * n / 8)
    v5e = preflight.CHIPS["v5e"]
    assert (v5e.peak_bf16_tflops, v5e.hbm_gbps) == (197, 819)
    expected = max(report.flops / 197e12, report.bytes_accessed / 819e9)
    assert report.estimate_s(v5e) == pytest.approx(expected, rel=1e-12)
    assert report.loops == () and report.cost_note == ""


def test_cost_counts_every_iteration_of_scanned_and_nested_loops():
    """XLA's cost analysis counts a while body once; the preflight cost multiplies it by the trip count."""
    m, k, n = 256, 128, 128

    def scanned(a, w):
        return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), a, w)[0]

    def nested(a, w):
        inner = lambda x, wo: (jax.lax.scan(lambda y, wi: (jnp.tanh(y @ wi), None), x, wo)[0], None)
        return jax.lax.scan(inner, a, w.reshape(2, 3, k, n))[0]

    per_matmul = 2 * m * n * k / 8
    one = jax.jit(scanned).lower(*_matmul_args(m, k, n, layers=1)).compile()
    assert one.cost_analysis()["flops"] == pytest.approx(per_matmul, rel=0.01)
    six = jax.jit(scanned).lower(*_matmul_args(m, k, n, layers=6)).compile()
    assert six.cost_analysis()["flops"] == pytest.approx(per_matmul, rel=0.01)  # the compiler's: once
    cost = program_cost(six)
    assert cost.flops == pytest.approx(6 * per_matmul, rel=0.01) and cost.loops == ("6",)
    cost = program_cost(jax.jit(nested).lower(*_matmul_args(m, k, n, layers=6)).compile())
    assert cost.flops == pytest.approx(6 * per_matmul, rel=0.01) and cost.loops == ("2", "2x3")
    assert cost.bytes_accessed > 6 * 4 * k * n  # each iteration reads its weight


class _Compiled:
    def __init__(self, analysis):
        self.analysis = analysis

    def cost_analysis(self):
        if isinstance(self.analysis, Exception):
            raise self.analysis
        return self.analysis

    def as_text(self):
        return "HloModule m\n"


def test_unknown_cost_is_unknown_not_zero():
    assert program_cost(_Compiled({})).flops is None
    assert program_cost(_Compiled(None)).bytes_accessed is None
    assert program_cost(_Compiled(NotImplementedError("no cost analysis here"))).flops is None
    partial = program_cost(_Compiled([{"flops": 10.0}]))  # a list of one dict (older jaxlibs), no bytes
    assert partial.flops == 10.0 and partial.bytes_accessed is None
    unknown = _program("train_step", ())
    assert unknown.flops is None and unknown.estimate_s(preflight.CHIPS["v5p"]) is None
    report = PreflightReport(
        "cfg",
        "dpo",
        preflight.parse_topology("v5p-8"),
        "tpu",
        "",
        {"fsdp": 4},
        "fsdp",
        GIB,
        [unknown],
        [],
        [],
    )
    row = [line for line in report.format().splitlines() if line.startswith("train_step")][0]
    assert row.split()[-3:] == ["unknown", "unknown", "unknown"]
    assert report.to_dict()["programs"][0]["estimate_s"] is None


# The runner's program list (jaxrl.rl.programs), in the loop's order, for a config with no reward model.
RL_PROGRAMS = ("generate", "rollout_stats", "advantages", "prepare", "gather", "train_step")


@needs_libtpu
def test_tpu_compile_of_a_tiny_ppo_config(run_config):
    cfg = run_config(
        "ppo",
        **{
            "mesh.data": 1,
            "mesh.fsdp": -1,
            "rl.verifiable": "gold",
            "rl.value_init": "policy",
            "rl.rollout_batch": 8,
            "rl.minibatch": 8,
            "rl.max_new_tokens": 8,
        },
    )
    report = preflight.run(cfg, "v4-8", backend="tpu", log=lambda *_: None)
    assert report.topology.chips == 4 and report.backend == "tpu"
    assert [p.name for p in report.programs] == list(RL_PROGRAMS)
    names = {h.name for h in report.holdings}
    assert names == {
        "policy params",
        "policy optimizer state",
        "value params",
        "value optimizer state",
        "reference params",
    }
    assert report.fits


def test_fake_cpu_fallback_is_labelled(run_config):
    cfg = run_config("sft", **{"mesh.data": 1, "mesh.fsdp": -1, "train.grad_accum": 2})
    report = preflight.run(cfg, "v5e-8", backend="cpu", log=lambda *_: None)
    assert report.backend == "cpu"
    assert "NOT A TPU COMPILE" in report.format()
    assert report.programs[0].name == "train_step" and report.programs[0].arguments > 0
    _assert_cost_fields(report, cfg)


def test_online_rl_compiles_the_runner_programs(run_config, monkeypatch):
    """Preflight lowers the very objects the RL loop calls (rl.programs), placed as the loop places them."""
    from jaxrl.rl import programs as rl_programs

    cfg = run_config(
        "online_dpo",
        **{
            "mesh.data": 1,
            "mesh.fsdp": -1,
            "rl.verifiable": "gold",
            "rl.rollout_batch": 8,
            "rl.samples_per_prompt": 2,
            "rl.minibatch": 16,
            "rl.max_new_tokens": 8,
        },
    )
    built = []
    build = rl_programs.programs
    monkeypatch.setattr(rl_programs, "programs", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    report = preflight.run(cfg, "v5e-8", backend="cpu", log=lambda *_: None)
    assert [p.name for p in report.programs] == list(built[0].programs) == list(RL_PROGRAMS)
    policy = ("policy params", "policy optimizer state")
    assert {h.name for h in report.holdings} == {*policy, "reference params"}
    train = report.programs[-1]
    assert train.holdings == policy and train.aliased > 0  # the state is donated
    # Pairs: the minibatch update takes rl.minibatch / 2 pairs of two responses.
    minibatch = built[0]["train_step"].args[1]
    assert minibatch["response"].shape == (8, 2, 8) and minibatch["weight"].shape == (8,)
    assert report.fits


def test_does_not_fit_fails_with_suggestions(tmp_path, capsys):
    backend = "tpu" if LIBTPU_MISSING is None else "cpu"
    out_json = tmp_path / "report.json"
    code = cli.main(
        [
            "preflight",
            "--config",
            "experiments/tiny_pipeline.py",
            "--topology",
            "v5e-8",
            "--set",
            "model.dtype=float32",
            "--set",
            "train.batch_size=16",
            "--backend",
            backend,
            "--hbm-gib",
            "0.0001",
            "--json",
            str(out_json),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "DOES NOT FIT" in captured.out
    assert "does not fit v5e-8; try:" in captured.err
    assert "--set mesh.data=1 --set mesh.fsdp=-1" in captured.err  # the tiny config replicates over data=8
    report = json.loads(out_json.read_text())
    assert report["fits"] is False and report["peak_bytes"] > report["hbm_bytes"]
    assert report["programs"][0]["name"] == "train_step"


def test_preflight_cli_fits_and_reads_config_functions(tmp_path, capsys):
    experiment = tmp_path / "presets.py"
    experiment.write_text(
        "from jaxrl.config import Config, ModelConfig, MeshConfig, TrainConfig, DataConfig\n"
        "def get_config():\n"
        "    raise AssertionError('the named function is used')\n"
        "def small():\n"
        "    model = ModelConfig(vocab_size=256, hidden=32, layers=1, heads=4, kv_heads=2, mlp=64)\n"
        "    return Config(stage='rm', model=model, mesh=MeshConfig(data=1, fsdp=-1),\n"
        "                  train=TrainConfig(batch_size=8), data=DataConfig(max_len=32, max_prompt_len=16))\n"
    )
    code = cli.main(
        ["preflight", "--config", f"{experiment}:small", "--topology", "v5e-8", "--backend", "cpu"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "stage rm" in out and ": fits;" in out


@needs_libtpu
def test_compiler_refusal_is_a_clear_does_not_fit(capsys):
    # Full-vocabulary fp32 logits of 8 sequences of 8192 tokens per chip: more than a v5e chip's 16 GiB.
    code = cli.main(
        [
            "preflight",
            "--config",
            "experiments/tiny_pipeline.py",
            "--topology",
            "v5e-8",
            "--set",
            "model.vocab_size=64000",
            "--set",
            "data.max_len=8192",
            "--set",
            "train.batch_size=64",
            "--set",
            "mesh.data=1",
            "--set",
            "mesh.fsdp=-1",
            "--set",
            "model.dtype=float32",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "train_step (refused)" in captured.out and "RESOURCE_EXHAUSTED" in captured.out
    assert "DOES NOT FIT" in captured.out
    assert "--set model.remat=full" in captured.err and "--set train.grad_accum=2" in captured.err


def test_auto_falls_back_to_fake_cpu_when_libtpu_cannot(monkeypatch, run_config):
    def no_libtpu(topology):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology")

    monkeypatch.setattr(preflight.topology, "tpu_devices", no_libtpu)  # where slice_devices looks it up
    devices, backend, note = preflight.slice_devices(preflight.parse_topology("v6e-8"), "auto")
    assert (
        backend == "cpu" and len(devices) == 8 and "libtpu unavailable: JAX TPU support not installed" in note
    )
    with pytest.raises(preflight.PreflightError, match="libtpu could not describe v6e-8"):
        preflight.slice_devices(preflight.parse_topology("v6e-8"), "tpu")
    with pytest.raises(preflight.PreflightError, match="needs 16 CPU devices"):
        preflight.slice_devices(preflight.parse_topology("v6e-16"), "auto")


@needs_libtpu
def test_multi_slice_mesh_puts_the_data_axis_across_slices(run_config):
    """Two v5e-4 slices from libtpu: the mesh's data axis spans the slices, fsdp stays within one, and the
    DPO step compiles for them."""
    from jaxrl import sharding
    from jaxrl.config import ConfigError, MeshConfig
    from jaxrl.preflight.topology import parse_topology, tpu_devices

    topology = dataclasses.replace(parse_topology("v5e-4"), slices=2)
    devices = tpu_devices(topology)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=-1), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(ConfigError, match="multiple of the slice count"):
        sharding.make_mesh(MeshConfig(data=1, fsdp=-1), devices)
    cfg = run_config("dpo", **{"mesh.data": 2, "mesh.fsdp": -1})
    report = preflight.run(cfg, "v5e-4", backend="tpu", slices=2, log=lambda *_: None)
    assert report.topology.devices == 8 and report.mesh_shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert "2 x v5e-4: 8 chips" in report.format() and report.to_dict()["topology"] == "2 x v5e-4"


def test_multi_slice_launch_requests_one_queued_resource_and_reaches_every_slice():
    from launch import tpu

    options = tpu.TpuOptions(name="study", zone="us-east5-a", topology="v5p-128", slices=2)
    create = tpu.create_steps(options)[0].argv
    assert "--node-count=2" in create and "--node-prefix=study" in create
    assert not any(a.startswith("--node-id") for a in create)
    script = tpu.ssh(options, "hostname")
    assert script[:2] == ("bash", "-c")
    assert "ssh study-0" in script[2] and "ssh study-1" in script[2] and "exit $failed" in script[2]
    single = tpu.TpuOptions(name="study", zone="us-east5-a", topology="v5p-128")
    assert "--node-id=study" in tpu.create_steps(single)[0].argv and tpu.ssh(single, "x")[0] == "gcloud"


@needs_libtpu
def test_tpu_compile_of_a_listwise_dpo_step(run_config):
    cfg = run_config(
        "dpo", **{"loss.name": "lipo_lambda", "data.list_size": 4, "mesh.data": 1, "mesh.fsdp": -1}
    )
    report = preflight.run(cfg, "v5e-8", backend="tpu", log=lambda *_: None)
    assert [p.name for p in report.programs] == ["train_step", "reference_logps"]
    assert report.fits and report.programs[0].arguments > 0
