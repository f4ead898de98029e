"""Exact top-k by inner product, blockwise so that no [Q, N] score matrix is ever materialised.

The score and the tie rule (the same on every machine and BLAS kernel). A float32 matrix product
rounds differently with the BLAS kernel (`OPENBLAS_CORETYPE`), the CPU, and even with where a row falls
in the kernel's blocks, so two equal gallery rows can get scores a few ulps apart. Here the product only
*proposes* candidates; the returned score of a (query, row) pair is `exact_scores`: the float64 sum, in
the order d = 0, 1, ..., D-1, of the (exact) products of the float32 components, rounded to float32. It
is a function of the two vectors alone: equal rows score bitwise equally, on any machine. Results are
sorted by (-score, smaller row). The proposal is certified: a float32 product is within
`_product_error` of the exact score (a bound for any summation order), so a query whose fetched list
reaches more than twice that bound below its k-th proposed score holds every row that can enter its
top k; a query that does not is fetched again with twice as many candidates (up to N). So the answer is
exactly the first k of the ranking of all N rows by (-exact score, row), with either backend.
"""

from __future__ import annotations

import os

import numpy as np

from afmrl_jax.retrieval.base import check_ids, read_meta, unit_rows, write_meta

# Pairs re-scored per chunk of `exact_scores` (bounds its float64 temporaries to ~pairs * D * 16 bytes).
_SCORE_PAIRS = 2048


def exact_scores(queries: np.ndarray, gallery: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """The defined score of each (query, gallery row) pair, bitwise the same on every machine.

  queries [Q, D], gallery [N, D] (as float32), rows int [Q, k] into the gallery (-1 = none) -> float32
  [Q, k]: sum over d = 0..D-1 *in that order* of float64(q_d) * float64(g_d) (each product of two
  float32 numbers is exact in float64; `np.add.accumulate` adds strictly in order), rounded to float32;
  -inf where rows is -1. No BLAS, no pairwise or SIMD-reassociated sum: nothing depends on the kernel.
  """
  queries = np.asarray(queries, np.float32)
  gallery = np.asarray(gallery, np.float32)
  rows = np.asarray(rows, np.int64)
  out = np.full(rows.shape, -np.inf, np.float32)
  if rows.size == 0 or gallery.shape[0] == 0:
    return out
  per = max(1, _SCORE_PAIRS // max(1, rows.shape[1]))  # queries per chunk
  for q0 in range(0, rows.shape[0], per):
    r = rows[q0:q0 + per]
    prod = queries[q0:q0 + per, None, :].astype(np.float64) * gallery[np.maximum(r, 0)].astype(np.float64)
    if prod.shape[-1]:
      e = np.add.accumulate(prod, axis=-1)[..., -1]
    else:
      e = np.zeros(r.shape)
    out[q0:q0 + per] = np.where(r >= 0, e.astype(np.float32), -np.inf)
  return out


def _product_error(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
  """float64 [Q]: a bound on |float32 product score - exact_scores| for every row of the gallery.

  A float32 dot product of length D, summed in any order (FMA or not, any blocking), is within
  gamma_D * |q| |g| ~ D * 2^-24 |q| |g| of the real value; `exact_scores` is within 2^-24 (its float32
  rounding) plus D * 2^-53 of it. (D + 4) * 2^-23 * |q| * max |g| covers both twice over.
  """
  d = queries.shape[1]
  q_norm = np.sqrt(np.square(queries.astype(np.float64)).sum(axis=1))
  g_norm = np.sqrt(np.square(gallery.astype(np.float64)).sum(axis=1)).max(initial=0.0)
  return (d + 4) * 2.0**-23 * q_norm * g_norm + 1e-30


def _certified_top_k(propose, queries: np.ndarray, gallery: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """The first k rows of each query by (-exact_scores, row), from float32 proposals.

  propose(queries [q, D], kk) -> (rows int [q, kk], float32 product scores [q, kk]) best first: the kk
  best rows by the float32 product (ties in any order). A query is certain when its kk-th proposed score
  is below its k-th minus twice `_product_error` (no row left out can reach the top k), or kk = N.
  """
  n = gallery.shape[0]
  nq = queries.shape[0]
  out_idx = np.empty((nq, k), np.int64)
  out_score = np.empty((nq, k), np.float32)
  if nq == 0:
    return out_idx, out_score
  margin = 2 * _product_error(queries, gallery)
  todo = np.arange(nq)
  kk = min(n, k + max(16, k // 4))
  while len(todo):
    idx, proposed = propose(queries[todo], kk)
    idx = np.asarray(idx, np.int64)
    scores = exact_scores(queries[todo], gallery, idx)
    order = np.lexsort((idx, -scores), axis=1)[:, :k]
    out_idx[todo] = np.take_along_axis(idx, order, 1)
    out_score[todo] = np.take_along_axis(scores, order, 1)
    if kk >= n:
      break
    proposed = np.asarray(proposed, np.float64)
    certain = proposed[:, -1] < proposed[:, k - 1] - margin[todo]
    todo = todo[~certain]
    kk = min(n, 2 * kk)
  return out_idx, out_score


def _check_args(name: str, queries: np.ndarray, gallery: np.ndarray, k: int) -> None:
  n = gallery.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"{name}: k={k} must be in [1, {n}] (the gallery size).")
  if queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"{name}: query width {queries.shape[1]} != gallery width {gallery.shape[1]}.")


def _propose_numpy(queries: np.ndarray, gallery: np.ndarray, k: int, query_block: int,
                   gallery_block: int) -> tuple[np.ndarray, np.ndarray]:
  """The k best rows by the float32 BLAS product, blockwise (a running top-k merged per gallery block).

  Memory is O(query_block * (gallery_block + k)) whatever Q and N are.
  """
  n = gallery.shape[0]
  out_idx = np.empty((queries.shape[0], k), np.int64)
  out_score = np.empty((queries.shape[0], k), np.float32)
  for q0 in range(0, queries.shape[0], query_block):
    qb = queries[q0:q0 + query_block]
    best_idx = np.empty((qb.shape[0], 0), np.int64)
    best_score = np.empty((qb.shape[0], 0), np.float32)
    for g0 in range(0, n, gallery_block):
      scores = qb @ gallery[g0:g0 + gallery_block].T  # [q, g]
      idx = np.broadcast_to(np.arange(g0, g0 + scores.shape[1]), scores.shape)
      if scores.shape[1] > k:  # keep the block's k best (linear time) before the sort
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        idx = np.take_along_axis(idx, part, axis=1)
      cand_score = np.concatenate([best_score, scores], axis=1)
      cand_idx = np.concatenate([best_idx, idx], axis=1)
      order = np.lexsort((cand_idx, -cand_score), axis=1)[:, :k]
      best_score = np.take_along_axis(cand_score, order, axis=1)
      best_idx = np.take_along_axis(cand_idx, order, axis=1)
    out_idx[q0:q0 + query_block] = best_idx
    out_score[q0:q0 + query_block] = best_score
  return out_idx, out_score


def exact_top_k(queries: np.ndarray, gallery: np.ndarray, k: int, *, query_block: int = 1024,
                gallery_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery rows by inner product for each query.

  Memory is O(query_block * (gallery_block + k)) whatever Q and N are: the float32 BLAS product proposes
  candidates block by block, and their `exact_scores` rank them (module docstring).

  Args:
    queries: [Q, D]; gallery: [N, D] (not normalised here: the caller decides).
    k: results per query, 1 <= k <= N.
  Returns:
    (indices int64 [Q, k] into gallery rows, scores float32 [Q, k] = `exact_scores`): exactly the first
    k of all N rows sorted by (-score, index), on every machine and BLAS kernel.
  """
  queries = np.asarray(queries, dtype=np.float32)
  gallery = np.asarray(gallery, dtype=np.float32)
  _check_args("exact_top_k", queries, gallery, k)
  return _certified_top_k(
      lambda q, kk: _propose_numpy(q, gallery, kk, query_block, gallery_block), queries, gallery, k)


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
  """`exact_top_k` with the proposals computed on the default JAX device (GPU/TPU): a jitted `lax.scan`
  over gallery blocks (float32, `Precision.HIGHEST`), then the same host-side `exact_scores` ranking.

  Same contract, scores and tie order as `exact_top_k` (bitwise: the ranking is the host's). Blocks are
  padded to fixed shapes so one compilation serves every block (one more per re-fetch size). Memory on
  device: the gallery plus O(query_block * (gallery_block + k)).
  """
  import jax.numpy as jnp

  queries = np.asarray(queries, dtype=np.float32)
  gallery = np.asarray(gallery, dtype=np.float32)
  _check_args("exact_top_k_jax", queries, gallery, k)
  n, d = gallery.shape
  gb = min(gallery_block, n)
  nb = -(-n // gb)
  blocks = np.zeros((nb * gb, d), np.float32)
  blocks[:n] = gallery
  blocks = jnp.asarray(blocks.reshape(nb, gb, d))
  scan = _jax_scan_top_k()

  def propose(qs: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    qbs = min(query_block, qs.shape[0])
    out_idx, out_score = [], []
    for q0 in range(0, qs.shape[0], qbs):
      qb = qs[q0:q0 + qbs]
      rows = qb.shape[0]
      if rows < qbs:  # pad the last query block: same shape, no recompilation
        qb = np.concatenate([qb, np.zeros((qbs - rows, d), np.float32)])
      scores, idx = scan(jnp.asarray(qb), blocks, kk, n)
      out_score.append(np.asarray(scores)[:rows])
      out_idx.append(np.asarray(idx)[:rows].astype(np.int64))
    return np.concatenate(out_idx), np.concatenate(out_score)

  return _certified_top_k(propose, queries, gallery, k)


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
