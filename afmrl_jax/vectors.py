"""`l2_normalize`: the row normalisation of embeddings (models, CLIP) and retrieval.

Imports only numpy and jax, so every layer (losses included) may use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x, eps: float = 1e-12):
  """Rows scaled to unit length along the last axis, in float32; zero rows stay zero.

  `x / max(|x|, eps)`, as torch.nn.functional.normalize. A jax array (or tracer) is computed in jax, a
  NumPy array in NumPy, so host-side retrieval code never touches a device.
  """
  if isinstance(x, jax.Array):  # tracers are jax.Arrays too
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  x = np.asarray(x, dtype=np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
