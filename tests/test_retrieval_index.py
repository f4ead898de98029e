"""Exact blockwise top-k against a brute-force argsort; ScaNN against exact on the same embeddings."""

import numpy as np
import pytest

from afmrl_jax.retrieval import load_retriever, make_retriever
from afmrl_jax.retrieval.base import Retriever
from afmrl_jax.vectors import l2_normalize
from afmrl_jax.retrieval.exact import ExactRetriever, exact_top_k, exact_top_k_jax
from afmrl_jax.retrieval.scann_index import ScannRetriever


def _unit(rng, n, d):
  return l2_normalize(rng.normal(size=(n, d)))


def _overlap(a, b):
  """Mean over queries of |set(a_q) & set(b_q)| / k."""
  return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def test_exact_top_k_matches_argsort_across_blocks():
  rng = np.random.default_rng(0)
  g, q = rng.normal(size=(203, 12)), rng.normal(size=(37, 12))
  ref_scores = q.astype(np.float32) @ g.astype(np.float32).T
  ref = np.argsort(-ref_scores, axis=1)[:, :9]
  # Blocks that do not divide the sizes, so the running top-k is merged many times.
  idx, scores = exact_top_k(q, g, 9, query_block=7, gallery_block=13)
  np.testing.assert_array_equal(idx, ref)
  np.testing.assert_allclose(scores, np.take_along_axis(ref_scores, ref, 1), rtol=1e-6)
  # k = N returns the full ranking.
  full, _ = exact_top_k(q, g, 203, gallery_block=50)
  np.testing.assert_array_equal(full, np.argsort(-ref_scores, axis=1))


def test_exact_top_k_jax_matches_argsort_with_padding():
  rng = np.random.default_rng(4)
  g, q = rng.normal(size=(203, 12)), rng.normal(size=(37, 12))
  ref_scores = q.astype(np.float32) @ g.astype(np.float32).T
  ref = np.argsort(-ref_scores, axis=1)[:, :9]
  # 203 rows in blocks of 13 (last block padded) and 37 queries in blocks of 8 (last block padded).
  idx, scores = exact_top_k_jax(q, g, 9, query_block=8, gallery_block=13)
  np.testing.assert_array_equal(idx, ref)
  np.testing.assert_allclose(scores, np.take_along_axis(ref_scores, ref, 1), rtol=1e-5, atol=1e-5)
  r = ExactRetriever(gallery_block=13, backend="jax").build(g)
  np.testing.assert_array_equal(r.search(q, 5)[0], ExactRetriever().build(g).search(q, 5)[0])


@pytest.mark.parametrize("top_k", [exact_top_k, exact_top_k_jax])
def test_exact_top_k_ties_prefer_smaller_index_and_errors(top_k):
  g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
  idx, _ = top_k(np.array([[1.0, 0.0]]), g, 3, gallery_block=2)
  np.testing.assert_array_equal(idx, [[0, 2, 3]])  # rows 0, 2, 3 tie at 1.0, across two blocks
  with pytest.raises(ValueError, match="k=5"):
    top_k(np.ones((1, 2)), g, 5)
  with pytest.raises(ValueError, match="width"):
    top_k(np.ones((1, 3)), g, 1)


def test_exact_retriever_ids_normalisation_and_reload(tmp_path):
  rng = np.random.default_rng(1)
  g = rng.normal(size=(50, 8)) * rng.uniform(0.1, 10, size=(50, 1))  # norms must not matter
  q = rng.normal(size=(5, 8))
  ids = np.arange(1000, 1050)
  r = ExactRetriever(gallery_block=16).build(g, ids)
  assert isinstance(r, Retriever)
  got_ids, got_scores = r.search(q, 4)
  cos = l2_normalize(q) @ l2_normalize(g).T
  ref = np.argsort(-cos, axis=1)[:, :4]
  np.testing.assert_array_equal(got_ids, ids[ref])
  np.testing.assert_allclose(got_scores, np.take_along_axis(cos, ref, 1), rtol=1e-5)
  r.save(str(tmp_path))
  again = load_retriever(str(tmp_path))
  assert isinstance(again, ExactRetriever)
  np.testing.assert_array_equal(again.search(q, 4)[0], got_ids)


def test_scann_brute_force_is_exact():
  rng = np.random.default_rng(2)
  g, q = _unit(rng, 3000, 64), _unit(rng, 200, 64)
  s = ScannRetriever().build(g)  # 3000 < brute_force_below (20000)
  assert s.mode == "brute_force"
  ids, scores = s.search(q, 10)
  ref_ids, ref_scores = ExactRetriever().build(g).search(q, 10)
  assert _overlap(ids, ref_ids) == 1.0
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_scann_tree_ah_recall_vs_exact_and_reload(tmp_path):
  """Tree + AH + reorder on 5,000 x 64 unit vectors: recall@10 against exact top-10 on the same data."""
  rng = np.random.default_rng(3)
  # (a) Product-like embeddings (listings scattered around 500 product centres), default search plan.
  centres = rng.normal(size=(500, 64))
  g = l2_normalize(centres[rng.integers(0, 500, 5000)] + 0.5 * rng.normal(size=(5000, 64)))
  q = l2_normalize(centres[rng.integers(0, 500, 500)] + 0.5 * rng.normal(size=(500, 64)))
  exact_ids, _ = ExactRetriever().build(g).search(q, 10)
  s = make_retriever("scann", brute_force_below=1000).build(g)
  assert s.mode == "tree_ah"
  ids, scores = s.search(q, 10)
  assert _overlap(ids, exact_ids) >= 0.95
  assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
  # save -> load gives identical results.
  s.save(str(tmp_path / "index"))
  again = load_retriever(str(tmp_path / "index"))
  assert isinstance(again, ScannRetriever) and again.mode == "tree_ah"
  ids2, scores2 = again.search(q, 10)
  np.testing.assert_array_equal(ids2, ids)
  np.testing.assert_array_equal(scores2, scores)

  # (b) Isotropic random unit vectors (no structure for the tree to use): searching every leaf, the
  # AH scoring + exact reorder alone must still find the exact top-10.
  g, q = _unit(rng, 5000, 64), _unit(rng, 500, 64)
  exact_ids, _ = ExactRetriever().build(g).search(q, 10)
  s = ScannRetriever(brute_force_below=1000, num_leaves=70, leaves_to_search=70).build(g)
  assert _overlap(s.search(q, 10)[0], exact_ids) >= 0.95


def test_scann_errors(tmp_path):
  s = ScannRetriever()
  with pytest.raises(RuntimeError, match="before build"):
    s.search(np.ones((1, 4)), 1)
  s.build(np.eye(4))
  with pytest.raises(ValueError, match="k=5"):
    s.search(np.ones((1, 4)), 5)
  with pytest.raises(FileNotFoundError, match="retriever.json"):
    ScannRetriever.load(str(tmp_path))
  with pytest.raises(ValueError, match="'scann' or 'exact'"):
    make_retriever("faiss")
