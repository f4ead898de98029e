"""afmrl_jax.losses: the AGCL loss (dense / all_gather / ring), on-device BM25, GradCache.

Imports only jax, numpy and optax, so other projects can use the loss without the rest of afmrl_jax's
dependencies. See docs/agcl_loss.md.
"""
from afmrl_jax.losses.agcl import STRATEGIES, agcl_loss, agcl_loss_local
from afmrl_jax.losses.blocks import finalize_metrics
from afmrl_jax.losses.bm25 import bm25_scores, term_set_fingerprint
from afmrl_jax.losses.config import AGCLConfig
from afmrl_jax.losses.gradcache import grad_cache

__all__ = [
    "AGCLConfig",
    "STRATEGIES",
    "agcl_loss",
    "agcl_loss_local",
    "bm25_scores",
    "finalize_metrics",
    "grad_cache",
    "term_set_fingerprint",
]
