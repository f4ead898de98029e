"""AGCL: attribute-guided contrastive loss (docs/method.md, stage 1), one entry point for all strategies.

  loss, metrics = agcl_loss(q, c, q_terms, c_terms, idf, avg_doc_len, AGCLConfig(),
                            strategy="ring", axis_names=("data", "fsdp"))

q, c: [B, D] query / candidate embeddings of the global batch (row i's positive is candidate i),
normalised inside (s_ij = cos). q_terms, c_terms: int32 [B, K] attribute term ids (0 = padding), or
None when the config uses no attributes. idf: float32 [V]; avg_doc_len: scalar (CorpusStats).

Mined hard negatives (optional keywords): mined [B, h, D] (h per query) or [M, D] embeddings, and
mined_terms [B, h, K'] / [M, K'], are M = B * h extra candidate columns: every query scores all
B + M columns, and a mined column is a negative for every row (never a positive), with its own BM25
bias, masks and metric counts. They are sharded like q (dimension 0 over `axis_names`): all_gather
gathers them with the candidates, ring sends them around with them. Gradients flow into mined.
The symmetric candidate->query direction does not use them (a mined column has no query of its own).
mined=None (or h = 0) gives exactly the loss without them.

strategy:
  'dense'       the whole [B, B] matrix on one device (reference; fine for small batches).
  'all_gather'  local rows x gathered global columns ([L, B] per device), as VLM2Vec.
  'ring'        candidates rotate around the devices (ppermute), [L, tile] logits tiles, online
                logsumexp, custom VJP: O(L * (tile + D)) memory per device, linear in B.
For 'all_gather' and 'ring' the batch dimension is split over the mesh axes `axis_names`; the mesh is
`mesh` or the one set with `jax.set_mesh`. All three give the same loss, metrics and gradients.
Inside your own `jax.shard_map`, call `agcl_loss_local` on the local shards instead.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from afmrl_jax.losses import blocks
from afmrl_jax.losses.all_gather import all_gather_direction
from afmrl_jax.losses.config import AGCLConfig
from afmrl_jax.losses.dense import dense_direction
from afmrl_jax.losses.ring import ring_direction

STRATEGIES = ("dense", "all_gather", "ring")
# Ring logits tile [L, 1024]: large enough for matmul efficiency, small enough that memory stays linear.
DEFAULT_TILE = 1024

__all__ = ["AGCLConfig", "STRATEGIES", "agcl_loss", "agcl_loss_local"]


def _fill_terms(terms, lead, config: AGCLConfig, name: str):
  """terms as int32, or a zero [*lead, 1] column when None and the config needs none."""
  if terms is not None:
    return jnp.asarray(terms, jnp.int32)
  if config.needs_bm25:
    raise ValueError(f"agcl_loss: {name} is None but the config needs attribute terms "
                     f"(bias_scale={config.bias_scale}, uniform_margin={config.uniform_margin}, mask={config.mask!r})")
  return jnp.zeros(tuple(lead) + (1,), jnp.int32)


def _attribute_inputs(q_terms, c_terms, idf, avg_doc_len, batch: int, config: AGCLConfig):
  """Term ids int32 [batch, K] (a [batch, 1] zero column when the config needs none), idf float32 [V]
  and avg_doc_len float32 [] with their neutral defaults."""
  q_terms = _fill_terms(q_terms, (batch,), config, "q_terms")
  c_terms = _fill_terms(c_terms, (batch,), config, "c_terms")
  idf = jnp.zeros((1,), jnp.float32) if idf is None else jnp.asarray(idf, jnp.float32)
  avg_doc_len = jnp.asarray(1.0 if avg_doc_len is None else avg_doc_len, jnp.float32)
  return q_terms, c_terms, idf, avg_doc_len


def _mined_inputs(q, mined, mined_terms, config: AGCLConfig):
  """(mined [..., D], mined_terms int32 [..., K']) checked, or (None, None) without mined columns."""
  if mined is None or mined.size == 0:
    if mined_terms is not None and mined is None:
      raise ValueError("agcl_loss: mined_terms given without mined")
    return None, None
  if mined.ndim not in (2, 3) or mined.shape[-1] != q.shape[-1]:
    raise ValueError(f"agcl_loss: mined {mined.shape} must be [B, h, D] or [M, D] with D = {q.shape[-1]}")
  if mined.ndim == 3 and mined.shape[0] != q.shape[0]:
    raise ValueError(f"agcl_loss: mined {mined.shape} is [B, h, D] but the batch is {q.shape[0]}")
  mined_terms = _fill_terms(mined_terms, mined.shape[:-1], config, "mined_terms")
  if mined_terms.shape[:-1] != mined.shape[:-1]:
    raise ValueError(f"agcl_loss: mined_terms {mined_terms.shape} must match mined {mined.shape} "
                     f"but for the last dimension")
  return mined, mined_terms


def agcl_loss_local(q, c, q_terms, c_terms, idf, avg_doc_len, config: AGCLConfig, *,
                    mined=None, mined_terms=None, strategy: str = "dense", axis_names: Sequence[str] = (),
                    tile_size: Optional[int] = DEFAULT_TILE):
  """Per-row losses [L] and metric sums of the local rows; for use inside `jax.shard_map`.

  With strategy 'all_gather' or 'ring' the mesh axes `axis_names` must be manual (inside shard_map)
  and the batch split over them in their order. The global loss is the mean of the per-row losses over
  all devices; `blocks.finalize_metrics(sums, global_batch, config.needs_bm25, global_batch + M)` gives
  the metrics (M: mined columns over all devices, 0 without).
  mined, mined_terms: this device's mined columns, [L, h, D] / [L, h, K'] or [M/P, D] / [M/P, K'].
  With `symmetric`, per-row losses are the mean of both directions (the candidate->query one without
  mined columns); `sums` describe query->candidate.
  Returns (per_row [L], per_row_q2c [L], sums).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"agcl_loss: strategy={strategy!r}, expected one of {STRATEGIES}")
  if strategy != "dense" and not axis_names:
    raise ValueError(f"agcl_loss: strategy={strategy!r} needs axis_names, the mesh axes the batch is split over")
  q_terms, c_terms, idf, avg_doc_len = _attribute_inputs(q_terms, c_terms, idf, avg_doc_len, q.shape[0], config)
  mined, mined_terms = _mined_inputs(q, mined, mined_terms, config)
  extra = {}
  if mined is not None:
    extra = {"mined": blocks.unit_rows(mined.reshape(-1, mined.shape[-1])),
             "mined_terms": mined_terms.reshape(-1, mined_terms.shape[-1])}
  q, c = blocks.unit_rows(q), blocks.unit_rows(c)
  if strategy == "dense":
    direction = dense_direction
  elif strategy == "all_gather":
    direction = functools.partial(all_gather_direction, axis_names=tuple(axis_names))
  else:
    direction = functools.partial(ring_direction, axis_names=tuple(axis_names), tile_size=tile_size)
  per_row, sums = direction(q, c, q_terms, c_terms, idf, avg_doc_len, config, **extra)
  q2c = per_row
  if config.symmetric:
    backward_dir, _ = direction(c, q, c_terms, q_terms, idf, avg_doc_len, config)
    per_row = 0.5 * (per_row + backward_dir)
  return per_row, q2c, sums


def agcl_loss(q, c, q_terms, c_terms, idf, avg_doc_len, config: Optional[AGCLConfig] = None, *,
              mined=None, mined_terms=None, strategy: str = "dense", axis_names: Sequence[str] = (),
              mesh=None, tile_size: Optional[int] = DEFAULT_TILE):
  """Mean AGCL loss over the global batch and a dict of scalar metrics. See the module docstring.

  tile_size: ring only: the local [L, C] block (C = L, or L + M/P with mined columns) is processed in
  [L, tile_size] column tiles (the largest divisor of C not above it), so per-device memory is linear
  in the batch; None: whole blocks.
  mined, mined_terms: hard-negative columns [B, h, D] / [B, h, K'] or [M, D] / [M, K'] (module
  docstring); None: none.
  Works eagerly and under `jax.jit`; gradients flow to q, c and mined only (bias and masks are
  stop-gradient). Metrics: loss, loss_q2c (and loss_c2q when symmetric), accuracy,
  masked_fraction, shared_fraction, bias_shared/unshared, weight_shared/unshared (blocks.finalize_metrics).
  """
  config = AGCLConfig() if config is None else config
  batch = q.shape[0]
  if c.shape != q.shape:
    raise ValueError(f"agcl_loss: q {q.shape} and c {c.shape} must have the same shape [B, D]")
  mined, mined_terms = _mined_inputs(q, mined, mined_terms, config)
  num_mined = 0 if mined is None else math.prod(mined.shape[:-1])

  def local(q, c, q_terms, c_terms, idf, avg_doc_len, *mined_args):
    extra = dict(zip(("mined", "mined_terms"), mined_args))
    return agcl_loss_local(q, c, q_terms, c_terms, idf, avg_doc_len, config, strategy=strategy,
                           axis_names=tuple(axis_names), tile_size=tile_size, **extra)

  mined_args = () if mined is None else (mined, mined_terms)
  if strategy == "dense":
    per_row, q2c, sums = local(q, c, q_terms, c_terms, idf, avg_doc_len, *mined_args)
  else:
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      raise ValueError(f"agcl_loss: strategy={strategy!r} needs a mesh (pass mesh= or use jax.set_mesh)")
    missing = [a for a in axis_names if a not in mesh.axis_names]
    if not axis_names or missing:
      raise ValueError(f"agcl_loss: axis_names={tuple(axis_names)} must name axes of the mesh "
                       f"{mesh.axis_names} (missing: {missing})")
    shards = 1
    for a in axis_names:
      shards *= mesh.shape[a]
    if batch % shards or (mined is not None and mined.shape[0] % shards):
      raise ValueError(f"agcl_loss: global batch {batch} (and mined rows {0 if mined is None else mined.shape[0]}) "
                       f"must be divisible by the {shards} devices of axes {tuple(axis_names)}")
    q_terms, c_terms, idf, avg_doc_len = _attribute_inputs(q_terms, c_terms, idf, avg_doc_len, batch, config)
    batch_spec = P(tuple(axis_names))
    args = (q, c, q_terms, c_terms, idf, avg_doc_len) + mined_args
    specs = (batch_spec,) * 4 + (P(), P()) + (batch_spec,) * len(mined_args)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      # Explicit axes: shard_map checks (does not change) input shardings, so put them in place.
      args = tuple(jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, s) if isinstance(mesh, jax.sharding.Mesh) else s)
                   for x, s in zip(args, specs))
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=specs,
        out_specs=(batch_spec, batch_spec, P()), axis_names=set(axis_names))
    per_row, q2c, sums = sharded(*args)
  metrics = blocks.finalize_metrics(sums, batch, config.needs_bm25, batch + num_mined)
  loss = jnp.mean(per_row)
  metrics["loss"] = loss
  metrics["loss_q2c"] = jnp.mean(q2c)
  if config.symmetric:
    metrics["loss_c2q"] = 2.0 * loss - metrics["loss_q2c"]
  return loss, metrics
