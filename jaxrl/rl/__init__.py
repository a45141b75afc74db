"""Online RL: KL estimators (kl), advantage estimators and aggregations (advantages), per-token losses
(losses), the pure objectives (objectives), the algorithm table (algorithms), the run's programs (programs),
what a run builds once (context) and the loop (runner)."""

from jaxrl.rl import advantages, kl, losses

__all__ = ["advantages", "kl", "losses"]
