"""Dense reference: the whole batch on one device, logits [B, B]."""
from __future__ import annotations

import jax

from afmrl_jax.losses import blocks
from afmrl_jax.losses.config import AGCLConfig


def dense_direction(q, c, q_terms, c_terms, idf, avg_doc_len, config: AGCLConfig):
  """One direction (rows q, columns c), normalised q, c [B, D]. Returns (per-row loss [B], sums)."""
  rows = blocks.make_rows(q, c, q_terms, c_terms, 0, idf, avg_doc_len, config)
  cols = blocks.Cols(c, c_terms, rows.ids)
  logits, stats = blocks.block_logits(rows, cols, idf, avg_doc_len, config)
  per_row = jax.nn.logsumexp(logits, axis=1) - blocks.positive_logit(rows, c, config)
  return per_row, blocks.row_stats(stats, rows)
