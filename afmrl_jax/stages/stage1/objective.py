"""The stage-1 objective on a batch: embed both towers with the shared model, AGCL over the global batch.

Batch keys (docs/interfaces.md, data.pipeline): `{query,candidate}_input_ids [B,T]`,
`{query,candidate}_attention_mask [B,T]`, optional `{query,candidate}_pixel_values [B,P,Dp]`,
`{query,candidate}_terms [B,K]`. The image grid is static (one image size per config).

Two ways to get gradients, same numbers:
* `make_loss_fn`: plain autodiff through both towers (activations of the whole batch kept);
* `make_gradcache_grad_fn`: GradCache (`losses.grad_cache`): embed in chunks without activations,
  gradient of the loss w.r.t. the embeddings, re-run chunk by chunk. Chunks are taken *across* the
  batch shards (each chunk holds `chunk` rows of every device) so every device works on every chunk:
  `grad_cache` slices that way by itself on Explicit-axis meshes; on our Auto-axis mesh the rows are
  interleaved first (`interleave_shards`, a per-device layout change) so its contiguous chunks do it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afmrl_jax import parallel
from afmrl_jax.losses import agcl_loss, grad_cache
from afmrl_jax.eval import embed as embed_lib
from afmrl_jax.models import heads


def make_agcl(agcl_config, strategy: str, idf: np.ndarray | None, avg_doc_len: float,
              axis_names: Sequence[str] = parallel.BATCH_AXES) -> Callable:
  """loss(q [B,D], c [B,D], q_terms [B,K], c_terms [B,K], mined [B,h,D] = None, mined_terms [B,h,K] = None)
  -> (loss, metrics) on the global batch (mined: extra hard-negative candidate columns)."""
  idf = None if idf is None else jnp.asarray(idf, jnp.float32)
  names = () if strategy == "dense" else tuple(axis_names)

  def loss(q, c, q_terms, c_terms, mined=None, mined_terms=None):
    return agcl_loss(q, c, q_terms, c_terms, idf, avg_doc_len, agcl_config, mined=mined,
                     mined_terms=mined_terms, strategy=strategy, axis_names=names)

  return loss


def embed_mined(model, batch: Mapping[str, Any], image_grid_thw) -> tuple[jax.Array | None, jax.Array | None]:
  """(embeddings [B, h, D], terms [B, h, K]) of the batch's mined hard negatives (`mined_*` keys,
  [B, h, ...]); (None, None) without them."""
  if "mined_input_ids" not in batch:
    return None, None
  b, h = batch["mined_input_ids"].shape[:2]
  flat = {k: v.reshape((b * h,) + v.shape[2:]) for k, v in embed_lib.side(batch, "mined").items()}
  return heads.embed(model, flat, image_grid_thw).reshape(b, h, -1), embed_lib.terms(batch, "mined")


def make_loss_fn(agcl: Callable, image_grid_thw: tuple[int, int, int] | None) -> Callable:
  """loss_fn(model, batch) -> (loss, metrics) for `train.loop` (plain autodiff)."""

  def loss_fn(model, batch):
    q = heads.embed(model, embed_lib.side(batch, "query"), image_grid_thw)
    c = heads.embed(model, embed_lib.side(batch, "candidate"), image_grid_thw)
    mined, mined_terms = embed_mined(model, batch, image_grid_thw)
    return agcl(q, c, embed_lib.terms(batch, "query"), embed_lib.terms(batch, "candidate"), mined, mined_terms)

  return loss_fn


def interleave_shards(x: jax.Array, shards: int, chunk: int) -> jax.Array:
  """Reorders rows [B] so that consecutive blocks of `shards * chunk` rows take `chunk` rows from each
  batch shard: [shards, n, chunk] -> [n, shards, chunk]. A layout change local to each device."""
  b = x.shape[0]
  n = b // (shards * chunk)
  y = x.reshape((shards, n, chunk) + x.shape[1:])
  return jnp.swapaxes(y, 0, 1).reshape(x.shape)


def make_gradcache_grad_fn(graphdef: Any, agcl: Callable, image_grid_thw, chunk_per_device: int,
                           shards: int) -> Callable:
  """grad_fn(params, rest, batch) -> ((loss, metrics), grads) with GradCache (see module docstring).

  The AGCL loss is invariant to a common permutation of the batch rows, so reordering the rows for
  chunking changes nothing but the summation order.
  """
  def encode(params, chunk_side, rest):
    return heads.embed(nnx.merge(graphdef, params, rest), chunk_side, image_grid_thw)

  def grad_fn(params, rest, batch):
    mix = lambda tree: jax.tree.map(lambda x: interleave_shards(x, shards, chunk_per_device), tree)
    encode_chunk = lambda p, ch: encode(p, ch, rest)
    inputs = tuple(mix(embed_lib.side(batch, s)) for s in embed_lib.SIDES)
    q_terms, c_terms = (mix(embed_lib.terms(batch, s)) if embed_lib.terms(batch, s) is not None else None for s in embed_lib.SIDES)
    if "mined_input_ids" not in batch:
      return grad_cache(encode_chunk, agcl, chunk_size=chunk_per_device * shards)(params, inputs, q_terms, c_terms)
    # Mined negatives [B, h, ...] as a third input of B*h rows, encoded in chunks like the others: every
    # query scores every mined column, so their order does not matter to the loss.
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    mined = mix(jax.tree.map(flat, embed_lib.side(batch, "mined")))
    mined_terms = None if embed_lib.terms(batch, "mined") is None else mix(flat(embed_lib.terms(batch, "mined")))
    loss = lambda q, c, m, qt, ct, mt: agcl(q, c, qt, ct, m, mt)
    step = grad_cache(encode_chunk, loss, chunk_size=chunk_per_device * shards)
    return step(params, inputs + (mined,), q_terms, c_terms, mined_terms)

  return grad_fn


