"""Evaluation of real models through EleutherAI's lm-evaluation-harness, run by jaxrl's own sharded forward
and KV-cache sampler.

- `jaxrl.eval.model`: a jaxrl run directory or an HF checkpoint directory loaded for evaluation (params on the
  mesh, the tokenizer beside them).
- `jaxrl.eval.backend`: the lm-eval model backend, registered as "jaxrl" (needs `pip install -e ".[eval]"`).
- `jaxrl.eval.harness`: `jaxrl eval` (one results file per task, so a rerun skips finished tasks).
- `jaxrl.eval.suites`: named task suites, the Tulu 2.5 evaluation among them, with their exact settings.
- `jaxrl.eval.rm_eval`: `jaxrl eval-rm`, reward-model accuracy (RewardBench's format and weighting:
  `rm_data`, `rewardbench`) and best-of-N, scored by `rm_scorer`.
"""
