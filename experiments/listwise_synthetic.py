"""Pairwise and listwise use of the same ranked data, in the synthetic world.

    jaxrl sweep experiments/listwise_synthetic.py --workdir runs/listwise

Every arm trains on the same preference data: 2048 prompts with four responses each, ranked by the clean
labeller (its Bradley-Terry labeller as a Plackett-Luce ranking, `jaxrl.synthetic.make_ranked_dataset`;
the data report states the flip and tie rates against gold). The arms differ only in how they use a list:
  dpo, best_vs_random   one pair per list (the best against a random other), as binarised datasets are made
  dpo, all_pairs        every pair of the list (six per list: more pairs, each list weighted six times)
  pl_dpo                the Plackett-Luce likelihood of the whole ranking (the DPO paper's appendix A.3)
  list_mle              ListMLE (LiPO's list-MLE baseline; with distinct ranks equal to pl_dpo)
  lipo_lambda           LiPO-lambda: pairwise logistic terms weighted by lambda (DCG gain and rank) weights
from one SFT base, with the unpacking study's measurement (test gold of sampled responses with intervals,
paired against the base, KL, validation curves). One seed, fixed recipes (beta 1, lr 5e-4, the unpacking
study's default DPO recipe); `--set seed=N` for another. With four responses per list the all-pairs arm sees
six times the pairs of best_vs_random for the same prompts.
"""

import importlib.util
from pathlib import Path

from jaxrl.config import Config, override

_spec = importlib.util.spec_from_file_location(
    "unpacking_synthetic", Path(__file__).with_name("unpacking_synthetic.py")
)
_unpacking = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_unpacking)

LIST_SIZE = 4
RECIPE = {"loss.beta": 1.0, "optim.lr": 5e-4}


def get_config() -> Config:
    return override(_unpacking.get_config(), {"data.list_size": LIST_SIZE, "data.synthetic_kind": "clean"})


def sft_config(cfg: Config) -> Config:
    """The unpacking study's SFT base (its data are demonstrations, not lists)."""
    return override(_unpacking.sft_config(cfg), {"data.list_size": 0, "data.binarize": "best_vs_random"})


def sweep():
    arms = [
        {"loss.name": "dpo", "data.binarize": "best_vs_random"},
        {"loss.name": "dpo", "data.binarize": "all_pairs"},
    ]
    arms += [{"loss.name": name} for name in ("pl_dpo", "list_mle", "lipo_lambda")]
    return [{**arm, **RECIPE, "seed": 0} for arm in arms]


def metrics():
    return [
        "eval/gold_reward",
        "eval/gold_reward_delta",
        "eval/gold_reward_greedy",
        "eval/kl",
        "eval/rewards/accuracies",
        "eval/loss",
    ]
