"""Search a gallery that is split across processes: each process indexes only its own shard.

A gallery too large for one host is embedded where it was read: process p holds rows `G_p`. Each
process builds its own index (exact or ScaNN) over `G_p`, searches *every* query there for its top k,
and the per-shard lists (ids and scores, `[P, Q, k]` after an all-gather) are merged into the global
top k. With the exact backend the result is exactly the top k of one index over the whole gallery, ties
included: its scores (`exact.exact_scores`) do not depend on where a row sits or on the BLAS kernel, and
the merge breaks ties by the smaller global id as one index does. With ScaNN each shard is approximate
on its own.

    index = ShardedIndex(make_retriever("exact")).build(local_embeddings, local_global_ids)
    ids, scores = index.search(queries, k)          # [Q, k] global ids, identical on every process

`OwnQueries(index).search(local_queries, k)` searches each process's own queries instead (gathered,
searched, and each process's rows handed back).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from afmrl_jax.retrieval.base import check_ids


def merge_topk(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The best `k` of several shards' top-k lists.

  Args:
    ids: int64 [S, Q, k_s] per-shard results (-1 = no result: a shard smaller than k_s).
    scores: float32 [S, Q, k_s], each shard's list best first.
    k: results to keep, <= S * k_s.
  Returns:
    (ids int64 [Q, k], scores float32 [Q, k]), best first; equal scores keep the smaller id first, as
    one exact index does: with the exact backend the merge is the one-index answer, ties included.
  """
  s, q, ks = ids.shape
  flat_ids = np.transpose(ids, (1, 0, 2)).reshape(q, s * ks)
  flat_scores = np.transpose(scores, (1, 0, 2)).reshape(q, s * ks)
  flat_scores = np.where(flat_ids < 0, -np.inf, flat_scores)
  order = np.lexsort((flat_ids, -flat_scores), axis=1)[:, :k]
  return np.take_along_axis(flat_ids, order, 1), np.take_along_axis(flat_scores, order, 1).astype(np.float32)


def process_allgather(x: np.ndarray) -> np.ndarray:
  """[...] on each process -> [P, ...] (jax multi-host all-gather; [1, ...] with one process)."""
  import jax
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


class ShardedIndex:
  """A `Retriever` over this process's gallery shard whose `search` returns the global top k."""

  def __init__(self, retriever, gather: Callable[[np.ndarray], np.ndarray] = process_allgather):
    self.retriever, self.gather, self.size = retriever, gather, 0

  def build(self, embeddings: np.ndarray, ids: np.ndarray) -> "ShardedIndex":
    """This shard's rows [N_p, D] and their *global* ids int64 [N_p] (unique across processes)."""
    embeddings = np.asarray(embeddings, np.float32)
    self.size = len(embeddings)
    if self.size:
      self.retriever.build(embeddings, check_ids(ids, self.size))
    return self

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every process passes the same queries [Q, D]; returns the global (ids [Q, k], scores [Q, k])."""
    queries = np.asarray(queries, np.float32)
    local_k = min(k, self.size)
    ids = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    if local_k:
      ids[:, :local_k], scores[:, :local_k] = self.retriever.search(queries, local_k)
    total = int(self.gather(np.asarray([self.size])).sum())
    if k > total:
      raise ValueError(f"ShardedIndex.search: k={k} exceeds the {total} gallery rows of all shards.")
    # int64 ids travel as two int32 halves: the all-gather goes through jax arrays (int32 by default).
    halves = np.stack([ids >> 31, ids & 0x7FFFFFFF]).astype(np.int32)
    g = self.gather(halves).astype(np.int64)  # [P, 2, Q, k]
    all_ids = np.where(g[:, 0] < 0, -1, (g[:, 0] << 31) | g[:, 1])
    return merge_topk(all_ids, self.gather(scores), k)


class OwnQueries:
  """Each process searches *its own* queries in a `ShardedIndex` (every process passes the same number):
  the queries are all-gathered, searched in every shard, and each process keeps its rows' results. Drops
  in where a `Retriever` is searched with process-local queries (the RAR reward)."""

  def __init__(self, index: ShardedIndex, process_index: Callable[[], int] | None = None):
    self.index = index
    if process_index is None:
      import jax
      process_index = jax.process_index
    self.process_index = process_index

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's queries [n, D] -> (global ids [n, k], scores [n, k])."""
    queries = np.asarray(queries, np.float32)
    every = self.index.gather(queries)  # [P, n, D]
    ids, scores = self.index.search(every.reshape(-1, queries.shape[1]), k)
    n, p = len(queries), self.process_index()
    return ids[p * n:(p + 1) * n], scores[p * n:(p + 1) * n]
