"""Exact top-k by inner product, blockwise so that no [Q, N] score matrix is ever materialised."""

from __future__ import annotations

import os

import numpy as np

from afmrl_jax.retrieval.base import check_ids, read_meta, unit_rows, write_meta


def exact_top_k(queries: np.ndarray, gallery: np.ndarray, k: int, *, query_block: int = 1024,
                gallery_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery rows by inner product for each query.

  Memory is O(query_block * (gallery_block + k)) whatever Q and N are: each query block keeps a
  running top-k that is merged with every gallery block's scores.

  Args:
    queries: [Q, D]; gallery: [N, D] (not normalised here: the caller decides).
    k: results per query, 1 <= k <= N.
  Returns:
    (indices int64 [Q, k] into gallery rows, scores float32 [Q, k]), best first; equal scores keep the
    smaller gallery index first (except that among rows tied exactly at the k-th score of one block,
    which ones survive that block's partition is up to NumPy, deterministically).
  """
  queries = np.asarray(queries, dtype=np.float32)
  gallery = np.asarray(gallery, dtype=np.float32)
  n = gallery.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"exact_top_k: k={k} must be in [1, {n}] (the gallery size).")
  if queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"exact_top_k: query width {queries.shape[1]} != gallery width {gallery.shape[1]}.")
  out_idx = np.empty((queries.shape[0], k), np.int64)
  out_score = np.empty((queries.shape[0], k), np.float32)
  for q0 in range(0, queries.shape[0], query_block):
    qb = queries[q0:q0 + query_block]
    best_idx = np.empty((qb.shape[0], 0), np.int64)
    best_score = np.empty((qb.shape[0], 0), np.float32)
    for g0 in range(0, n, gallery_block):
      scores = qb @ gallery[g0:g0 + gallery_block].T  # [q, g]
      idx = np.broadcast_to(np.arange(g0, g0 + scores.shape[1]), scores.shape)
      if scores.shape[1] > k:  # keep the block's k best (linear time) before the exact sort
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        idx = np.take_along_axis(idx, part, axis=1)
      cand_score = np.concatenate([best_score, scores], axis=1)
      cand_idx = np.concatenate([best_idx, idx], axis=1)
      # Sort by score, then by the smaller gallery index on ties.
      order = np.lexsort((cand_idx, -cand_score), axis=1)[:, :k]
      best_score = np.take_along_axis(cand_score, order, axis=1)
      best_idx = np.take_along_axis(cand_idx, order, axis=1)
    out_idx[q0:q0 + query_block] = best_idx
    out_score[q0:q0 + query_block] = best_score
  return out_idx, out_score


def _jax_scan_top_k():
  """Builds (once) the jitted per-query-block scan over gallery blocks; jax is imported lazily."""
  global _JAX_SCAN
  if _JAX_SCAN is None:
    import functools

    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def scan_top_k(qb, blocks, k, n):
      """qb [q, D], blocks [nb, gb, D] (zero-padded past row n) -> (scores [q, k], rows [q, k])."""
      gb = blocks.shape[1]

      def step(carry, xs):
        best_s, best_i = carry
        block, start = xs
        s = jnp.einsum("qd,gd->qg", qb, block, precision=jax.lax.Precision.HIGHEST)
        idx = start + jnp.arange(gb, dtype=jnp.int32)
        s = jnp.where(idx[None, :] < n, s, -jnp.inf)
        # Running best first: top_k keeps the lower position first on ties, i.e. the smaller row.
        cand_s = jnp.concatenate([best_s, s], axis=1)
        cand_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, s.shape)], axis=1)
        top_s, pos = jax.lax.top_k(cand_s, k)
        return (top_s, jnp.take_along_axis(cand_i, pos, axis=1)), None

      init = (jnp.full((qb.shape[0], k), -jnp.inf, qb.dtype), jnp.full((qb.shape[0], k), -1, jnp.int32))
      starts = jnp.arange(blocks.shape[0], dtype=jnp.int32) * gb
      (scores, rows), _ = jax.lax.scan(step, init, (blocks, starts))
      return scores, rows

    _JAX_SCAN = scan_top_k
  return _JAX_SCAN


_JAX_SCAN = None


def exact_top_k_jax(queries: np.ndarray, gallery: np.ndarray, k: int, *, query_block: int = 1024,
                    gallery_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """`exact_top_k` on the default JAX device (GPU/TPU): a jitted `lax.scan` over gallery blocks.

  Same contract and tie order as `exact_top_k`; blocks are padded to fixed shapes so one compilation
  serves every block. Memory on device: the gallery plus O(query_block * (gallery_block + k)).
  """
  import jax.numpy as jnp

  queries = np.asarray(queries, dtype=np.float32)
  gallery = np.asarray(gallery, dtype=np.float32)
  n, d = gallery.shape
  if not 1 <= k <= n:
    raise ValueError(f"exact_top_k_jax: k={k} must be in [1, {n}] (the gallery size).")
  if queries.shape[1] != d:
    raise ValueError(f"exact_top_k_jax: query width {queries.shape[1]} != gallery width {d}.")
  gb = min(gallery_block, n)
  nb = -(-n // gb)
  blocks = np.zeros((nb * gb, d), np.float32)
  blocks[:n] = gallery
  blocks = jnp.asarray(blocks.reshape(nb, gb, d))
  qbs = min(query_block, queries.shape[0])
  scan = _jax_scan_top_k()
  out_idx, out_score = [], []
  for q0 in range(0, queries.shape[0], qbs):
    qb = queries[q0:q0 + qbs]
    rows = qb.shape[0]
    if rows < qbs:  # pad the last query block: same shape, no recompilation
      qb = np.concatenate([qb, np.zeros((qbs - rows, d), np.float32)])
    scores, idx = scan(jnp.asarray(qb), blocks, k, n)
    out_score.append(np.asarray(scores)[:rows])
    out_idx.append(np.asarray(idx)[:rows].astype(np.int64))
  return np.concatenate(out_idx), np.concatenate(out_score)


class ExactRetriever:
  """Brute-force inner-product search over L2-normalised embeddings (the reference for ScaNN).

  backend: 'numpy' (host BLAS) or 'jax' (the default JAX device; worth it on a GPU/TPU).
  """

  kind = "exact"

  def __init__(self, query_block: int = 1024, gallery_block: int = 8192, backend: str = "numpy"):
    if backend not in ("numpy", "jax"):
      raise ValueError(f"ExactRetriever backend must be 'numpy' or 'jax', got {backend!r}.")
    self.query_block = query_block
    self.gallery_block = gallery_block
    self.backend = backend
    self.embeddings: np.ndarray | None = None
    self.ids: np.ndarray | None = None

  def build(self, embeddings: np.ndarray, ids: np.ndarray | None = None) -> "ExactRetriever":
    self.embeddings = unit_rows(embeddings)
    self.ids = check_ids(ids, self.embeddings.shape[0])
    return self

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] -> (ids int64 [Q, k], cosine scores float32 [Q, k]), best first."""
    if self.embeddings is None:
      raise RuntimeError("ExactRetriever.search called before build() or load().")
    top_k = exact_top_k_jax if self.backend == "jax" else exact_top_k
    idx, scores = top_k(unit_rows(queries), self.embeddings, k,
                        query_block=self.query_block, gallery_block=self.gallery_block)
    return self.ids[idx], scores

  def save(self, directory: str) -> None:
    if self.embeddings is None:
      raise RuntimeError("ExactRetriever.save called before build().")
    write_meta(directory, self.kind, query_block=self.query_block, gallery_block=self.gallery_block,
               backend=self.backend)
    np.savez(os.path.join(directory, "exact_index.npz"), embeddings=self.embeddings, ids=self.ids)

  @classmethod
  def load(cls, directory: str) -> "ExactRetriever":
    meta = read_meta(directory, cls.kind)
    r = cls(meta["query_block"], meta["gallery_block"], meta.get("backend", "numpy"))
    with np.load(os.path.join(directory, "exact_index.npz")) as z:
      r.embeddings, r.ids = z["embeddings"], z["ids"]
    return r
