"""`jaxrl train | sweep | convert | eval | eval-rm | validate | ...`: command-line entry points."""

from __future__ import annotations

import argparse
import json
import sys

from jaxrl.config import ConfigError


def _config(args):
    from jaxrl import config as config_lib
    from jaxrl.validate import validate

    module = config_lib.load_experiment(args.config)
    return validate(config_lib.override(module.get_config(), args.set or []))


def cmd_train(args) -> int:
    from jaxrl import train

    cfg = _config(args)
    summary = train.run(cfg, args.workdir)
    print(json.dumps({"stage": summary.get("stage"), "eval": summary.get("eval")}, indent=2))
    return 0


def cmd_sweep(args) -> int:
    from jaxrl import config as config_lib
    from jaxrl import sweep

    module = sweep.variant(config_lib.load_experiment(args.config), full=args.full, label=args.config)
    rows = sweep.run_sweep(module, args.workdir, args.set or [], group=args.group)
    from pathlib import Path

    workdir = Path(args.workdir).absolute()
    metrics = list(module.metrics()) if hasattr(module, "metrics") else ["eval/loss"]
    md, csv_path, markdown = sweep.write_results(rows, metrics, workdir)
    plots = sweep.write_plots(rows, workdir)
    print()
    print(markdown)
    print(f"results: {md} and {csv_path}")
    if hasattr(module, "findings"):
        print()
        print(sweep.write_findings(module.findings(rows), workdir))
        print(f"findings: {workdir / 'findings.md'}")
    for p in plots:
        print(f"plot: {p}")
    failed = [r for r in rows if r.get("status", "finished") != "finished"]
    for r in failed:
        print(f"jaxrl sweep: {r['status']}: {r['run']}: {r.get('reason', '')}", file=sys.stderr)
    return 1 if failed else 0


def cmd_convert(args) -> int:
    from jaxrl import convert

    hf_overrides = convert.parse_hf_overrides(args.hf_set or [])
    if convert.is_hf_source(args.source):
        if args.tokenizer:
            raise ConfigError("--tokenizer is for an export (run -> HF); an import keeps the checkpoint's")
        out = convert.hf_to_run(args.source, args.out, overrides=args.set or [], hf_overrides=hf_overrides)
        print(f"wrote jaxrl run directory {out} (use it as train.init_from / train.reference_from)")
    else:
        out = convert.run_to_hf(
            args.source,
            args.out,
            tokenizer_dir=args.tokenizer,
            overrides=args.set or [],
            hf_overrides=hf_overrides,
        )
        print(f"wrote Hugging Face checkpoint {out}")
    return 0


def cmd_eval(args) -> int:
    from jaxrl.eval import harness

    model_args = {}
    for item in args.model_arg or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg {item!r}: expected KEY=VALUE")
        model_args[key] = value
    try:
        from lm_eval.utils import handle_arg_string
    except ImportError as e:
        raise ConfigError(f'jaxrl eval needs lm-eval: pip install -e ".[eval]" ({e})') from e
    model_args = {k: handle_arg_string(v) for k, v in model_args.items()}
    harness.evaluate(
        args.model,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        args.out,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        batch_size=args.batch_size,
        model_args=model_args,
        apply_chat_template=args.apply_chat_template,
        with_optional=args.with_optional,
        judge=args.judge,
        alpaca_file=args.alpaca_file,
        log_samples=args.log_samples,
    )
    return 0


def _key_values(items, flag: str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def cmd_eval_rm(args) -> int:
    from jaxrl.eval import rm_eval

    policy_args = _key_values(args.policy_arg, "--policy-arg")
    if policy_args:
        from lm_eval.utils import handle_arg_string

        policy_args = {k: handle_arg_string(v) for k, v in policy_args.items()}
    mesh = {
        "data": args.mesh_data,
        "fsdp": args.mesh_fsdp,
        "tensor": args.mesh_tensor,
        "preset": args.mesh_preset,
    }
    rm_eval.run(
        args.model,
        args.out,
        data=args.data,
        policy=args.policy,
        prompts=args.prompts,
        best_of=args.best_of,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        max_len=args.max_len,
        max_prompt_len=args.max_prompt_len,
        dtype=args.dtype,
        mesh=mesh,
        policy_args=policy_args,
    )
    return 0


def cmd_validate(args) -> int:
    import tempfile

    from jaxrl import config as config_lib
    from jaxrl import sweep
    from jaxrl.validate import validate

    module = config_lib.load_experiment(args.config)
    validate(config_lib.override(module.get_config(), args.set or []))
    if not hasattr(module, "sweep"):
        print(f"{args.config}: 1 configuration valid")
        return 0
    module = sweep.variant(module, full=sweep.has_full(module), label=args.config)  # the larger grid
    with tempfile.TemporaryDirectory() as tmp:  # expand() validates every run, shared bases included
        runs = sweep.expand(module, tmp, args.set or [])
    points = sum(r.kind == "point" for r in runs)
    print(
        f"{args.config}: {len(runs)} configuration(s) valid "
        f"({points} sweep runs, {len(runs) - points} shared bases)"
    )
    return 0


def cmd_preflight(args) -> int:
    from jaxrl import preflight

    try:
        cfg = preflight.load_config(args.config, args.set or [])
        report = preflight.run(
            cfg,
            args.topology,
            backend=args.backend,
            hbm_gib=args.hbm_gib,
            slices=args.slices,
            config_label=args.config,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except preflight.PreflightError as e:
        print(f"jaxrl preflight: error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if report.fits:
        return 0
    print(f"jaxrl preflight: {args.config} does not fit {report.topology.name}; try:", file=sys.stderr)
    for line in preflight.suggestions(report, cfg):
        print(f"  - {line}", file=sys.stderr)
    return 1


def cmd_prepare(args) -> int:
    import collections

    from jaxrl.data import tfds_builder
    from jaxrl.data.readers import ReadResult
    from jaxrl.data.records import RecordError

    try:
        directory = tfds_builder.prepare(
            args.source,
            args.format,
            args.out,
            name=args.name,
            version=args.version,
            on_error=args.on_error,
            log=lambda m: print(m, file=sys.stderr),
        )
    except (ValueError, RecordError, ImportError) as e:
        print(f"jaxrl prepare: error: {e}", file=sys.stderr)
        return 2
    info = tfds_builder.metadata(directory)
    counts = ReadResult(
        rows_read=info["rows_read"], rows_used=info["rows_used"], dropped=collections.Counter(info["dropped"])
    )
    print(directory)
    print(counts.summary())
    return 0


def _launch_package():
    # launch/ is a top-level package of the distribution, beside jaxrl (installed with it, or in a checkout).
    import launch

    return launch


def cmd_launch(args) -> int:
    launch = _launch_package()
    jobs = launch.jobs(args.config, args.workdir, args.set or [], sweep=args.sweep)
    if args.target == "local":
        from launch import local

        local.launch(
            jobs,
            num_processes=args.processes,
            port=args.port,
            cpu_devices=args.cpu_devices,
            program=launch.local_program(),
            dry_run=args.dry_run,
        )
    elif args.target == "slurm":
        from launch import slurm

        options = slurm.SlurmOptions(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task,
            time=args.time,
            port=args.port,
            partition=args.partition,
            account=args.account,
            setup=args.setup,
            script_dir=args.script_dir,
        )
        slurm.launch(jobs, options, dry_run=args.dry_run)
    else:
        from launch import tpu

        options = tpu.TpuOptions(
            name=args.name,
            zone=args.zone,
            project=args.project,
            topology=args.topology,
            runtime_version=args.runtime_version,
            spot=args.spot,
            reserved=args.reserved,
            keep=args.keep,
            slices=args.slices,
        )
        tpu.launch(jobs, options, action=args.action, dry_run=args.dry_run)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxrl", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one stage (sft, rm or dpo) from an experiment file")
    p.add_argument("--config", required=True, help="experiments/<file>.py defining get_config()")
    p.add_argument("--workdir", required=True, help="run directory: config, metrics, checkpoints (resumes)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. loss.beta=0.3")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sweep", help="run every point of an experiment's sweep() (idempotent), then tabulate")
    p.add_argument("config", help="experiments/<study>.py defining get_config(), sweep(), metrics()")
    p.add_argument("--workdir", required=True, help="study directory: runs/<id>/, cache/, results, plots")
    p.add_argument("--full", action="store_true", help="the full grid with several seeds (sweep(full=True))")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every run")
    p.add_argument(
        "--group",
        choices=("auto", "on", "off"),
        default="auto",
        help="on: offline runs that share shapes train together as one vmapped program; off: one "
        "run at a time; auto: on for GPU/TPU, off on CPU (the results are the same)",
    )
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("convert", help="HF checkpoint dir -> jaxrl run dir, or a finished run -> HF dir")
    p.add_argument("source", help="an HF checkpoint directory or a finished jaxrl run directory")
    p.add_argument("out", help="directory to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer files to copy into an HF export")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="import: the run's config (model.dtype, model.param_dtype, mesh.*, stage); "
        "export: mesh.* and model.param_dtype (the saved weights' dtype)",
    )
    p.add_argument(
        "--hf-set",
        action="append",
        metavar="KEY=JSON",
        help="export: a config.json entry (pad_token_id=0, eos_token_id=[1,2]); "
        "import: the bos/eos/pad ids to keep",
    )
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("eval", help="lm-eval harness tasks on a run dir or HF checkpoint (jaxrl backend)")
    p.add_argument("--model", required=True, help="a finished jaxrl run dir or an HF checkpoint dir")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks/groups or suites (tulu25)")
    p.add_argument("--out", required=True, help="directory for results.json and tasks/<task>.json (resumes)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="shots for every task (default: each's own)")
    p.add_argument("--include-path", action="append", default=None, help="a directory of local task YAMLs")
    p.add_argument("--batch-size", type=int, default=None, help="rows per process and forward call")
    p.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="backend argument, e.g. dtype=float32, mesh_preset=fsdp, max_length=4096",
    )
    p.add_argument(
        "--apply-chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the model's chat template (default: the suite's setting, else off)",
    )
    p.add_argument("--with-optional", action="store_true", help="also the suite's optional tasks (HumanEval)")
    p.add_argument("--judge", default=None, help="reward model dir judging alpaca_eval_rm")
    p.add_argument("--alpaca-file", default=None, help="AlpacaEval JSON/JSONL: instruction, output")
    p.add_argument("--log-samples", action="store_true", help="also write tasks/<task>.samples.jsonl")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("eval-rm", help="reward model: RewardBench-style accuracy; best-of-N")
    p.add_argument(
        "--model",
        required=True,
        help="the reward model: a finished rm run dir or an HF *ForSequenceClassification checkpoint dir",
    )
    p.add_argument("--out", required=True, help="directory for rm_results.json, rm_scores.jsonl, samples")
    p.add_argument("--data", default=None, help="preference JSONL/JSON: prompt, chosen, rejected, subset, id")
    p.add_argument("--policy", default=None, help="best-of-N: the sampling policy (run dir or HF checkpoint)")
    p.add_argument("--prompts", default=None, help="best-of-N: JSONL/JSON of prompt (text or messages)[, id]")
    p.add_argument("--best-of", type=int, default=4, help="best-of-N: samples per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="best-of-N: sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=256, help="best-of-N: tokens per sample at most")
    p.add_argument("--seed", type=int, default=0, help="best-of-N: sampling seed")
    p.add_argument(
        "--policy-arg",
        action="append",
        metavar="KEY=VALUE",
        help="best-of-N: jaxrl lm-eval backend argument for the policy, e.g. dtype=float32",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of each file")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per reward-model call")
    p.add_argument("--max-len", type=int, default=4096, help="prompt + response tokens the RM reads at most")
    p.add_argument("--max-prompt-len", type=int, default=2048, help="prompt tokens kept (from the end)")
    p.add_argument("--dtype", default=None, help="reward-model compute dtype (default: its own)")
    p.add_argument("--mesh-preset", default="fsdp")
    p.add_argument("--mesh-data", type=int, default=-1)
    p.add_argument("--mesh-fsdp", type=int, default=1)
    p.add_argument("--mesh-tensor", type=int, default=1)
    p.set_defaults(fn=cmd_eval_rm)

    p = sub.add_parser("validate", help="check that an experiment's config and every sweep point validate")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("preflight", help="compile a config for a TPU slice here; per-chip memory vs HBM")
    p.add_argument("--config", required=True, help="experiments/<file>.py or <file>.py:<function>")
    p.add_argument("--topology", required=True, help="TPU slice: v5p-128, v5e-64, v4-8, v5p:4x4x12, ...")
    p.add_argument(
        "--slices",
        type=int,
        default=1,
        help="multi-slice: this many slices of --topology, the data axis across them (over DCN)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument(
        "--backend",
        choices=("auto", "tpu", "cpu"),
        default="auto",
        help="tpu: libtpu's topology (required); cpu: fake-CPU mesh; auto: tpu if libtpu works",
    )
    p.add_argument("--hbm-gib", type=float, default=None, help="override the chip's HBM per chip (GiB)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.set_defaults(fn=cmd_preflight)

    p = sub.add_parser(
        "prepare", help="read a local dataset file/dir and write it as a versioned TFDS dataset"
    )
    p.add_argument("--source", required=True, help="a file or directory the reader --format reads")
    p.add_argument("--format", required=True, help="reader name (jaxrl.data.readers.READERS), e.g. tulu25")
    p.add_argument("--out", required=True, help="TFDS data_dir: the dataset goes to <out>/<name>/<version>")
    p.add_argument("--name", required=True, help="dataset name (snake_case)")
    p.add_argument("--version", default="1.0.0", help="x.y.z; a changed source needs a new version")
    p.add_argument(
        "--on-error", choices=("raise", "skip"), default="raise", help="skip: count malformed rows"
    )
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("launch", help="run jaxrl train on a TPU slice, a SLURM cluster or local processes")
    targets = p.add_subparsers(dest="target", required=True)
    for target, help_text in (
        ("tpu", "a TPU slice via gcloud (queued resource or existing TPU VM)"),
        ("slurm", "a SLURM batch job per run: one task per node, srun"),
        ("local", "N processes on this machine joined by jax.distributed"),
    ):
        t = targets.add_parser(target, help=help_text)
        t.add_argument("--config", required=True, help="experiments/<file>.py")
        t.add_argument("--workdir", required=True, help="run directory (with --sweep: the study directory)")
        t.add_argument("--set", action="append", metavar="KEY=VALUE")
        t.add_argument("--sweep", action="store_true", help="one job per run of the experiment's sweep()")
        t.add_argument("--dry-run", action="store_true", help="print the exact commands, run nothing")
        t.set_defaults(fn=cmd_launch)
        if target == "tpu":
            t.add_argument("--name", required=True, help="TPU VM name (and queued-resource id)")
            t.add_argument("--zone", required=True)
            t.add_argument("--project", default="")
            t.add_argument(
                "--topology",
                default="",
                help="create a queued resource of this slice, e.g. v5p-128 (omit: existing VM)",
            )
            t.add_argument("--runtime-version", default="")
            t.add_argument("--spot", action="store_true")
            t.add_argument("--reserved", action="store_true")
            t.add_argument("--keep", action="store_true", help="do not delete a created slice afterwards")
            t.add_argument(
                "--slices",
                type=int,
                default=1,
                help="multi-slice: a queued resource of this many --topology slices (nodes "
                "<name>-0, <name>-1, ...), the jobs' data axis across them",
            )
            t.add_argument("--action", choices=("run", "stop", "logs", "delete"), default="run")
        elif target == "slurm":
            t.add_argument("--nodes", type=int, default=1)
            t.add_argument("--gpus-per-node", type=int, default=8)
            t.add_argument("--cpus-per-task", type=int, default=32)
            t.add_argument("--time", default="24:00:00")
            t.add_argument("--port", type=int, default=29500, help="coordinator port on the first node")
            t.add_argument("--partition", default="")
            t.add_argument("--account", default="")
            t.add_argument("--setup", default="", help="shell lines run before srun (modules, venv)")
            t.add_argument("--script-dir", default="", help="script directory (default <workdir>/launch)")
        else:
            t.add_argument("--processes", type=int, default=2)
            t.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
            t.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices per process")

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"jaxrl {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        from jaxrl.workdir import RunFailed

        if args.debug or not isinstance(e, RunFailed):
            raise
        print(f"jaxrl {args.command}: {_one_line(e)}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix (a config, a file, a data row, a checkpoint, a launch flag): one line and
    exit 2, the traceback only with --debug."""
    from jaxrl.data.chat import ChatTemplateError
    from jaxrl.data.records import RecordError
    from jaxrl.models.hf import HFCheckpointError
    from jaxrl.preflight import PreflightError

    errors = [
        ConfigError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        RecordError,
        HFCheckpointError,
        ChatTemplateError,
        PreflightError,
    ]
    try:
        from launch import LaunchError

        errors.append(LaunchError)
    except ImportError:
        pass
    return tuple(errors)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
