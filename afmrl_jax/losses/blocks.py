"""The AGCL logits of one block of rows (queries) against one block of columns (candidates).

Every strategy (dense, all_gather, ring) is built from `block_logits`, so they compute the same
numbers. Shapes: L rows, C columns, D embedding width, K attribute terms.

Row-side quantities the block needs (the positive's similarity s_ii, the positive candidate c_i,
B_ii) always live with the row, because row i and its positive candidate i sit on the same device.

Mined hard negatives are extra columns after a block's own candidates (`extend_columns`), with the id
MINED_ID, which no row has: they are scored, biased, masked and counted like any other negative.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from afmrl_jax.losses import bm25 as bm25_lib
from afmrl_jax.losses.config import AGCLConfig

# Masked logits: finite so that online logsumexp never computes inf - inf; exp() of it is exactly 0.
MASKED = -1e30
# Column id of a mined hard negative: row ids are 0..B-1, so a mined column is never a positive.
MINED_ID = -1


class Rows(NamedTuple):
  """Row side of the loss. q, pos: [L, D] L2-normalised; terms: [L, K] | None; ids: [L] global index.

  pos_sim [L] = s_ii, b_self [L] = B_ii, fingerprint [L, 2] (attribute mask) - all stop-gradient.
  term_counts [L, V]: the rows' term-count table when the BM25 algorithm uses one (bm25_impl).
  """
  q: jax.Array
  pos: jax.Array
  terms: Optional[jax.Array]
  ids: jax.Array
  pos_sim: jax.Array
  b_self: Optional[jax.Array]
  fingerprint: Optional[jax.Array]
  term_counts: Optional[jax.Array] = None
  bm25_impl: str = "compare"


class Cols(NamedTuple):
  """Column block: c [C, D] L2-normalised, terms [C, K] | None, ids [C] global index."""
  c: jax.Array
  terms: Optional[jax.Array]
  ids: jax.Array


def extend_columns(c, terms, mined, mined_terms):
  """Candidates c [C, D] followed by mined columns [M, D], and their terms [C, K] / [M, K'] likewise
  (the narrower padded with 0 to one width); (c, terms) themselves when mined is None."""
  if mined is None:
    return c, terms
  width = max(terms.shape[1], mined_terms.shape[1])
  pad = lambda t: jnp.pad(t, ((0, 0), (0, width - t.shape[1])))
  return jnp.concatenate([c, mined]), jnp.concatenate([pad(terms), pad(mined_terms)])


def column_ids(first, num_own: int, num_cols: int) -> jax.Array:
  """ids [num_cols] of an `extend_columns` block: first + 0..num_own-1 for its own candidates (global
  indices), MINED_ID for the num_cols - num_own mined columns after them."""
  own = first + jnp.arange(num_own, dtype=jnp.int32)
  if num_cols == num_own:
    return own
  return jnp.concatenate([own, jnp.full((num_cols - num_own,), MINED_ID, jnp.int32)])


def unit_rows(x: jax.Array) -> jax.Array:
  """Rows of x [N, D] at unit length in float32, as the loss has always computed them.

  `x * rsqrt(max(|x|^2, 1e-12))`: one multiply per element. It differs from the project's
  `vectors.l2_normalize` (`x / max(|x|, eps)`, torch's convention) only in the last bits, but those bits
  change every trained number downstream, so the loss keeps its own form.
  """
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def make_rows(q, c, q_terms, c_terms, row_offset, idf, avg_doc_len, config: AGCLConfig) -> Rows:
  """Rows for local queries q [L, D] whose positives are the local candidates c [L, D] (normalised)."""
  ids = row_offset + jnp.arange(q.shape[0], dtype=jnp.int32)
  pos_sim = jax.lax.stop_gradient(jnp.sum(q * c, axis=-1))
  b_self = fingerprint = counts = None
  impl = "compare"
  if config.needs_bm25:
    b_self = bm25_lib.bm25_diagonal(q_terms, c_terms, idf, avg_doc_len, config.k1, config.b)
    if config.mask == "attribute":
      fingerprint = bm25_lib.term_set_fingerprint(q_terms)
    # The count table is built once per row block and reused against every column block.
    impl = bm25_lib.resolve_impl(config.bm25_impl, q.shape[0], idf.shape[0])
    if impl != "compare":
      counts = bm25_lib.query_term_counts(q_terms, idf.shape[0])
  return Rows(q, jax.lax.stop_gradient(c), q_terms, ids, pos_sim, b_self, fingerprint, counts, impl)


def block_bm25(rows: Rows, cols: Cols, idf, avg_doc_len, config: AGCLConfig) -> jax.Array:
  """B [L, C] of the rows' attribute terms against the columns', stop-gradient."""
  weights = bm25_lib.doc_slot_weights(cols.terms, idf, avg_doc_len, config.k1, config.b)
  if rows.term_counts is None:
    raw = bm25_lib.bm25_from_weights(rows.terms, cols.terms, weights)
  else:
    raw = bm25_lib.bm25_from_counts(rows.term_counts, cols.terms, weights, rows.bm25_impl)
  return jax.lax.stop_gradient(raw)


def _self_ratio(raw: jax.Array, b_self: jax.Array) -> jax.Array:
  """B_ij / B_ii, 0 where B_ii = 0 (a query sharing nothing with its own positive)."""
  return jnp.where(b_self > 0, raw / jnp.where(b_self > 0, b_self, 1.0), 0.0)


def _bias_from_bm25(raw: jax.Array, b_self: jax.Array, is_pos: jax.Array, config: AGCLConfig) -> jax.Array:
  if config.bm25_norm == "self":
    normed = 2.0 * jnp.clip(_self_ratio(raw, b_self), 0.0, 1.0)
  else:
    normed = raw
  bias = config.bias_scale * jnp.tanh(normed)
  return jnp.where(is_pos, 0.0, bias) if config.bias_on == "negatives" else bias


def positive_bias(rows: Rows, config: AGCLConfig) -> jax.Array:
  """bias_ii [L]: the bias on each row's positive (0 unless bias_on == 'all' with BM25 weights)."""
  if not config.bias_uses_bm25 or config.bias_on == "negatives":
    return jnp.zeros(rows.q.shape[:1], jnp.float32)
  return _bias_from_bm25(rows.b_self, rows.b_self, jnp.zeros(rows.q.shape[:1], bool), config)


def positive_logit(rows: Rows, c_local: jax.Array, config: AGCLConfig) -> jax.Array:
  """l_ii [L] = s_ii / tau + bias_ii, differentiable in q and c_local (the rows' positives)."""
  return jnp.sum(rows.q * c_local, axis=-1) / config.tau + positive_bias(rows, config)


def block_logits(rows: Rows, cols: Cols, idf, avg_doc_len, config: AGCLConfig,
                 with_stats: bool = True):
  """Logits [L, C] of a block (masked entries = MASKED) and, if asked, its metric partial sums.

  Only s = q c^T carries gradient; bias and mask are stop-gradient.
  """
  sim = rows.q @ cols.c.T  # [L, C]
  is_pos = rows.ids[:, None] == cols.ids[None, :]
  raw = None
  if config.needs_bm25:
    raw = block_bm25(rows, cols, idf, avg_doc_len, config)
  if config.uniform_margin is not None:
    bias = jnp.where(is_pos, 0.0, jnp.float32(config.uniform_margin))
  elif config.bias_scale != 0.0:
    bias = _bias_from_bm25(raw, rows.b_self[:, None], is_pos, config)
  else:
    bias = jnp.zeros_like(sim)
  bias = jax.lax.stop_gradient(bias)
  mask = _mask(rows, cols, jax.lax.stop_gradient(sim), raw, config) & ~is_pos
  logits = jnp.where(mask, MASKED, sim / config.tau + bias)
  if not with_stats:
    return logits, None
  return logits, _block_stats(sim, bias, raw, mask, is_pos)


def _mask(rows: Rows, cols: Cols, sim, raw, config: AGCLConfig) -> jax.Array:
  if config.mask == "none":
    return jnp.zeros(sim.shape, bool)
  if config.mask == "margin":
    return sim > rows.pos_sim[:, None] + config.delta
  if config.mask == "positive":
    return jax.lax.stop_gradient(rows.pos @ cols.c.T) > config.delta
  # attribute: identical non-empty term sets, or self-normalised BM25 above the threshold.
  col_fp = bm25_lib.term_set_fingerprint(cols.terms)
  same = jnp.all(rows.fingerprint[:, None, :] == col_fp[None, :, :], axis=-1)
  same &= jnp.any(rows.terms != 0, axis=-1)[:, None]
  if config.mask_threshold is not None:
    same |= _self_ratio(raw, rows.b_self[:, None]) > config.mask_threshold
  return same


STAT_KEYS = ("masked", "shared", "bias_shared", "bias_unshared", "weight_shared", "weight_unshared")


def _block_stats(sim, bias, raw, mask, is_pos) -> dict:
  """Partial sums over the block's negatives, plus max unmasked negative similarity per row [L]."""
  neg = ~is_pos
  f = lambda x: jnp.sum(jnp.where(neg, x, 0.0).astype(jnp.float32))
  shared = (raw > 0) if raw is not None else jnp.zeros(sim.shape, bool)
  weight = jnp.exp(bias)
  stats = {
      "masked": f(mask.astype(jnp.float32)),
      "shared": f(shared.astype(jnp.float32)),
      "bias_shared": f(jnp.where(shared, bias, 0.0)),
      "bias_unshared": f(jnp.where(shared, 0.0, bias)),
      "weight_shared": f(jnp.where(shared, weight, 0.0)),
      "weight_unshared": f(jnp.where(shared, 0.0, weight)),
  }
  stats = jax.tree.map(jax.lax.stop_gradient, stats)
  max_neg = jnp.max(jnp.where(neg & ~mask, jax.lax.stop_gradient(sim), -jnp.inf), axis=1)
  return stats, max_neg


def empty_stats(like: jax.Array):
  """Identity element of merge_stats for rows like `like` [L] (whose shard_map varying type it takes)."""
  like = like.astype(jnp.float32)
  return ({k: jnp.zeros_like(like[0]) for k in STAT_KEYS}, jnp.full_like(like, -jnp.inf))


def merge_stats(a, b):
  (sa, ma), (sb, mb) = a, b
  return {k: sa[k] + sb[k] for k in STAT_KEYS}, jnp.maximum(ma, mb)


def row_stats(block_stats, rows: Rows):
  """Sums over rows: the block sums and the number of rows whose positive beats every negative."""
  sums, max_neg = block_stats
  sums = dict(sums)
  sums["correct"] = jnp.sum((rows.pos_sim > max_neg).astype(jnp.float32))
  return sums


def finalize_metrics(sums: dict, num_rows: int, has_bm25: bool, num_cols: Optional[int] = None) -> dict:
  """Metrics from global sums over num_rows rows against num_cols columns (default num_rows; with M
  mined columns num_rows + M), so num_rows * (num_cols - 1) negatives.

  accuracy: share of rows whose positive has the highest similarity among the unmasked candidates
    (in-batch top-1 retrieval, on s_ij: the bias is a training device, not a retrieval score).
  masked_fraction: share of negatives masked. shared_fraction: share of negatives with B_ij > 0.
  bias_shared / bias_unshared (and weight_* = mean exp(bias)): mean over negatives that share an
    attribute term with the query vs those that share none - whether the weights discriminate.
    Absent when the config computes no BM25 (unknown, and JSON has no NaN).
  """
  negatives = float(num_rows) * float((num_rows if num_cols is None else num_cols) - 1)
  out = {
      "accuracy": sums["correct"] / num_rows,
      "masked_fraction": sums["masked"] / max(negatives, 1.0),
  }
  if has_bm25:
    n_shared = sums["shared"]
    n_unshared = negatives - n_shared
    out["shared_fraction"] = n_shared / max(negatives, 1.0)
    for name in ("bias", "weight"):
      out[f"{name}_shared"] = sums[f"{name}_shared"] / jnp.maximum(n_shared, 1.0)
      out[f"{name}_unshared"] = sums[f"{name}_unshared"] / jnp.maximum(n_unshared, 1.0)
  return out
