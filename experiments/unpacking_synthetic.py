"""The four-factor study ("Unpacking DPO and PPO") in the synthetic world, where the gold reward is known.

    jaxrl sweep experiments/unpacking_synthetic.py --workdir runs/unpacking --workers 2            # default
    jaxrl sweep experiments/unpacking_synthetic.py --workdir runs/unpacking_full --full --workers 2

(`--workers 2`: two sweep processes share the workdir, which on a 2-core machine runs the study about 1.4x
faster than one; the results are the same.)

The factors:
  data         preference datasets of stated quality: clean (no gold ties), noisy (flipped labels),
               length_biased, math_only, and on_policy (two samples of the SFT base per prompt, labelled by
               the clean labeller); each run's data report gives its measured flip rate, tie rate and length
               bias;
  algorithm    the DPO family (offline, on the dataset) and PPO (online, rewarded by a reward model trained on
               the dataset), plus GRPO and online DPO arms;
  reward model two sizes per dataset: "small" (the policy's size, from the policy's SFT base) and "large"
               (4 layers, width 128, from an SFT base of its own size);
  prompts      three policy-training prompt sets for the online arms (in_domain, math_heavy, mixed).

How the study measures (fixed before any preference run, the same for every arm):
  - the primary metric is the mean gold reward of sampled responses (8 per prompt at temperature 0.7, the
    temperature the online arms sample at; one temperature for every arm) on the test split (144 prompts per
    domain, every domain weighted equally; 96 left the most spread-out arms of an earlier record at a per-seed
    95% half-width up to 0.023, over the 0.02 aimed at), with its standard error; greedy gold beside it; KL to
    the SFT base from the same samples (both at that temperature); each arm's paired difference against the
    same seed's SFT base (same prompts, same sampling keys) as `eval/gold_reward_delta`;
  - every policy run evaluates on the validation split (48 prompts per domain, disjoint by text from test)
    during training: those curves are plotted against KL, with the SFT base's best-of-N frontier;
  - the SFT base measures the ceilings: best-of-N on gold for N = 1, 4, 16, 64 with their KL bounds;
  - every reward model is judged by the use the study makes of it: best-of-N on its init_from base's samples
    picked by the RM and scored by gold (eval/proxy_best_of_N, the same draws as the base's gold ceilings),
    and its accuracy on those samples' pairs (eval/sample_ranking_accuracy); the small RMs start from the
    policy's SFT base, so theirs is the policy's over-optimisation curve, the large ones from a base of their
    own size;
  - with --full, every algorithm has a recipe grid of the same size (four settings), searched on seed 0 on
    the algorithm's reference arm (`recipe_arm`: clean data for each DPO-family loss, the clean small reward
    model on in-domain prompts for PPO; GRPO, online DPO and gold-reward PPO are their own): one recipe per
    algorithm across the data, reward-model and prompt factors, as the paper fixes one per algorithm. The
    setting and checkpoint with the best validation gold is rerun with seeds 1, 2, 3 on every arm of that
    algorithm, and only those runs' test scores enter the table (`jaxrl.sweep.run_sweep`). Reward models
    have a learning-rate grid of four, searched first on the clean reward model of each size and selected by
    validation best-of-16 by the RM (scored by gold): every reward model of that size, in the search and in
    the fresh-seed runs, is trained with it. The default grid runs fixed recipes.

The SFT base is chosen by algorithm-neutral criteria: it is trained until its held-out NLL on demonstrations
stops falling (750 steps; 250 left it under-trained: held-out NLL 1.79 vs 1.55, and every domain's gold
lower), so that preference learning is not measured against an unfinished SFT.
"""

import itertools

from jaxrl.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig, override

DATASETS = ("clean", "noisy", "math_only", "length_biased", "on_policy")
PROMPT_SETS = ("in_domain", "math_heavy", "mixed")
LOSSES = ("dpo", "ipo", "simpo")
RM_SIZES = {
    "small": {},
    "large": {"model.hidden": 128, "model.layers": 4, "model.mlp": 384},
}

# The recipe grids, four settings per algorithm. The DPO family varies the strength of its regulariser and the
# learning rate (SimPO's beta lives on another scale: 2-10 in its paper); the online algorithms vary the KL
# coefficient and the learning rate.
OFFLINE_GRID = {
    "dpo": [{"loss.beta": b, "optim.lr": lr} for b, lr in itertools.product((0.1, 1.0), (1e-4, 5e-4))],
    "ipo": [{"loss.beta": b, "optim.lr": lr} for b, lr in itertools.product((0.1, 1.0), (1e-4, 5e-4))],
    "simpo": [{"loss.beta": b, "optim.lr": lr} for b, lr in itertools.product((2.0, 10.0), (1e-4, 5e-4))],
}
ONLINE_GRID = [{"rl.kl_coef": kl, "optim.lr": lr} for kl, lr in itertools.product((0.02, 0.1), (1e-4, 3e-4))]
# Reward models vary the learning rate (the default grid's 1e-3 among them), one recipe per model size.
RM_GRID = [{"optim.lr": lr} for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
# The default grid's fixed recipes.
OFFLINE_RECIPE = {"loss.beta": 1.0, "optim.lr": 5e-4}
ONLINE_RECIPE = {"rl.kl_coef": 0.05, "optim.lr": 3e-4}

# The Tulu 2.5 PPO recipe scaled down (as in experiments/rl_synthetic.py, whose docstring lists what was kept
# and what was changed for a 0.1M-parameter model): KL in the reward (k1), temperature 0.7, gamma 1, lambda
# 0.95, clip 0.2, value clip 0.2, value coefficient 0.1, whitened advantages, one rollout per prompt, the
# value model initialised from the reward model; constant lr after 10% warmup; rollout batches of 32, two
# epochs of minibatches of 16; missing-EOS penalty -1. 96 iterations (32 left the gold-reward arm still
# rising).
_ONLINE = {
    "optim.schedule": "constant",
    "optim.warmup_ratio": 0.1,
    "train.steps": 96,
    "train.log_every": 8,
    "train.eval_every": 16,
    "train.checkpoint_every": 32,
    "rl.num_prompts": 2048,
    "rl.rollout_batch": 32,
    "rl.minibatch": 16,
    "rl.epochs": 2,
    "rl.max_new_tokens": 16,
    "rl.temperature": 0.7,
    "rl.missing_eos_penalty": -1.0,
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
    "rm": {"optim.lr": 1e-3},
    "ppo": _ONLINE,
    "grpo": {**_ONLINE, "rl.samples_per_prompt": 4, "rl.rollout_batch": 8},
    "online_dpo": {**_ONLINE, "rl.samples_per_prompt": 2, "rl.rollout_batch": 16, "rl.minibatch": 16},
}


def get_config() -> Config:
    return Config(
        stage="dpo",
        model=ModelConfig(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, mlp=192),
        optim=OptimConfig(lr=5e-4, warmup_ratio=0.1, schedule="linear"),
        loss=LossConfig(name="dpo", beta=1.0),
        data=DataConfig(
            num_train=2048,
            num_eval=256,
            max_len=48,
            max_prompt_len=24,
            eval_prompts_per_domain=144,
            val_prompts_per_domain=48,
            eval_samples=8,
            eval_temperature=0.7,
            eval_best_of=64,
        ),
        train=TrainConfig(
            steps=120, batch_size=32, log_every=20, eval_every=30, checkpoint_every=60, tensorboard=False
        ),
    )


def stage_defaults(stage: str) -> dict:
    """Settings of a stage, applied before a point's overrides (so they stay out of the run ids)."""
    return dict(_STAGE_DEFAULTS.get(stage, {}))


def sft_config(cfg: Config) -> Config:
    """The shared SFT base of a sweep point (same model and seed; imperfect demonstrations), trained until its
    held-out NLL stops falling."""
    return override(
        cfg,
        {
            "stage": "sft",
            "loss.name": "dpo",
            "loss.beta": 1.0,
            "loss.label_smoothing": 0.0,
            "loss.gamma": 0.0,
            "data.synthetic_kind": "clean",
            "optim.lr": 3e-3,
            "optim.schedule": "cosine",
            "train.steps": 750,
            "train.eval_every": 0,
            "train.log_every": 50,
            "train.checkpoint_every": 250,
            "train.init_from": "",
        },
    )


def rm_point(data: str, size: str, seed: int) -> dict:
    """The sweep point of a reward model trained on one dataset."""
    return {"stage": "rm", "data.synthetic_kind": data, **RM_SIZES[size], "seed": seed}


def reward_model(point: dict):
    """The reward-model point an online point's `rl.reward_model` ("<dataset>-<size>") names, or None."""
    name = point.get("rl.reward_model", "")
    if not name:
        return None
    data, _, size = name.rpartition("-")
    if data not in DATASETS or size not in RM_SIZES:
        raise ValueError(
            f"rl.reward_model {name!r}: expected <dataset>-<size> with a dataset in {DATASETS} "
            f"and a size in {tuple(RM_SIZES)}"
        )
    return rm_point(data, size, point.get("seed", 0))


def online_point(stage: str, rm: str, prompts: str) -> dict:
    return {"stage": stage, "rl.reward_model": rm, "rl.prompt_set": prompts}


GOLD_PPO = {"stage": "ppo", "rl.verifiable": "gold", "rl.value_init": "policy", "rl.prompt_set": "in_domain"}


def _full_arms() -> list[dict]:
    arms = [
        {"data.synthetic_kind": data, "loss.name": loss} for data, loss in itertools.product(DATASETS, LOSSES)
    ]
    # On-policy data is sampled from a run's init_from: only the small reward model starts from the policy.
    arms += [
        online_point("ppo", rm, "in_domain")
        for rm in ("clean-small", "clean-large", "noisy-small", "on_policy-small")
    ]
    arms += [online_point("ppo", "clean-small", prompts) for prompts in ("math_heavy", "mixed")]
    arms += [online_point(stage, "clean-small", "in_domain") for stage in ("grpo", "online_dpo")]
    return arms + [GOLD_PPO]


def _default_points() -> list[dict]:
    """The default grid, seed 0, fixed recipes: DPO on three datasets, PPO with the clean reward model, and
    PPO on the gold reward (the ceiling an online arm can reach)."""
    points = [
        {"data.synthetic_kind": data, "loss.name": "dpo", **OFFLINE_RECIPE, "seed": 0}
        for data in ("clean", "noisy", "on_policy")
    ]
    points.append(rm_point("clean", "small", 0))
    points.append({**online_point("ppo", "clean-small", "in_domain"), **ONLINE_RECIPE, "seed": 0})
    points.append({**GOLD_PPO, **ONLINE_RECIPE, "seed": 0})
    return points


def sweep(full: bool = False):
    return _full_arms() if full else _default_points()


def search(arm: dict) -> list[dict] | None:
    """The recipe grid of an arm of the full study; None for the default grid's (fixed recipe and seed)."""
    if "seed" in arm:
        return None
    if arm.get("stage") == "rm":
        return RM_GRID
    if arm.get("stage") in ("ppo", "grpo", "online_dpo"):
        return ONLINE_GRID
    return OFFLINE_GRID[arm["loss.name"]]


def recipe_arm(arm: dict) -> dict:
    """The arm whose search chooses `arm`'s recipe: one recipe per algorithm (see the module's docstring)."""
    if arm.get("stage", "dpo") in ("dpo", "rm"):  # a reward model's: the clean one of its size
        return {**arm, "data.synthetic_kind": "clean"}
    if arm.get("stage") == "ppo" and arm.get("rl.reward_model"):
        return online_point("ppo", "clean-small", "in_domain")
    return dict(arm)


def selection() -> dict:
    # A reward model is selected by the use the study makes of it: best-of-16 by the RM on its SFT base's
    # validation samples, scored by gold.
    return {
        "search_seed": 0,
        "seeds": [1, 2, 3],
        "metric": "val/gold_reward",
        "metrics": {"rm": "val/proxy_best_of_16"},
    }


def findings(rows: list[dict]) -> list[dict]:
    """The paper's headline claims beside what this study measured (test gold, 95% intervals)."""
    from jaxrl.results import compare, verdict

    dpo = lambda data: {"stage": "dpo", "data.synthetic_kind": data, "loss.name": "dpo"}
    ppo = lambda rm, prompts="in_domain": {"stage": "ppo", "rl.reward_model": rm, "rl.prompt_set": prompts}
    measured = {
        "data": compare(rows, dpo("clean"), dpo("noisy")),
        "algorithm": compare(rows, ppo("clean-small"), dpo("clean")),
        "reward model": compare(rows, ppo("clean-large"), ppo("clean-small")),
        "prompts": compare(
            rows, ppo("clean-small", "math_heavy"), ppo("clean-small"), "eval/gold_reward/math"
        ),
    }
    out = [
        {
            "claim": "preference data quality matters: clean beats noisy pairs (DPO)",
            "what": "clean - noisy",
            "result": measured["data"],
            "verdict": verdict(measured["data"]),
        },
        {
            "claim": "PPO beats DPO (clean data, its reward model)",
            "what": "PPO - DPO",
            "result": measured["algorithm"],
            "verdict": verdict(measured["algorithm"]),
        },
        {
            "claim": "a larger reward model helps (PPO)",
            "what": "large - small RM",
            "result": measured["reward model"],
            "verdict": verdict(measured["reward model"]),
        },
    ]
    math_large = compare(rows, ppo("clean-large"), ppo("clean-small"), "eval/gold_reward/math")
    out.append(
        {
            "claim": "... and mainly in math",
            "what": "large - small RM, math",
            "result": math_large,
            "verdict": verdict(math_large),
        }
    )
    out.append(
        {
            "claim": "targeted prompts help their domain (math-heavy prompts, math gold)",
            "what": "math_heavy - in_domain, math",
            "result": measured["prompts"],
            "verdict": verdict(measured["prompts"]),
        }
    )
    for name in ("on_policy", "length_biased"):
        result = compare(rows, dpo(name), dpo("clean"))
        out.append(
            {
                "claim": f"(open question) {name} vs clean preference data (DPO)",
                "what": f"{name} - clean",
                "result": result,
                "verdict": "measured" if result else "cannot tell",
            }
        )
    # The ordering: each factor's effect size; adjacent factors are ordered only when their intervals part.
    sizes = {k: v for k, v in measured.items() if v is not None and v["ci95"] is not None}
    order = ("data", "algorithm", "reward model", "prompts")
    if len(sizes) == len(order):
        bounds = {
            k: (abs(v["difference"]) - v["ci95"], abs(v["difference"]) + v["ci95"]) for k, v in sizes.items()
        }
        pairs = list(zip(order, order[1:], strict=False))
        if all(bounds[a][0] > bounds[b][1] for a, b in pairs):
            ordering = "agrees"
        elif any(bounds[a][1] < bounds[b][0] for a, b in pairs):
            ordering = "disagrees"
        else:
            ordering = "cannot tell"
        text = ", ".join(f"{k} {abs(sizes[k]['difference']):.3f}" for k in order)
    else:
        ordering, text = "cannot tell", "not every factor measured"
    out.insert(
        0,
        {
            "claim": "effect sizes order: data > algorithm > reward model > prompts",
            "what": text,
            "result": None,
            "verdict": ordering,
        },
    )
    return out


def metrics():
    return [
        "eval/gold_reward",
        "eval/gold_reward_delta",
        "eval/gold_reward_greedy",
        "eval/kl",
        "eval/gold_reward/math",
        "eval/gold_reward/instruct",
        "eval/gold_reward/safety",
        "eval/gold_reward/chat",
        "eval/best_of_16",
        "eval/best_of_64",
        "eval/accuracy",
        "eval/ranking_accuracy",
        "eval/nll_per_token",
        "eval/proxy_best_of_16",
        "eval/proxy_best_of_64",
        "eval/sample_ranking_accuracy",
    ]
