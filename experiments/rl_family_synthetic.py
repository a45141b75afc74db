"""The rest of the online family in the synthetic world: constrained PPO against reward over-optimisation, and
online IPO and Nash-MD beside online DPO, every arm rewarded by the same proxy reward model.

    jaxrl sweep experiments/rl_family_synthetic.py --workdir runs/rl_family

The proxy: a reward model trained (from the policy's SFT base) on the length-biased synthetic preferences,
whose labeller favours longer responses, so that optimising it can cost gold reward. The arms:
  ppo               the proxy alone (the Tulu 2.5 recipe scaled down, as experiments/rl_synthetic.py); it
                    carries the gold constraint with its multiplier fixed at 0, only to log its value
  ppo_constrained   the proxy subject to E[gold] >= GOLD_FLOOR, a Lagrange multiplier updated per rollout
                    batch (Moskovitz et al. 2023; jaxrl.rl.constraints). The constraint reward here is the
                    world's gold reward, an oracle no real study has: the arm measures the mechanism (does the
                    constrained run hold its constraint where plain PPO with the same reward does not, and
                    what does the multiplier do), not a deployable recipe
  online_dpo        two samples per prompt, the proxy's preferred one chosen (DPO loss)
  online_ipo        the same with the IPO loss (`rl.algorithms.VARIANTS["online_ipo"]`: online DPO, loss ipo)
  nash_md           the policy's sample against one from the policy/reference geometric mixture (coefficient
                    0.5, TRL's default), the preference σ(r - r') of the proxy's scores (Munos et al. 2023)

Read per arm: eval/gold_reward and eval/kl (test prompts, sampled at the policy's temperature), and for the
constrained arm train/constraint/gold/{value, lambda, violation} over iterations (the multiplier's
trajectory) beside the plain arm's rewards/gold/... . GOLD_FLOOR sits above the SFT base's sampled gold on
this world (about 0.45 in experiments/results/unpacking_synthetic.md), so the constraint binds.
"""

import json

from jaxrl.config import (
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RLConfig,
    TrainConfig,
    override,
)
from jaxrl.rl.algorithms import VARIANTS

GOLD_FLOOR = 0.5
PROXY = "length_biased"

# The online arms' schedule (the rl section of get_config holds their recipe).
_ONLINE = {"train.steps": 64, "train.log_every": 1, "train.eval_every": 16, "train.checkpoint_every": 32}
# The pair arms sample two responses to each of 16 prompts (their minibatch counts sequences, two per pair).
PAIRS = {"rl.samples_per_prompt": 2, "rl.rollout_batch": 16}
# The constrained arm's multiplier moves by 1.0 x (floor - mean gold) per rollout batch; the plain arm carries
# the same constraint with a multiplier fixed at 0 (lambda_lr 0): its reward is the proxy's alone, bit for
# bit, and it logs the same constraint/gold/* metrics.
_GOLD = json.dumps([{"verifiable": "gold", "threshold": GOLD_FLOOR, "name": "gold"}])
CONSTRAINED = {"rl.constraints": _GOLD, "rl.lambda_lr": 1.0}
MONITORED = {"rl.constraints": _GOLD, "rl.lambda_lr": 0.0}


def get_config() -> Config:
    return Config(
        stage="ppo",
        model=ModelConfig(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, mlp=192),
        optim=OptimConfig(lr=3e-4, warmup_ratio=0.1, schedule="constant"),
        loss=LossConfig(name="dpo", beta=0.1),  # the online preference arms' loss
        data=DataConfig(
            num_train=2048,
            num_eval=256,
            max_len=48,
            max_prompt_len=24,
            eval_prompts_per_domain=96,
            val_prompts_per_domain=48,
            eval_samples=8,
            eval_temperature=0.7,
        ),
        train=TrainConfig(steps=64, batch_size=32, log_every=1, checkpoint_every=32, tensorboard=False),
        # As experiments/unpacking_synthetic.py's online arms: the Tulu 2.5 PPO recipe scaled down to a
        # 0.1M-parameter model (KL 0.05 k1, temperature 0.7, clip 0.2, ...), 32 sequences per rollout batch.
        rl=RLConfig(
            num_prompts=2048,
            rollout_batch=32,
            minibatch=16,
            epochs=2,
            max_new_tokens=16,
            temperature=0.7,
            missing_eos_penalty=-1.0,
            kl_coef=0.05,
            reward_model=PROXY,
        ),
    )


def stage_defaults(stage: str) -> dict:
    """Settings of a stage, applied before a point's overrides (so they stay out of the run ids)."""
    return dict(_ONLINE) if stage not in ("sft", "rm") else {}


def sft_config(cfg: Config) -> Config:
    """The shared SFT base (as experiments/unpacking_synthetic.py's: imperfect demonstrations, 750 steps)."""
    return override(
        cfg,
        {
            "stage": "sft",
            "loss.name": "dpo",
            "loss.beta": 1.0,
            "optim.lr": 3e-3,
            "data.synthetic_kind": "clean",
            "optim.schedule": "cosine",
            "train.steps": 750,
            "train.eval_every": 0,
            "train.log_every": 50,
            "train.checkpoint_every": 250,
            "train.init_from": "",
        },
    )


def reward_model(point: dict):
    """The proxy reward model's sweep point for an online point (rl.reward_model names its dataset)."""
    data = point.get("rl.reward_model", "")
    if not data:
        return None
    return {
        "stage": "rm",
        "data.synthetic_kind": data,
        "optim.lr": 1e-3,
        "train.steps": 120,
        "seed": point.get("seed", 0),
    }


def sweep():
    arms = [
        {"stage": "ppo", **MONITORED},
        {"stage": "ppo", **CONSTRAINED},
        {"stage": "online_dpo", **PAIRS},
        {**VARIANTS["online_ipo"], **PAIRS},
        {"stage": "nash_md", **PAIRS, "rl.mixture_coef": 0.5},
    ]
    return [{**arm, "rl.reward_model": PROXY, "seed": 0} for arm in arms]


def metrics():
    return [
        "eval/gold_reward",
        "eval/kl",
        "eval/length",
        "train/rewards/rm/mean",
        "train/constraint/gold/value",
        "train/constraint/gold/lambda",
        "train/constraint/gold/violation",
    ]
