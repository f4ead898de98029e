"""all_gather strategy (as VLM2Vec): local rows against the gathered global columns, logits [L, N].

Runs inside `jax.shard_map` with the batch sharded over `axis_names`. Memory per device is
O(L * N): simple and fast while L * N fits; `ring` is the strategy for larger global batches.
The backward pass of `all_gather` is a reduce-scatter, so each device gets its own columns' gradient.
Mined columns (local [M/P, D]) are gathered too and follow the N candidates: logits [L, N + M].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from afmrl_jax.losses import blocks
from afmrl_jax.losses.config import AGCLConfig


def all_gather_direction(q, c, q_terms, c_terms, idf, avg_doc_len, config: AGCLConfig, axis_names,
                         mined=None, mined_terms=None):
  """One direction on local normalised q, c [L, D] (and local mined [M/P, D] or None); returns
  (per-row loss [L], psum'd sums)."""
  local = q.shape[0]
  index = jax.lax.axis_index(axis_names)
  rows = blocks.make_rows(q, c, q_terms, c_terms, index * local, idf, avg_doc_len, config)
  gather = lambda x: None if x is None else jax.lax.all_gather(x, axis_names, axis=0, tiled=True)
  c_all, terms_all = gather(c), gather(c_terms)
  num_own = c_all.shape[0]
  c_all, terms_all = blocks.extend_columns(c_all, terms_all, gather(mined), gather(mined_terms))
  cols = blocks.Cols(c_all, terms_all, blocks.column_ids(0, num_own, c_all.shape[0]))
  logits, stats = blocks.block_logits(rows, cols, idf, avg_doc_len, config)
  per_row = jax.nn.logsumexp(logits, axis=1) - blocks.positive_logit(rows, c, config)
  return per_row, jax.lax.psum(blocks.row_stats(stats, rows), axis_names)
