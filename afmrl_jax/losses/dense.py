"""Dense reference: the whole batch on one device, logits [B, B] ([B, B + M] with M mined columns)."""
from __future__ import annotations

import jax

from afmrl_jax.losses import blocks
from afmrl_jax.losses.config import AGCLConfig


def dense_direction(q, c, q_terms, c_terms, idf, avg_doc_len, config: AGCLConfig, mined=None, mined_terms=None):
  """One direction (rows q, columns c), normalised q, c [B, D]. Returns (per-row loss [B], sums).

  mined [M, D] (normalised), mined_terms [M, K]: extra negative columns after c, or None.
  """
  rows = blocks.make_rows(q, c, q_terms, c_terms, 0, idf, avg_doc_len, config)
  if mined is None:
    cols = blocks.Cols(c, c_terms, rows.ids)
  else:
    c_all, terms_all = blocks.extend_columns(c, c_terms, mined, mined_terms)
    cols = blocks.Cols(c_all, terms_all, blocks.column_ids(0, c.shape[0], c_all.shape[0]))
  logits, stats = blocks.block_logits(rows, cols, idf, avg_doc_len, config)
  per_row = jax.nn.logsumexp(logits, axis=1) - blocks.positive_logit(rows, c, config)
  return per_row, blocks.row_stats(stats, rows)
