"""The four-factor study ("Unpacking DPO and PPO") in the synthetic world, where the gold reward is known.

    jaxrl sweep experiments/unpacking_synthetic.py --workdir runs/unpacking          # the default small grid
    jaxrl sweep experiments/unpacking_synthetic.py --workdir runs/unpacking_full --full

The factors:
  data         four preference datasets of different quality (clean, noisy, math_only, length_biased);
  algorithm    the DPO family (offline, on the dataset) and PPO (online, rewarded by a reward model trained
               on the dataset), plus GRPO and online DPO arms;
  reward model two sizes per dataset: "small" (the policy's size, initialised from the policy's SFT base) and
               "large" (4 layers, width 128, from an SFT base of its own size), judged by accuracy on
               held-out gold-labelled pairs and by what PPO makes of them;
  prompts      three policy-training prompt sets for the online arms (in_domain, math_heavy, mixed).
Every policy starts from one shared SFT base per seed, trained on imperfect demonstrations. A PPO arm
rewarded by the gold reward itself (`rl.verifiable=gold`) is the ceiling the reward models are measured against.

The sweep layer resolves the dependencies: a point's `rl.reward_model` names a reward-model arm ("clean-small");
reward_model() maps it to that arm's sweep point, which runs first and is shared by every arm that uses it.
"""

import itertools

from jaxrl.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig, override

DATASETS = ("clean", "noisy", "math_only", "length_biased")
PROMPT_SETS = ("in_domain", "math_heavy", "mixed")
# Per-algorithm hyperparameters from the papers' recommended ranges (SimPO: beta 2, gamma/beta 0.5;
# length-normalised DPO: beta 5 as in Tulu 3).
ALGORITHMS = {
    "dpo": {"loss.name": "dpo", "loss.beta": 0.1},
    "ipo": {"loss.name": "ipo", "loss.beta": 0.1},
    "cdpo": {"loss.name": "cdpo", "loss.beta": 0.1, "loss.label_smoothing": 0.1},
    "simpo": {"loss.name": "simpo", "loss.beta": 2.0, "loss.gamma": 1.0},
    "dpo_norm": {"loss.name": "dpo_norm", "loss.beta": 5.0},
}
RM_SIZES = {
    "small": {},
    "large": {"model.hidden": 128, "model.layers": 4, "model.mlp": 384},
}

# The Tulu 2.5 PPO recipe scaled down (as in experiments/rl_synthetic.py, whose docstring lists what was kept and
# what was changed for a 0.1M-parameter model): KL beta 0.05 (k1, in the reward), temperature 0.7, gamma 1,
# lambda 0.95, clip 0.2, value clip 0.2, value coefficient 0.1, whitened advantages, one rollout per prompt, the
# value model initialised from the reward model; lr 3e-4 constant after 10% warmup; 32 iterations of rollout
# batches of 32, two epochs of minibatches of 16; missing-EOS penalty -1.
_ONLINE = {
    "optim.lr": 3e-4,
    "optim.schedule": "constant",
    "optim.warmup_ratio": 0.1,
    "train.steps": 32,
    "train.log_every": 8,
    "train.checkpoint_every": 16,
    "rl.num_prompts": 1024,
    "rl.rollout_batch": 32,
    "rl.minibatch": 16,
    "rl.epochs": 2,
    "rl.max_new_tokens": 16,
    "rl.temperature": 0.7,
    "rl.missing_eos_penalty": -1.0,
    "rl.kl_coef": 0.05,
    "rl.kl_estimator": "k1",
    "rl.gamma": 1.0,
    "rl.lam": 0.95,
    "rl.clip": 0.2,
    "rl.value_clip": 0.2,
    "rl.value_coef": 0.1,
}
# Every online arm samples 32 sequences per rollout batch: GRPO 4 for each of 8 prompts, online DPO 2 for each
# of 16 (its minibatch counts sequences, two per pair; its loss is the study's loss section: DPO, beta 0.1).
_STAGE_DEFAULTS = {
    "ppo": _ONLINE,
    "grpo": {**_ONLINE, "rl.samples_per_prompt": 4, "rl.rollout_batch": 8},
    "online_dpo": {**_ONLINE, "rl.samples_per_prompt": 2, "rl.rollout_batch": 16, "rl.minibatch": 16},
}


def get_config() -> Config:
    return Config(
        stage="dpo",
        model=ModelConfig(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, mlp=192),
        optim=OptimConfig(lr=5e-4, warmup_ratio=0.1, schedule="linear"),
        loss=LossConfig(name="dpo", beta=0.1),
        data=DataConfig(num_train=2048, num_eval=256, max_len=48, max_prompt_len=24, eval_prompts_per_domain=24),
        train=TrainConfig(steps=120, batch_size=32, log_every=20, checkpoint_every=60, tensorboard=False),
    )


def stage_defaults(stage: str) -> dict:
    """Settings of a stage, applied before a point's overrides (so they stay out of the run ids)."""
    return dict(_STAGE_DEFAULTS.get(stage, {}))


def sft_config(cfg: Config) -> Config:
    """The shared SFT base of a sweep point (same model and seed; imperfect demonstrations)."""
    return override(cfg, {"stage": "sft", "loss.name": "dpo", "loss.beta": 0.1, "loss.label_smoothing": 0.0,
                          "loss.gamma": 0.0, "data.synthetic_kind": "clean", "optim.lr": 3e-3,
                          "optim.schedule": "cosine", "train.steps": 250, "train.init_from": ""})


def rm_point(data: str, size: str, seed: int) -> dict:
    """The sweep point of a reward model trained on one dataset."""
    return {"stage": "rm", "data.synthetic_kind": data, "optim.lr": 1e-3, **RM_SIZES[size], "seed": seed}


def reward_model(point: dict):
    """The reward-model point an online point's `rl.reward_model` ("<dataset>-<size>") names; None for none."""
    name = point.get("rl.reward_model", "")
    if not name:
        return None
    data, _, size = name.rpartition("-")
    if data not in DATASETS or size not in RM_SIZES:
        raise ValueError(f"rl.reward_model {name!r}: expected <dataset>-<size> with a dataset in {DATASETS} "
                         f"and a size in {tuple(RM_SIZES)}")
    return rm_point(data, size, point.get("seed", 0))


def online_point(stage: str, rm: str, prompts: str, seed: int) -> dict:
    return {"stage": stage, "rl.reward_model": rm, "rl.prompt_set": prompts, "seed": seed}


def sweep(full: bool = False):
    seeds = (0, 1, 2) if full else (0,)
    points = []
    if full:
        algorithms, rm_datasets, rm_sizes = ALGORITHMS, DATASETS, tuple(RM_SIZES)
    else:
        algorithms, rm_datasets, rm_sizes = {"dpo": ALGORITHMS["dpo"]}, ("clean", "noisy"), ("small",)
    for seed, data, (_, alg) in itertools.product(seeds, DATASETS, algorithms.items()):
        points.append({"data.synthetic_kind": data, **alg, "seed": seed})
    for seed, data, size in itertools.product(seeds, rm_datasets, rm_sizes):
        points.append(rm_point(data, size, seed))
    if full:
        # PPO: every reward model x every prompt set; GRPO and online DPO with the clean small reward model;
        # PPO on the gold reward itself (value model from the policy), the ceiling.
        for seed, data, size, prompts in itertools.product(seeds, DATASETS, RM_SIZES, PROMPT_SETS):
            points.append(online_point("ppo", f"{data}-{size}", prompts, seed))
        for seed, stage, prompts in itertools.product(seeds, ("grpo", "online_dpo"), PROMPT_SETS):
            points.append(online_point(stage, "clean-small", prompts, seed))
        for seed in seeds:
            points.append({"stage": "ppo", "rl.verifiable": "gold", "rl.value_init": "policy",
                           "rl.prompt_set": "in_domain", "seed": seed})
    else:
        # PPO with the clean reward model on each prompt set, and with the noisy one on in-domain prompts.
        points += [online_point("ppo", "clean-small", p, 0) for p in PROMPT_SETS]
        points.append(online_point("ppo", "noisy-small", "in_domain", 0))
    return points


def metrics():
    return ["eval/gold_reward", "eval/gold_reward/math", "eval/gold_reward/instruct", "eval/gold_reward/safety",
            "eval/gold_reward/chat", "eval/kl", "eval/length", "eval/ranking_accuracy", "eval/rewards/accuracies",
            "eval/accuracy"]
