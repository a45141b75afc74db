"""A tiny SFT -> RM -> DPO pipeline in the synthetic world (seconds per stage on a CPU).

jaxrl train --config experiments/tiny_pipeline.py --workdir runs/sft jaxrl train --config
experiments/tiny_pipeline.py --workdir runs/rm  --set stage=rm  --set train.init_from=runs/sft jaxrl train
--config experiments/tiny_pipeline.py --workdir runs/dpo --set stage=dpo --set train.init_from=runs/sft
"""

from jaxrl.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        stage="sft",
        model=ModelConfig(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, mlp=192),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.05),
        loss=LossConfig(name="dpo", beta=0.1),
        data=DataConfig(num_train=2048, num_eval=256, max_len=48, max_prompt_len=24),
        train=TrainConfig(steps=200, batch_size=32, log_every=20, checkpoint_every=100),
    )


def sweep():
    return [{"loss.name": name} for name in ("dpo", "ipo", "simpo")]


def metrics():
    return ["eval/loss", "eval/rewards/accuracies", "train/loss"]
