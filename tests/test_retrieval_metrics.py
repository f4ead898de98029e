"""Retrieval / classification / clustering metrics on a hand-made toy gallery; expected values by hand."""

import math
import subprocess
import sys

import numpy as np
import pytest

from afmrl_jax.retrieval import metrics as M

# Toy gallery: row -> (listing_id, product_id, category_id)
#   g0 (10, p1, c0)   g1 (11, p1, c0)   g2 (12, p2, c0)
#   g3 (13, p3, c1)   g4 (14, p3, c1)   g5 (15, p4, c1)
G_LISTING = np.array([10, 11, 12, 13, 14, 15])
G_PRODUCT = np.array([1, 1, 2, 3, 3, 4])
G_CATEGORY = np.array([0, 0, 0, 1, 1, 1])

# Queries (listing, product, category) and their raw rankings (gallery rows, best first, 6 deep):
#   q0 (20, p1, c0): g2 g0 g3 g1 g4 g5
#   q1 (21, p3, c1): g5 g0 g3 g2 g4 g1
#   q2 (22, p5, c0): g0 g1 g2 g3 g4 g5   (p5 has no gallery listing: no instance positive)
#   q3 (13, p3, c1): g3 g5 g4 g0 g1 g2   (q3 *is* g3: its own listing must be dropped)
Q_LISTING = np.array([20, 21, 22, 13])
Q_PRODUCT = np.array([1, 3, 5, 3])
Q_CATEGORY = np.array([0, 1, 0, 1])
RAW_ROWS = np.array([[2, 0, 3, 1, 4, 5],
                     [5, 0, 3, 2, 4, 1],
                     [0, 1, 2, 3, 4, 5],
                     [3, 5, 4, 0, 1, 2]])


def _ranked():
  """After dropping self, top 5 rows per query."""
  _, rows = M.exclude_self(G_LISTING[RAW_ROWS], Q_LISTING, 5, RAW_ROWS)
  return rows


def test_exclude_self_drops_only_own_listing():
  rows = _ranked()
  # q0..q2 are not in the gallery: first 5 of the raw ranking; q3 loses g3 and keeps order.
  np.testing.assert_array_equal(rows, [[2, 0, 3, 1, 4], [5, 0, 3, 2, 4], [0, 1, 2, 3, 4], [5, 4, 0, 1, 2]])


def test_count_positives_excludes_self():
  # products: q0 p1 -> g0,g1 = 2; q1 p3 -> g3,g4 = 2; q2 p5 -> 0; q3 p3 -> g3,g4 minus itself (g3) = 1.
  np.testing.assert_array_equal(M.count_positives(Q_PRODUCT, G_PRODUCT, Q_LISTING, G_LISTING), [2, 2, 0, 1])
  # categories: c0 has 3 (g0,g1,g2), c1 has 3 (g3,g4,g5); q3 loses itself -> 2.
  np.testing.assert_array_equal(M.count_positives(Q_CATEGORY, G_CATEGORY, Q_LISTING, G_LISTING), [3, 3, 3, 2])
  # Without ids nothing is excluded.
  np.testing.assert_array_equal(M.count_positives(Q_PRODUCT, G_PRODUCT), [2, 2, 0, 2])


def test_instance_and_group_recall():
  rows = _ranked()
  hits = M.relevance(G_PRODUCT[rows], Q_PRODUCT)
  # product hits per rank (1-based):  q0 [0 1 0 1 0]  q1 [0 0 1 0 1]  q2 [0 0 0 0 0]  q3 [0 1 0 0 0]
  np.testing.assert_array_equal(hits.astype(int), [[0, 1, 0, 1, 0], [0, 0, 1, 0, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
  npos = M.count_positives(Q_PRODUCT, G_PRODUCT, Q_LISTING, G_LISTING)  # [2, 2, 0, 1]; q2 is left out
  # R@1: q0 0, q1 0, q3 0 -> 0.  R@2: 1, 0, 1 -> 2/3.  R@3: 1, 1, 1 -> 1.
  assert M.recall_at_k(hits, 1, npos) == 0.0
  assert M.recall_at_k(hits, 2, npos) == pytest.approx(2 / 3)
  assert M.recall_at_k(hits, 3, npos) == 1.0
  # Without num_positives q2 counts as a miss: R@3 = 3/4.
  assert M.recall_at_k(hits, 3) == pytest.approx(3 / 4)
  # group R@2: q0 1/2, q1 0/2, q3 1/1 -> (0.5 + 0 + 1) / 3 = 0.5
  assert M.group_recall_at_k(hits, npos, 2) == pytest.approx(0.5)
  # group R@3: q0 1/2, q1 1/2, q3 1 -> 2/3;  group R@5: 2/2, 2/2, 1/1 -> 1
  assert M.group_recall_at_k(hits, npos, 3) == pytest.approx(2 / 3)
  assert M.group_recall_at_k(hits, npos, 5) == pytest.approx(1.0)


def test_map_at_k_with_category_relevance():
  rows = _ranked()
  hits = M.relevance(G_CATEGORY[rows], Q_CATEGORY)
  # category hits: q0 [1 1 0 1 0]  q1 [1 0 1 0 1]  q2 [1 1 1 0 0]  q3 [1 1 0 0 0]; positives [3, 3, 3, 2]
  npos = M.count_positives(Q_CATEGORY, G_CATEGORY, Q_LISTING, G_LISTING)
  # AP@5, K' = min(5, positives):
  #   q0: K'=3, hits at 1,2 (rank 4 is outside K') -> (P@1 + P@2) / 2 = (1 + 1) / 2 = 1
  #   q1: K'=3, hits at 1,3 -> (1 + 2/3) / 2 = 5/6
  #   q2: K'=3, hits at 1,2,3 -> (1 + 1 + 1) / 3 = 1
  #   q3: K'=2, hits at 1,2 -> 1
  ap = M.average_precision_at_k(hits, npos, 5)
  np.testing.assert_allclose(ap, [1, 5 / 6, 1, 1])
  # mAP@5 = (1 + 5/6 + 1 + 1) / 4 = 23/24
  assert M.map_at_k(hits, npos, 5) == pytest.approx(23 / 24)
  # mAP@1: every rank-1 result is in-category -> 1.
  assert M.map_at_k(hits, npos, 1) == 1.0


def test_average_precision_edge_cases():
  hits = np.array([[0, 1, 0, 1, 1],   # 10 positives: K'=5, hits 2,4,5 -> (1/2 + 2/4 + 3/5) / 3 = 1.6/3
                   [0, 0, 0, 0, 0],   # no hit -> 0
                   [0, 0, 1, 1, 1],   # 2 positives: K'=2, no hit inside the window -> 0
                   [1, 0, 0, 0, 0],   # 0 positives -> undefined (NaN), left out of the mean
                   [0, 0, 0, 0, 1]], bool)  # 5 positives: K'=5, hit at 5 -> (1/5) / 1 = 0.2
  npos = np.array([10, 4, 2, 0, 5])
  ap = M.average_precision_at_k(hits, npos, 5)
  np.testing.assert_allclose(ap[[0, 1, 2, 4]], [1.6 / 3, 0, 0, 0.2])
  assert math.isnan(ap[3])
  # mean over the 4 defined queries: (0.5333 + 0 + 0 + 0.2) / 4
  assert M.map_at_k(hits, npos, 5) == pytest.approx((1.6 / 3 + 0.2) / 4)
  assert math.isnan(M.recall_at_k(hits[3:4], 1, npos[3:4]))  # no query with a positive
  with pytest.raises(ValueError, match="k=6"):
    M.map_at_k(hits, npos, 6)


def test_knn_accuracy_majority_and_ties():
  labels = np.array([[2, 1, 1],   # truth 2
                     [3, 1, 9],   # truth 3
                     [5, 5, 4]])  # truth 5
  truth = np.array([2, 3, 5])
  # k=2: [2,1] tie -> the nearer 2 (right); [3,1] tie -> 3 (right); [5,5] -> 5 (right) => 1
  assert M.knn_accuracy(labels, truth, 2) == pytest.approx(1.0)
  # k=3: [2,1,1] -> 1 (wrong); [3,1,9] three-way tie -> 3 (right); [5,5,4] -> 5 (right) => 2/3
  assert M.knn_accuracy(labels, truth, 3) == pytest.approx(2 / 3)
  # the toy gallery's category neighbours at k=3: q0 c0 c0 c1 -> c0; q1 c1 c0 c1 -> c1; q2 c0; q3 c1 c1 c0 -> c1
  assert M.knn_accuracy(G_CATEGORY[_ranked()], Q_CATEGORY, 3) == 1.0


def test_nearest_centroid_accuracy():
  gallery = np.array([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]])
  g_labels = np.array([0, 0, 1])
  # class 0 centroid: mean of unit vectors (1,0),(0,1) -> direction (0.707, 0.707); class 1: (-1, 0).
  # query (1, 0.1): c0 0.707*1.1 > c1 -1       -> 0 (truth 0, right)
  # query (-0.2, 1): c0 0.707*0.8 = 0.57 > 0.2   -> 0 (truth 1, wrong)
  # query (-1, 0.5): c0 0.707*-0.5 < c1 1        -> 1 (truth 1, right)
  queries = np.array([[1.0, 0.1], [-0.2, 1.0], [-1.0, 0.5]])
  assert M.nearest_centroid_accuracy(queries, np.array([0, 1, 1]), gallery, g_labels) == pytest.approx(2 / 3)


def test_purity_nmi_ari_by_hand():
  truth = np.array([0, 0, 1, 1, 2, 2])
  pred = np.array([0, 0, 0, 1, 1, 1])
  # purity: cluster 0 = {0,0,1} -> 2, cluster 1 = {1,2,2} -> 2  => 4/6
  # ARI: sum C(n_ij,2) = C(2,2)+C(2,2) = 2; clusters C(3,2)*2 = 6; classes C(2,2)*3 = 3; C(6,2) = 15
  #      expected = 6*3/15 = 1.2, max = (6+3)/2 = 4.5 -> (2 - 1.2) / (4.5 - 1.2)
  # NMI (arithmetic): MI = 2 * (1/3) ln((1/3) / ((1/2)(1/3))) = (2/3) ln 2; H(truth) = ln 3, H(pred) = ln 2
  scores = M.clustering_scores(truth, pred)
  assert scores["purity"] == pytest.approx(4 / 6)
  assert scores["ari"] == pytest.approx(0.8 / 3.3)
  assert scores["nmi"] == pytest.approx((2 / 3) * math.log(2) / ((math.log(3) + math.log(2)) / 2))
  # Relabelling clusters changes nothing.
  assert M.clustering_scores(truth, 1 - pred) == pytest.approx(scores)


def test_kmeans_on_separated_clusters_is_perfect():
  rng = np.random.default_rng(0)
  centres = np.eye(4, 16) * 10
  labels = np.repeat(np.arange(4), 25)
  emb = centres[labels] + 0.1 * rng.normal(size=(100, 16))
  scores = M.kmeans_clustering_scores(emb, labels + 7, num_clusters=0, seed=0)  # 0 -> 4 clusters
  assert scores == pytest.approx(dict(nmi=1.0, ari=1.0, purity=1.0))


def test_metrics_module_stays_light():
  """`retrieval.metrics` must import neither jax, TensorFlow, scann nor scikit-learn."""
  code = ("import sys; import afmrl_jax.retrieval.metrics; "
          "bad = [m for m in ('jax', 'tensorflow', 'scann', 'sklearn', 'torch') if m in sys.modules]; "
          "print(bad); sys.exit(1 if bad else 0)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
