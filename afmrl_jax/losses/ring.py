"""ring strategy: candidate blocks travel around the devices (ppermute); online logsumexp.

Runs inside `jax.shard_map` with the batch sharded over `axis_names` (P devices, L local rows).
At step t device p holds the candidates (and their attribute terms) of device (p - t) mod P, computes
the [L, L] logits block against its own rows, folds it into a running max / sum-of-exp per row and
passes the block on. Nothing of size L x N is ever formed; with `tile_size` the block itself is
processed in [L, tile] column tiles, so memory per device is O(L * (tile + D)): linear in the batch.

The gradient is a custom VJP (flash-attention style): the forward keeps only the per-row logsumexp;
the backward sends the candidates around again, recomputes each logits block, and sends along with
them an accumulator for their gradient, which is back home after P steps. The BM25 bias is
recomputed in the backward (it is never stored), so the backward costs about two forwards.

Mined hard negatives (local [M/P, D]) travel in the same block, after the device's L candidates
(`blocks.extend_columns`): the block is [L + M/P] columns, and so is its gradient accumulator.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from afmrl_jax.losses import blocks
from afmrl_jax.losses.config import AGCLConfig


def _axis_size(axis_names) -> int:
  return int(jax.lax.axis_size(axis_names))


def _rotate(tree, axis_names, size):
  perm = [(p, (p + 1) % size) for p in range(size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_names, perm), tree)


def _rows(q, c, q_terms, c_terms, idf, avg_doc_len, config, axis_names):
  index = jax.lax.axis_index(axis_names)
  return blocks.make_rows(q, c, q_terms, c_terms, index * q.shape[0], idf, avg_doc_len, config)


def _cols(c, c_terms, step, axis_names, size, local):
  """The column block held at `step`: it came from device (index - step) mod size, whose `local`
  candidates come first (any mined columns after them)."""
  source = (jax.lax.axis_index(axis_names) - step) % size
  return blocks.Cols(c, c_terms, blocks.column_ids(source * local, local, c.shape[0]))


def tile_width(local: int, tile_size) -> int:
  """Columns per tile: the largest divisor of the block's `local` columns not above tile_size (None:
  whole block)."""
  if tile_size is None or tile_size >= local:
    return local
  if tile_size <= 0:
    raise ValueError(f"agcl_loss: ring tile_size must be positive, got {tile_size}")
  return max(t for t in range(1, tile_size + 1) if local % t == 0)


def _split_tiles(cols: blocks.Cols, width: int) -> blocks.Cols:
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // width, width) + x.shape[1:]), cols)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def ring_logsumexp(config: AGCLConfig, axis_names, tile_size, q, c, q_terms, c_terms, idf, avg_doc_len,
                   mined=None, mined_terms=None):
  """(lse [L], metric partial sums) of the local rows against all N columns (N + M with the local
  mined [M/P, D] columns, or None). q, c [L, D], mined normalised."""
  out, _ = _ring_forward(config, axis_names, tile_size, q, c, q_terms, c_terms, idf, avg_doc_len,
                         mined, mined_terms)
  return out


def _ring_forward(config, axis_names, tile_size, q, c, q_terms, c_terms, idf, avg_doc_len, mined, mined_terms):
  size = _axis_size(axis_names)
  local = q.shape[0]
  block = blocks.extend_columns(c, c_terms, mined, mined_terms)
  width = tile_width(block[0].shape[0], tile_size)
  rows = _rows(q, c, q_terms, c_terms, idf, avg_doc_len, config, axis_names)

  def fold_tile(state, cols):
    m, s, stats = state
    logits, tile_stats = blocks.block_logits(rows, cols, idf, avg_doc_len, config)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
    return (m_new, s, blocks.merge_stats(stats, tile_stats)), None

  def fold_block(state, blk, step):
    tiles = _split_tiles(_cols(blk[0], blk[1], step, axis_names, size, local), width)
    return jax.lax.scan(fold_tile, state, tiles)[0]

  m0 = jnp.full_like(q[:, 0], -jnp.inf)  # *_like: keeps q's varying type under check_vma
  state = fold_block((m0, jnp.zeros_like(m0), blocks.empty_stats(m0)), block, 0)

  def body(carry, step):
    blk, state = carry
    blk = _rotate(blk, axis_names, size)
    return (blk, fold_block(state, blk, step)), None

  (_, (m, s, stats)), _ = jax.lax.scan(body, (block, state), jnp.arange(1, size))
  lse = m + jnp.log(s)
  sums = jax.lax.psum(blocks.row_stats(stats, rows), axis_names)
  return (lse, sums), (q, c, q_terms, c_terms, idf, avg_doc_len, mined, mined_terms, lse)


def _ring_backward(config, axis_names, tile_size, residuals, cotangents):
  q, c, q_terms, c_terms, idf, avg_doc_len, mined, mined_terms, lse = residuals
  g_lse = cotangents[0]
  size = _axis_size(axis_names)
  local = q.shape[0]
  block = blocks.extend_columns(c, c_terms, mined, mined_terms)
  width = tile_width(block[0].shape[0], tile_size)
  rows = _rows(q, c, q_terms, c_terms, idf, avg_doc_len, config, axis_names)
  scale = g_lse[:, None] / config.tau

  def tile_grads(dq, cols):
    logits, _ = blocks.block_logits(rows, cols, idf, avg_doc_len, config, with_stats=False)
    ds = jnp.exp(logits - lse[:, None]) * scale  # d lse_i / d s_ij = p_ij / tau; masked p = 0
    return dq + ds @ cols.c, ds.T @ q

  def body(carry, step):
    blk, dq = carry
    c_blk, t_blk, dc_blk = blk
    tiles = _split_tiles(_cols(c_blk, t_blk, step, axis_names, size, local), width)
    dq, dc_tiles = jax.lax.scan(tile_grads, dq, tiles)
    dc_blk = dc_blk + dc_tiles.reshape(dc_blk.shape)
    # After `size` rotations every accumulator is back on the device that owns its candidates.
    return (_rotate((c_blk, t_blk, dc_blk), axis_names, size), dq), None

  init = ((block[0], block[1], jnp.zeros_like(block[0])), jnp.zeros_like(q))
  ((_, _, dc), dq), _ = jax.lax.scan(body, init, jnp.arange(size))
  if mined is None:
    return dq, dc, None, None, None, None, None, None
  return dq, dc[:local], None, None, None, None, dc[local:], None


ring_logsumexp.defvjp(_ring_forward, _ring_backward)


def ring_direction(q, c, q_terms, c_terms, idf, avg_doc_len, config: AGCLConfig, axis_names,
                   tile_size=None, mined=None, mined_terms=None):
  """One direction on local normalised q, c [L, D] (and local mined [M/P, D] or None); returns
  (per-row loss [L], psum'd sums).

  tile_size: columns per logits tile ([L, tile] at a time); None: the whole [L, L + M/P] block.
  """
  lse, sums = ring_logsumexp(config, tuple(axis_names), tile_size, q, c, q_terms, c_terms, idf, avg_doc_len,
                             mined, mined_terms)
  rows = _rows(q, c, q_terms, c_terms, idf, avg_doc_len, config, axis_names)
  return lse - blocks.positive_logit(rows, c, config), sums
