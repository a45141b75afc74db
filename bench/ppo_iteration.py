"""PPO-iteration benchmark: the time split of one rollout batch (generation / scoring / training) through the
real runner (`jaxrl.rl.runner.run`: KV-cache sampling, RM scoring, old/reference log-probs and values, GAE,
minibatch epochs of policy + value updates).

    python bench/ppo_iteration.py --tiny                 # a tiny shape that runs on a CPU in seconds
    python bench/ppo_iteration.py                        # the TinyLlama 1.1B shape (an accelerator)
    python bench/ppo_iteration.py --model small --prompt-len 64 --response-len 64 --rollout 16 --minibatch 8
    python bench/ppo_iteration.py --rollout 64 --minibatch 16 --epochs 2 --prompt-len 256 --response-len 256

The policy, reference, reward model and value model are random initialisations of one shape (the value model
starts from the RM, as in Tulu 2.5): timings do not depend on the weights except through response lengths,
and a random policy almost never emits EOS, so every response runs the whole budget (the worst case).
Prompts are the synthetic world's, left-padded to --prompt-len. The first iteration compiles; the figures are
medians over the others.

    generation  sampling (prefill + decode), fetching and decoding the responses
    scoring     the reward model, old/reference log-probs and values (one forward each), advantages
    training    epochs x minibatches of jitted policy and value updates
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxrl import checkpoint, sharding, train
from jaxrl import config as config_lib
from jaxrl.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RLConfig, TrainConfig
from jaxrl.metrics import read_metrics
from jaxrl.models import init as model_init

TINYLLAMA = ModelConfig(vocab_size=32000, hidden=2048, layers=22, heads=32, kv_heads=4, mlp=5632)
TINY = ModelConfig(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128)
SMALL = ModelConfig(
    vocab_size=32000, hidden=256, layers=4, heads=8, kv_heads=4, mlp=1024
)  # ~20M: a CPU's limit
MODELS = {"tiny": TINY, "small": SMALL, "tinyllama": TINYLLAMA}
PHASES = ("time/generation", "time/scoring", "time/training", "time/iteration")


def random_rm_run(workdir: Path, model_cfg: ModelConfig, mesh_cfg: MeshConfig) -> Path:
    """A stage-rm run directory holding random parameters of the given shape."""
    cfg = Config(stage="rm", model=model_cfg, mesh=mesh_cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, workdir / "config.json")
    mesh = sharding.make_mesh(mesh_cfg)
    params = model_init.init_params(model_init.stage_model_config(cfg), 1, mesh, mesh_cfg.preset)
    checkpoint.save_params(checkpoint.final_params_dir(workdir), params)
    return workdir


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model and lengths (CPU smoke run)")
    parser.add_argument("--model", default="tinyllama", choices=sorted(MODELS), help="shape (--tiny: tiny)")
    parser.add_argument("--rollout", type=int, default=None, help="prompts per rollout batch (64; tiny 16)")
    parser.add_argument("--minibatch", type=int, default=None, help="sequences per update (64; tiny 16)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=None, help="512; tiny 24")
    parser.add_argument("--response-len", type=int, default=None, help="512; tiny 16")
    parser.add_argument("--iterations", type=int, default=4, help="timed iterations after the compiling one")
    parser.add_argument("--remat", default="dots", choices=config_lib.REMATS)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--preset", default="fsdp")
    parser.add_argument(
        "--no-rm", action="store_true", help="gold verifiable reward, value model from the policy"
    )
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)

    model_cfg = TINY if args.tiny else MODELS[args.model]
    model_cfg = ModelConfig(**{**model_cfg.__dict__, "remat": args.remat, "dtype": args.dtype})
    defaults = (24, 16, 16, 16) if args.tiny else (512, 512, 64, 64)
    given = (args.prompt_len, args.response_len, args.rollout, args.minibatch)
    prompt_len, response_len, rollout, minibatch = (
        default if value is None else value for value, default in zip(given, defaults, strict=True)
    )
    mesh_cfg = MeshConfig(preset=args.preset)

    root = Path(tempfile.mkdtemp(prefix="ppo_iteration_"))
    rl = RLConfig(
        prompt_set="in_domain",
        num_prompts=max(256, rollout * (args.iterations + 1)),
        rollout_batch=rollout,
        minibatch=minibatch,
        epochs=args.epochs,
        max_new_tokens=response_len,
        temperature=0.7,
        verifiable="gold" if args.no_rm else "",
        value_init="policy" if args.no_rm else "reward_model",
        reward_model="" if args.no_rm else str(random_rm_run(root / "rm", model_cfg, mesh_cfg)),
    )
    steps = args.iterations + 1
    cfg = Config(
        stage="ppo",
        model=model_cfg,
        mesh=mesh_cfg,
        optim=OptimConfig(lr=1e-6, schedule="constant"),
        data=DataConfig(
            max_len=prompt_len + response_len, max_prompt_len=prompt_len, eval_prompts_per_domain=0
        ),
        train=TrainConfig(
            steps=steps + 1, log_every=1, checkpoint_every=10**6, tensorboard=False, progress=False
        ),
        rl=rl,
    )
    start = time.perf_counter()
    train.run(cfg, root / "ppo", log=lambda *_: None, stop_after=steps)
    wall = time.perf_counter() - start
    rows = [r for r in read_metrics(root / "ppo") if "time/iteration" in r][1:]
    result = {k: float(np.median([r[k] for r in rows])) for k in PHASES}
    sequences = rollout
    result |= {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "shape": f"hidden {model_cfg.hidden}, {model_cfg.layers} layers, vocab {model_cfg.vocab_size}",
        "rollout": f"{sequences} x ({prompt_len} prompt + {response_len} response)",
        "updates": f"{args.epochs} epoch(s) x {sequences // minibatch} minibatch(es) of {minibatch}",
        "reward": "gold (verifiable)" if args.no_rm else "random RM of the same shape",
        "generated_tokens_per_s": sequences * response_len / result["time/generation"],
        "mean_response_length": float(np.mean([r["completions/mean_length"] for r in rows])),
        "wall_s_including_compile": wall,
    }
    for k, v in result.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
