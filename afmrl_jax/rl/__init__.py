"""afmrl_jax.rl: stage 2, retrieval-aware attribute reinforcement (GRPO on the attribute generator).

rl.algo: advantages, policy loss, KL estimators, masks, aggregation - pure functions of arrays that
import only jax (and afmrl_jax.fields for the config's checks). The retrieval reward and the rollouts
are in other modules. See docs/method.md, stage 2.
"""
from afmrl_jax.rl.algo import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    GRPOConfig,
    aggregate_loss,
    clipped_policy_loss,
    compute_advantages,
    eos_mask,
    group_advantages,
    grpo_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    mean_only_advantages,
    register,
    sequence_mean,
    token_mask,
    token_mean,
)

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "GRPOConfig",
    "KL_ESTIMATORS",
    "aggregate_loss",
    "clipped_policy_loss",
    "compute_advantages",
    "eos_mask",
    "group_advantages",
    "grpo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "mean_only_advantages",
    "register",
    "sequence_mean",
    "token_mask",
    "token_mean",
]
