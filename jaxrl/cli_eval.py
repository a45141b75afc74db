"""`jaxrl eval` (lm-eval harness tasks through jaxrl's backend) and `jaxrl eval-rm` (reward-model accuracy and
best-of-N): their flags and what they run."""

from __future__ import annotations

import argparse

from jaxrl.config import ConfigError


def add_eval(sub) -> None:
    """The `eval` subcommand and its flags."""
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


def add_eval_rm(sub) -> None:
    """The `eval-rm` subcommand and its flags."""
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
