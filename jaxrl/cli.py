"""`jaxrl train | sweep | convert | eval | eval-rm | validate | ...`: command-line entry points."""

from __future__ import annotations

import argparse
import json
import sys

from jaxrl import cli_eval, cli_launch
from jaxrl.config import ConfigError


def _config(args):
    from jaxrl import config as config_lib
    from jaxrl.validate import validate

    module = config_lib.load_experiment(args.config)
    return validate(config_lib.override(module.get_config(), args.set or []))


def add_train(sub) -> None:
    """The `train` subcommand and its flags."""
    p = sub.add_parser("train", help="train one stage (sft, rm or dpo) from an experiment file")
    p.add_argument("--config", required=True, help="experiments/<file>.py defining get_config()")
    p.add_argument("--workdir", required=True, help="run directory: config, metrics, checkpoints (resumes)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. loss.beta=0.3")
    p.set_defaults(fn=cmd_train)


def cmd_train(args) -> int:
    from jaxrl import train

    cfg = _config(args)
    summary = train.run(cfg, args.workdir)
    print(json.dumps({"stage": summary.get("stage"), "eval": summary.get("eval")}, indent=2))
    return 0


def add_sweep(sub) -> None:
    """The `sweep` subcommand and its flags."""
    p = sub.add_parser("sweep", help="run every point of an experiment's sweep() (idempotent), then tabulate")
    p.add_argument("config", help="experiments/<study>.py defining get_config(), sweep(), metrics()")
    p.add_argument("--workdir", required=True, help="study directory: runs/<id>/, cache/, results, plots")
    p.add_argument("--full", action="store_true", help="the full grid with several seeds (sweep(full=True))")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every run")
    p.add_argument(
        "--group",
        choices=("auto", "vmap", "map", "off", "on"),
        default="auto",
        help="runs that share shapes train together as one program. map: its members one after another, "
        "each bitwise the run alone on a CPU (saves compiles and dispatches); vmap (or on): batched, faster "
        "on a launch-bound GPU/TPU, each step the same to float rounding, so over long runs the results "
        "agree in distribution, not number for number; off: one run at a time; auto: vmap on GPU/TPU, map "
        "on CPU (bench/results/sweep_groups.md)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="sweep processes sharing the workdir (this one and N-1 more, logs in <workdir>/logs): on a "
        "CPU machine 2 runs a study about 1.3x faster on 2 cores; the results are the same",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a worker: trains, no table
    p.set_defaults(fn=cmd_sweep)


def worker_argv(args) -> list[str]:
    """The command line of a worker of this sweep (see jaxrl.sweep.start_workers)."""
    from pathlib import Path

    argv = ["sweep", args.config, "--workdir", str(Path(args.workdir).absolute()), "--group", args.group]
    argv += ["--full"] if args.full else []
    for item in args.set or []:
        argv += ["--set", item]
    return [*argv, "--worker"]


def cmd_sweep(args) -> int:
    from jaxrl import config as config_lib
    from jaxrl import results as results_lib
    from jaxrl import study as study_lib
    from jaxrl import sweep

    module = study_lib.variant(config_lib.load_experiment(args.config), full=args.full, label=args.config)
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: expected at least 1")
    workers = []
    if args.workers > 1 and not args.worker:
        workers = sweep.start_workers(args.workers - 1, worker_argv(args), args.workdir)
    try:
        rows = sweep.run_sweep(module, args.workdir, args.set or [], group=args.group)
    except BaseException:
        sweep.join_workers(workers, stop=True)
        raise
    for problem in sweep.join_workers(workers):
        print(f"jaxrl sweep: {problem}", file=sys.stderr)  # its runs were finished by the others
    if args.worker:
        return 0
    from pathlib import Path

    workdir = Path(args.workdir).absolute()
    metrics = list(module.metrics()) if hasattr(module, "metrics") else ["eval/loss"]
    md, csv_path, markdown = results_lib.write_results(rows, metrics, workdir)
    plots = results_lib.write_plots(rows, workdir)
    print()
    print(markdown)
    print(f"results: {md} and {csv_path}")
    if hasattr(module, "findings"):
        print()
        print(results_lib.write_findings(module.findings(rows), workdir))
        print(f"findings: {workdir / 'findings.md'}")
    for p in plots:
        print(f"plot: {p}")
    failed = [r for r in rows if r.get("status", "finished") != "finished"]
    for r in failed:
        print(f"jaxrl sweep: {r['status']}: {r['run']}: {r.get('reason', '')}", file=sys.stderr)
    return 1 if failed else 0


def add_convert(sub) -> None:
    """The `convert` subcommand and its flags."""
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


def add_validate(sub) -> None:
    """The `validate` subcommand and its flags."""
    p = sub.add_parser("validate", help="check that an experiment's config and every sweep point validate")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_validate)


def cmd_validate(args) -> int:
    import tempfile

    from jaxrl import config as config_lib
    from jaxrl import study as study_lib
    from jaxrl.validate import validate

    module = config_lib.load_experiment(args.config)
    validate(config_lib.override(module.get_config(), args.set or []))
    if not hasattr(module, "sweep"):
        print(f"{args.config}: 1 configuration valid")
        return 0
    module = study_lib.variant(module, full=study_lib.has_full(module), label=args.config)  # the larger grid
    with tempfile.TemporaryDirectory() as tmp:  # expand() validates every run, shared bases included
        runs = study_lib.expand(module, tmp, args.set or [])
    points = sum(r.kind == "point" for r in runs)
    print(
        f"{args.config}: {len(runs)} configuration(s) valid "
        f"({points} sweep runs, {len(runs) - points} shared bases)"
    )
    return 0


def add_prepare(sub) -> None:
    """The `prepare` subcommand and its flags."""
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxrl", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    for add in (
        add_train,
        add_sweep,
        add_convert,
        cli_eval.add_eval,
        cli_eval.add_eval_rm,
        add_validate,
        cli_launch.add_preflight,
        add_prepare,
        cli_launch.add_launch,
    ):
        add(sub)

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
