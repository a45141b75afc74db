"""The real "Unpacking DPO and PPO" study (Ivison et al., 2024; Tulu 2.5) as configs that validate here and
run on a pod. Paths are local: point DATA_ROOT / CKPT_ROOT (or --set) at your copies of
allenai/tulu-2.5-preference-data, allenai/tulu-2.5-prompts and the Tulu 2 13B SFT checkpoint (HF format).

    jaxrl validate --config experiments/tulu25.py
    jaxrl preflight --config experiments/tulu25.py --topology v5p-128
    jaxrl sweep experiments/tulu25.py --workdir gs-or-local-dir      # on a pod, one job per point via launch/

Hyperparameters from the paper's appendix as summarised in the project's reference sheet; the values marked
"verify" could not be confirmed from the appendix and are the released commands' values.

Batches are padded to max_len as in the original runs. Most pairs are far shorter than 2048 tokens:
`--set data.padding=bucket --set data.bucket_multiple=256 --set data.group_by_length=true` computes a fraction
of the padded positions for the same losses (bench/results/padding.md), at the cost of batches grouped by
length.
"""

import dataclasses
import os

from jaxrl.config import (
    Config,
    DataConfig,
    LossConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
    override,
)
from jaxrl.models import presets

DATA_ROOT = os.environ.get("TULU25_DATA", "/data/tulu-2.5-preference-data")
PROMPT_ROOT = os.environ.get("TULU25_PROMPTS", "/data/tulu-2.5-prompts")
CKPT_ROOT = os.environ.get("TULU25_CKPT", "/checkpoints")

# Llama 2 13B (Tulu 2 13B is its SFT); 70B for the large reward models.
LLAMA2_13B = dataclasses.replace(presets.LLAMA2_13B, remat="dots", scan_layers=True)
LLAMA2_70B = dataclasses.replace(presets.LLAMA2_70B, remat="dots", scan_layers=True)

# The 14 datasets compared with DPO, with their sizes (pairs).
DPO_DATASETS = {
    "shp_2": 500_000,
    "stack_exchange": 500_000,
    "prm800k_phase2": 6_949,
    "chatbot_arena_2023": 20_465,
    "chatbot_arena_2024": 34_269,
    "alpaca_farm_human_pref": 9_686,
    "capybara": 7_563,
    "hh_rlhf": 158_530,
    "helpsteer": 9_270,
    "alpaca_farm_gpt4_pref": 19_465,
    "orca_dpo_pairs": 12_859,
    "nectar": 180_099,
    "ultrafeedback_overall": 60_908,
    "ultrafeedback_mean_aspects": 60_908,
}
# The 60,908-pair subsamples compared between DPO and PPO (each also trains a 13B RM on the same data).
PPO_DATASETS = (
    "ultrafeedback_mean_aspects",
    "chatbot_arena_2023",
    "stack_exchange_60k",
    "nectar_60k",
    "hh_rlhf_60k",
)
PPO_SIZES = {"ultrafeedback_mean_aspects": 60_908, "chatbot_arena_2023": 20_465}
PROMPT_SETS = (
    "ultrafeedback_prompts",
    "math_prompts_20k",
    "gsm8k_prompts",
    "ultrafeedback_code_math_prompts",
)
REWARD_MODELS = {
    "13b_uf": f"{CKPT_ROOT}/tulu-v2.5-13b-uf-rm",
    "13b_mix": f"{CKPT_ROOT}/tulu-v2.5-13b-mix-rm",
    "70b_uf": f"{CKPT_ROOT}/tulu-v2.5-70b-uf-rm",
    "70b_mix": f"{CKPT_ROOT}/tulu-v2.5-70b-mix-rm",
}
DPO_BATCH, DPO_EPOCHS = 32, 3


def get_config() -> Config:
    """DPO on UltraFeedback mean-of-aspects from Tulu 2 13B: the paper's best DPO arm."""
    return Config(
        stage="dpo",
        model=LLAMA2_13B,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, preset="fsdp"),
        optim=OptimConfig(
            lr=5e-7,
            schedule="linear",
            warmup_ratio=0.1,
            end_lr_ratio=0.0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            grad_clip=1.0,
        ),
        loss=LossConfig(name="dpo", beta=0.1),  # verify: one summary reports 0.01 from a sweep
        data=DataConfig(
            source=f"{DATA_ROOT}/ultrafeedback_mean_aspects.jsonl",
            format="tulu25",
            tokenizer=f"{CKPT_ROOT}/tulu-2-13b",
            num_train=0,
            num_eval=1000,
            max_len=4096,
            max_prompt_len=2048,
            truncation="drop",
            eval_prompts_per_domain=0,
        ),
        train=TrainConfig(
            steps=dpo_steps(60_908),
            batch_size=DPO_BATCH,
            grad_accum=4,
            log_every=10,
            checkpoint_every=500,
            keep_checkpoints=2,
            init_from=f"{CKPT_ROOT}/tulu-2-13b",
            reference="cache",
            tensorboard=True,
        ),
    )


def dpo_steps(pairs: int) -> int:
    return max(1, DPO_EPOCHS * pairs // DPO_BATCH)


def rm_config(dataset: str, size: int = 60_908) -> dict:
    """A 13B Bradley-Terry RM from the SFT model: 1 epoch, batch 512, lr 1e-6 linear, 3% warmup."""
    return {
        "stage": "rm",
        "data.source": f"{DATA_ROOT}/{dataset}.jsonl",
        "optim.lr": 1e-6,
        "optim.warmup_ratio": 0.03,
        "train.batch_size": 512,
        "train.grad_accum": 32,
        "train.steps": max(1, size // 512),
        "train.reference": "cache",
    }


def ppo_config(dataset: str, rm: str, prompts: str) -> dict:
    """PPO as in the recipe: KL 0.05, temperature 0.7, gamma 1, lambda 0.95, clip 0.2, value from the RM."""
    return {
        "stage": "ppo",
        "rl.prompt_set": f"{PROMPT_ROOT}/{prompts}.jsonl",
        "rl.reward_model": rm,
        "rl.kl_coef": 0.05,
        "rl.temperature": 0.7,
        "rl.gamma": 1.0,
        "rl.lam": 0.95,
        "rl.clip": 0.2,
        "rl.value_clip": 0.2,
        "rl.value_coef": 0.1,
        "rl.missing_eos_penalty": -10.0,
        "rl.epochs": 1,
        "rl.rollout_batch": 64,
        "rl.minibatch": 64,
        "rl.samples_per_prompt": 1,
        "rl.max_new_tokens": 1024,
        "rl.num_prompts": 60_908,
        "rl.eval_prompts": 500,  # held out from the prompt file: RM score, KL, length, EOS rate as val/*
        "train.eval_every": 100,
        "rl.value_init": "reward_model",
        "optim.lr": 1e-6,
        "optim.schedule": "constant",
        "optim.warmup_ratio": 0.1,
        "data.max_prompt_len": 1024,
        "data.max_len": 2048,
        "train.steps": 60_908 // 64,
        "train.batch_size": 64,
        "train.grad_accum": 8,
        "data.source": f"{DATA_ROOT}/{dataset}.jsonl",
    }


# PPO on one of PPO_DATASETS is rewarded by the 13B RM this sweep trains on the same data: its rl.reward_model
# is "trained:<dataset>", which reward_model() maps to that RM's sweep point (the sweep layer runs it first
# and puts its run dir in rl.reward_model). The released RMs of REWARD_MODELS are read from CKPT_ROOT.
TRAINED = "trained:"


def reward_model(point: dict):
    name = point.get("rl.reward_model", "")
    return rm_config(name.removeprefix(TRAINED)) if name.startswith(TRAINED) else None


def sweep(full: bool = True):
    points = []
    for dataset, size in DPO_DATASETS.items():
        points.append({"data.source": f"{DATA_ROOT}/{dataset}.jsonl", "train.steps": dpo_steps(size)})
    for dataset in PPO_DATASETS:
        points.append({"data.source": f"{DATA_ROOT}/{dataset}.jsonl", "train.steps": dpo_steps(60_908)})
        points.append(rm_config(dataset))
        points.append(ppo_config(dataset, f"{TRAINED}{dataset}", "ultrafeedback_prompts"))
    for rm_path in REWARD_MODELS.values():
        for prompts in PROMPT_SETS:
            points.append(ppo_config("ultrafeedback_mean_aspects", rm_path, prompts))
    return points


def evaluation():
    """The paper's benchmark suite on every policy arm (DPO and PPO; reward models are judged by their
    accuracy): `jaxrl sweep` runs `jaxrl eval --tasks tulu25` on each finished arm, and `jaxrl launch ...
    --sweep` adds one eval job per arm that waits for it. lm-eval reads each task's dataset from the local HF
    datasets cache (jaxrl/eval/suites.py says which); the AlpacaEval-style task is judged by a reward model
    (EVAL_JUDGE) against reference outputs (EVAL_ALPACA): see the README for how it differs from the paper."""
    return {
        "tasks": ["tulu25"],
        "judge": os.environ.get("TULU25_EVAL_JUDGE", REWARD_MODELS["13b_uf"]),
        "alpaca_file": os.environ.get("TULU25_EVAL_ALPACA", f"{PROMPT_ROOT}/alpaca_eval_reference.jsonl"),
    }


def metrics():
    """Table columns, each one a run of this study logs or its evaluation writes (tests/test_tulu25_metrics.py
    runs a tiny version of every stage and its evaluation, and checks): DPO's held-out loss and reward
    accuracy, the RM's held-out accuracy, PPO's rollout RM score and KL to the reference from training and
    on its held-out prompts, and each benchmark's headline score (harness/<task>, from evaluation())."""
    from jaxrl.eval import suites

    benchmarks = [f"harness/{t.task}" for t in suites.expand(list(evaluation()["tasks"]))]
    return [
        "eval/loss",
        "eval/rewards/accuracies",
        "eval/accuracy",
        "train/objective/scores",
        "train/objective/kl",
        "val/score",
        "val/kl",
        *benchmarks,
    ]


def large_rm(cfg: Config) -> Config:
    """The 70B reward-model variant of a config (for preflight of the large-RM arms)."""
    return override(cfg, {f"model.{k}": v for k, v in LLAMA2_70B.__dict__.items()})
