"""On-device BM25 between attribute term-id arrays, one block of queries against one block of documents.

Term ids come from `afmrl_jax.attributes.CorpusStats.encode`: int32 [batch, K], id 0 = padding.
A term repeated inside a document is its term frequency; a term repeated in the query counts once per
occurrence (BM25 sums over the query's term list). The score of query i against document j is

  B_ij = sum_k sum_l [q_ik = d_jl, q_ik != 0] * u_jl,
  u_jl = idf(d_jl) * (k1 + 1) / (tf_j(d_jl) + k1 * (1 - b + b * len_j / avg_doc_len)),

which is the usual sum over query terms of idf * tf * (k1 + 1) / (tf + k1 * (...)): each of the tf slots
holding a term contributes u_jl, so the tf slots together give the saturated score. Written as a
sum over document slots, three algorithms give it (`resolve_impl`): a per-query term-count table
[Bq, V] times the documents' weights scattered into [V, Bd] (a matmul; the default for vocabularies
up to 8192 terms), a gather from that table (K gathers per pair), or a K x K slot comparison with no
vocabulary-sized array (any vocabulary). Every one costs O(Bq * Bd) memory besides
the [Bq, V] table, so a block of queries against a block of documents never needs the full matrix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def doc_slot_weights(doc_terms: jax.Array, idf: jax.Array, avg_doc_len, k1: float = 1.2,
                     b: float = 0.75) -> jax.Array:
  """u_jl of the module docstring: float32 [Bd, K] (0 on padding). O(Bd * K^2)."""
  doc_terms = jnp.asarray(doc_terms, jnp.int32)
  valid = doc_terms != 0
  same = (doc_terms[:, :, None] == doc_terms[:, None, :]) & valid[:, None, :]
  tf = jnp.sum(same, axis=-1).astype(jnp.float32)  # [Bd, K]: frequency of the term in slot l
  doc_len = jnp.sum(valid, axis=-1).astype(jnp.float32)  # [Bd]
  avg = jnp.maximum(jnp.asarray(avg_doc_len, jnp.float32), 1e-6)
  norm = k1 * (1.0 - b + b * doc_len / avg)  # [Bd]
  weight = jnp.take(jnp.asarray(idf, jnp.float32), doc_terms) * (k1 + 1.0) / (tf + norm[:, None])
  return jnp.where(valid, weight, 0.0)


def bm25_from_weights(query_terms: jax.Array, doc_terms: jax.Array, slot_weights: jax.Array) -> jax.Array:
  """B [Bq, Bd] from query ids [Bq, K], doc ids [Bd, K] and `doc_slot_weights` [Bd, K] ('compare').

  A loop over the query slots, each adding an unrolled sum over the document slots: every step is one
  elementwise [Bq, Bd] fusion, so no [Bq, Bd, K, K] (or [Bq, Bd, K]) array is ever formed - XLA does
  not fuse a broadcast compare into a multi-axis reduction on every backend.
  """
  query_terms = jnp.asarray(query_terms, jnp.int32)
  doc_terms = jnp.asarray(doc_terms, jnp.int32)
  slot_weights = jnp.asarray(slot_weights, jnp.float32)
  num_doc_slots = doc_terms.shape[1]

  def add_query_slot(k, total):
    term = jax.lax.dynamic_index_in_dim(query_terms, k, axis=1, keepdims=False)[:, None]  # [Bq, 1]
    term_score = sum(jnp.where(term == doc_terms[None, :, l], slot_weights[None, :, l], 0.0)
                     for l in range(num_doc_slots))
    return total + jnp.where(term != 0, term_score, 0.0)

  # zeros_like of an expression of both inputs: inside shard_map it carries their varying-axes type.
  init = jnp.zeros_like(query_terms[:, :1] + doc_terms[None, :, 0], dtype=jnp.float32)
  return jax.lax.fori_loop(0, query_terms.shape[1], add_query_slot, init)


BM25_IMPLS = ("auto", "gather", "matmul", "compare")
# 'auto' uses the matmul while the vocabulary is small and the [Bq, V] count table stays below this.
_AUTO_TABLE_LIMIT = 1 << 27
_AUTO_MAX_VOCAB = 8192


def resolve_impl(impl: str, num_queries: int, vocab_size: int) -> str:
  """The BM25 algorithm to use ('auto': 'matmul' for vocabularies up to 8192 terms, else 'compare').

  matmul:  B = counts [Bq, V] @ W [V, Bd], W the documents' slot weights scattered by term id;
           2V flops per pair on the matrix unit (timings: docs/agcl_loss.md).
  gather:  B_ij = sum_l counts_i[d_jl] * u_jl, K gathers per pair (slow on XLA:CPU at large Bd).
  compare: the K x K slot comparison, no vocabulary-sized arrays (any vocabulary size).
  """
  if impl not in BM25_IMPLS:
    raise ValueError(f"bm25: impl={impl!r}, expected one of {BM25_IMPLS}")
  if impl != "auto":
    return impl
  small = vocab_size <= _AUTO_MAX_VOCAB and num_queries * vocab_size <= _AUTO_TABLE_LIMIT
  return "matmul" if small else "compare"


def query_term_counts(query_terms: jax.Array, vocab_size: int) -> jax.Array:
  """How often each term occurs in each query: [Bq, V] (int8 for K < 128), padding column 0."""
  query_terms = jnp.asarray(query_terms, jnp.int32)
  dtype = jnp.int8 if query_terms.shape[1] < 128 else jnp.int32
  rows = jnp.arange(query_terms.shape[0], dtype=jnp.int32)[:, None]
  base = jnp.zeros_like(query_terms[:, :1], dtype=dtype) * jnp.zeros((1, vocab_size), dtype)
  return base.at[rows, query_terms].add(jnp.ones_like(query_terms, dtype=dtype)).at[:, 0].set(0)


def bm25_from_counts(counts: jax.Array, doc_terms: jax.Array, slot_weights: jax.Array,
                     impl: str = "gather") -> jax.Array:
  """B [Bq, Bd] from `query_term_counts` [Bq, V], doc ids [Bd, K] and `doc_slot_weights` [Bd, K]."""
  doc_terms = jnp.asarray(doc_terms, jnp.int32)
  if impl == "matmul":
    vocab = counts.shape[1]
    cols = jnp.arange(doc_terms.shape[0], dtype=jnp.int32)[None, :]
    table = jnp.zeros((vocab, doc_terms.shape[0]), jnp.float32).at[doc_terms.T, cols].add(slot_weights.T)
    return counts.astype(jnp.float32) @ table
  # One gathered [Bq, Bd] term per document slot; XLA fuses the sum into one pass.
  return sum(jnp.take(counts, doc_terms[:, l], axis=1).astype(jnp.float32) * slot_weights[None, :, l]
             for l in range(doc_terms.shape[1]))


def bm25_scores(query_terms: jax.Array, doc_terms: jax.Array, idf: jax.Array, avg_doc_len,
                k1: float = 1.2, b: float = 0.75, impl: str = "auto") -> jax.Array:
  """BM25 scores float32 [Bq, Bd] of query term ids [Bq, K] against document term ids [Bd, K].

  idf: float32 [V] (idf[0] = 0, see CorpusStats); avg_doc_len: scalar, terms per corpus document.
  impl: see `resolve_impl`; all give the same numbers (to float rounding).
  """
  idf = jnp.asarray(idf, jnp.float32)
  weights = doc_slot_weights(doc_terms, idf, avg_doc_len, k1, b)
  impl = resolve_impl(impl, query_terms.shape[0], idf.shape[0])
  if impl == "compare":
    return bm25_from_weights(query_terms, doc_terms, weights)
  return bm25_from_counts(query_term_counts(query_terms, idf.shape[0]), doc_terms, weights, impl)


def bm25_diagonal(query_terms: jax.Array, doc_terms: jax.Array, idf: jax.Array, avg_doc_len,
                  k1: float = 1.2, b: float = 0.75) -> jax.Array:
  """B_ii float32 [B]: each query against its own document (row i of each array). O(B * K^2)."""
  weights = doc_slot_weights(doc_terms, idf, avg_doc_len, k1, b)
  query_terms = jnp.asarray(query_terms, jnp.int32)
  match = (query_terms[:, :, None] == jnp.asarray(doc_terms, jnp.int32)[:, None, :]) & (query_terms != 0)[:, :, None]
  return jnp.sum(jnp.where(match, weights[:, None, :], 0.0), axis=(1, 2))


# Two odd multipliers for a 64-bit set fingerprint (sum of mixed ids; order-free, repeats removed).
_MIX = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA77))


def _mix(x: jax.Array, multiplier) -> jax.Array:
  x = x * multiplier
  x = x ^ (x >> 15)
  x = x * np.uint32(0xC2B2AE3D)
  return x ^ (x >> 13)


def term_set_fingerprint(terms: jax.Array) -> jax.Array:
  """uint32 [B, 2] fingerprint of each row's set of non-padding term ids (order and repeats ignored).

  Equal sets give equal fingerprints; different sets collide with probability about 2^-64. Lets the
  `attribute` mask compare attribute sets blockwise in O(Bq * Bd) instead of O(Bq * Bd * K^2).
  Rows with no terms get (0, 0).
  """
  terms = jnp.sort(jnp.asarray(terms, jnp.int32), axis=-1)
  first = jnp.concatenate([jnp.ones_like(terms[:, :1], bool), terms[:, 1:] != terms[:, :-1]], axis=-1)
  keep = first & (terms != 0)
  ids = terms.astype(jnp.uint32)
  return jnp.stack([jnp.sum(jnp.where(keep, _mix(ids, m), np.uint32(0)), axis=-1, dtype=jnp.uint32)
                    for m in _MIX], axis=-1)
