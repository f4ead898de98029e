"""Hard-negative mining (retrieval/mining.py): exact top-M other-product neighbours against a brute-force
NumPy reference (ties, crowded products, small galleries), the sharded path, ScaNN against exact, the
false-negative filters on hand-made inputs, compaction, drop counts, precision/recall, checkpointing; the
examples of docs/mining.md and launch/mining_filters.py on the `ci` catalog."""

import pathlib
import re

import numpy as np
import pytest

from afmrl_jax.retrieval import mining
from afmrl_jax.retrieval.base import unit_rows
from afmrl_jax.retrieval.mining import FilterConfig, FilterInputs, MinedTable


def reference(queries, gallery, query_product, cand_product, m):
  """Brute force: the exact backend's documented cosine score (float64 sum in dimension order over the
  float32 unit rows, rounded to float32; no BLAS, whose last bits move with the kernel), other-product
  rows sorted by (-score, row), first m; -1 / -inf padding."""
  from tests.test_retrieval_index import rule_scores
  # `mine` normalises, and the retriever normalises what it indexes and is asked again: the same rows here.
  q, g = unit_rows(unit_rows(queries)), unit_rows(unit_rows(gallery))
  s = rule_scores(q, g)
  table = np.full((len(q), m), -1, np.int64)
  scores = np.full((len(q), m), -np.inf)
  for i in range(len(q)):
    rows = [n for n in sorted(range(len(g)), key=lambda n: (-s[i, n], n)) if cand_product[n] != query_product[i]]
    rows = rows[:m]
    table[i, :len(rows)] = rows
    scores[i, :len(rows)] = s[i, rows]
  return table, scores


def toy(seed=0, n=120, q=25, d=16, products=30, distinct=None):
  """Random gallery; `distinct` rows repeated over the gallery make exact score ties."""
  rng = np.random.default_rng(seed)
  if distinct:
    base = rng.normal(size=(distinct, d))
    gallery = base[rng.integers(0, distinct, n)]
  else:
    gallery = rng.normal(size=(n, d))
  cand_product = rng.integers(0, products, n)
  picks = rng.choice(n, q, replace=False)
  queries = gallery[picks] + (0 if distinct else 0.3 * rng.normal(size=(q, d)))
  return queries.astype(np.float32), gallery.astype(np.float32), cand_product[picks], cand_product


def check_against_reference(queries, gallery, qp, cp, m, **kw):
  got = mining.mine(queries, gallery, qp, cp, m, backend="exact", **kw)
  want_table, want_scores = reference(queries, gallery, qp, cp, m)
  np.testing.assert_array_equal(got.table, want_table)
  np.testing.assert_array_equal(got.scores, want_scores)  # the same arithmetic, written twice
  assert got.table.dtype == np.int32 and got.scores.dtype == np.float32
  return got


@pytest.mark.parametrize("m", [1, 7, 20])
def test_mine_matches_brute_force(m):
  queries, gallery, qp, cp = toy()
  got = check_against_reference(queries, gallery, qp, cp, m)
  # Never the query's own product; no repeats.
  assert not (cp[got.table] == qp[:, None]).any()
  assert all(len(set(r)) == len(r) for r in got.table.tolist())


def test_mine_ties_are_broken_by_the_smaller_row():
  # 6 distinct vectors over 90 rows: every score is tied with ~15 others, across the over-fetch cut.
  queries, gallery, qp, cp = toy(seed=1, n=90, q=20, distinct=6, products=12)
  got = check_against_reference(queries, gallery, qp, cp, 10, over_fetch=1)
  s = got.scores
  assert (s[:, :-1] == s[:, 1:]).any()  # the test does exercise ties
  # Within a run of equal scores the rows ascend.
  tied = (s[:, 1:] == s[:, :-1])
  assert (got.table[:, 1:][tied] > got.table[:, :-1][tied]).all()


def test_mine_when_the_own_product_crowds_the_top():
  rng = np.random.default_rng(2)
  d = 8
  centre = rng.normal(size=d)
  # Product 0 has 40 listings all close to the query; 30 other rows are scattered.
  gallery = np.concatenate([centre + 0.01 * rng.normal(size=(40, d)), rng.normal(size=(30, d))])
  cp = np.concatenate([np.zeros(40, int), 1 + np.arange(30)])
  queries = np.stack([centre, rng.normal(size=d)])
  qp = np.array([0, 5])
  got = check_against_reference(queries, gallery, qp, cp, 5, over_fetch=2)
  assert (got.table[0] >= 40).all()  # found past the 40 own-product rows


def test_mine_gallery_smaller_than_m_and_edge_cases():
  rng = np.random.default_rng(3)
  gallery = rng.normal(size=(6, 4))
  cp = np.array([0, 0, 1, 2, 2, 3])
  queries = rng.normal(size=(3, 4))
  qp = np.array([0, 2, 9])
  got = check_against_reference(queries, gallery, qp, cp, 8)
  assert (got.table >= 0).sum(axis=1).tolist() == [4, 4, 6]
  assert np.isneginf(got.scores[got.table < 0]).all()
  # Only own-product candidates: an all -1 row.
  alone = mining.mine(queries[:1], gallery[:2], qp[:1], cp[:2], 3, backend="exact")
  assert alone.table.tolist() == [[-1, -1, -1]]
  # M = 0 and an empty gallery.
  assert mining.mine(queries, gallery, qp, cp, 0).table.shape == (3, 0)
  empty = mining.mine(queries, np.zeros((0, 4)), qp, np.zeros(0, int), 2)
  assert empty.table.tolist() == [[-1, -1]] * 3


def test_mine_is_deterministic_and_records_the_step():
  queries, gallery, qp, cp = toy(seed=4, distinct=10)
  a = mining.mine(queries, gallery, qp, cp, 9, backend="exact", step=120)
  b = mining.mine(queries, gallery, qp, cp, 9, backend="exact", step=120)
  np.testing.assert_array_equal(a.table, b.table)
  np.testing.assert_array_equal(a.scores, b.scores)
  assert int(a.mined_at_step) == 120


def test_backend_choice_and_errors():
  assert mining.choose_backend("auto", 100, scann_from=1000) == "exact"
  assert mining.choose_backend("auto", 1000, scann_from=1000) == "scann"
  with pytest.raises(ValueError, match="backend"):
    mining.choose_backend("faiss", 10)
  with pytest.raises(ValueError, match="width"):
    mining.mine(np.ones((2, 3)), np.ones((4, 5)), [0, 1], [0, 1, 2, 3], 2)
  with pytest.raises(ValueError, match="cand_product"):
    mining.mine(np.ones((2, 3)), np.ones((4, 3)), [0, 1], [0, 1], 2)


class TwoShards:
  """Runs `mine_sharded` for shards 0 and 1 as two threads whose `gather` meets at a barrier."""

  def __init__(self, num):
    import threading
    self.num = num
    self.barrier = threading.Barrier(num)
    self.slots = [None] * num
    self.lock = threading.Lock()

  def gather_for(self, pid):
    def gather(x):
      self.slots[pid] = np.asarray(x)
      self.barrier.wait()
      out = np.stack(self.slots)
      self.barrier.wait()  # everyone has read before the next call overwrites
      return out
    return gather

  def run(self, fn):
    import threading
    results = [None] * self.num
    errors = []

    def work(pid):
      try:
        results[pid] = fn(pid, self.gather_for(pid))
      except Exception as e:  # noqa: BLE001
        errors.append(e)
        self.barrier.abort()

    threads = [threading.Thread(target=work, args=(p,)) for p in range(self.num)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    if errors:
      raise errors[0]
    return results


@pytest.mark.parametrize("distinct", [None, 8])
def test_sharded_equals_one_index(distinct):
  queries, gallery, qp, cp = toy(seed=5, n=150, q=30, distinct=distinct, products=25)
  want = mining.mine(queries, gallery, qp, cp, 12, backend="exact", over_fetch=2)
  owner = np.random.default_rng(6).integers(0, 2, len(gallery))  # uneven random halves

  def shard(pid, gather):
    rows = np.flatnonzero(owner == pid)
    return mining.mine_sharded(queries, gallery[rows], qp, cp[rows], rows, 12, backend="exact",
                               over_fetch=2, gather=gather)

  a, b = TwoShards(2).run(shard)
  np.testing.assert_array_equal(a.table, want.table)
  np.testing.assert_array_equal(b.table, want.table)
  np.testing.assert_allclose(a.scores, want.scores, rtol=1e-6)


def test_sharded_with_one_empty_shard():
  queries, gallery, qp, cp = toy(seed=7, n=40, q=5)
  want = mining.mine(queries, gallery, qp, cp, 50, backend="exact")  # M > N: padded rows

  def shard(pid, gather):
    rows = np.arange(len(gallery)) if pid == 0 else np.zeros(0, int)
    return mining.mine_sharded(queries, gallery[rows], qp, cp[rows], rows, 50, backend="exact", gather=gather)

  a, b = TwoShards(2).run(shard)
  np.testing.assert_array_equal(a.table, want.table)
  np.testing.assert_array_equal(b.table, want.table)


def test_merge_mined_by_hand():
  ids = np.array([[[4, 2, -1]], [[7, 1, 9]]])
  scores = np.array([[[0.9, 0.5, -np.inf]], [[0.9, 0.5, 0.1]]], np.float32)
  got_ids, got_scores = mining.merge_mined(ids, scores, 5)
  assert got_ids.tolist() == [[4, 7, 1, 2, 9]]  # ties by global id, not by shard
  got_ids, _ = mining.merge_mined(ids[:1], scores[:1], 4)
  assert got_ids.tolist() == [[4, 2, -1, -1]]


def test_scann_agrees_with_exact_on_a_clustered_gallery():
  pytest.importorskip("scann")
  from tests.test_retrieval_sharded import clustered_gallery
  gallery, queries = clustered_gallery(num_queries=200)  # 6000 rows: ScaNN's tree + AH path
  cp = np.repeat(np.arange(1500), 4)  # the 4 listings of each product are adjacent rows
  qp = cp[np.random.default_rng(0).choice(len(gallery), 200, replace=False)]
  exact = mining.mine(queries, gallery, qp, cp, 10, backend="exact")
  approx = mining.mine(queries, gallery, qp, cp, 10, backend="auto", scann_from=1000,
                       retriever_options={"brute_force_below": 1000})
  assert not (cp[approx.table] == qp[:, None]).any()
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.table.tolist(), exact.table.tolist())])
  print(f"mining: ScaNN recall@10 against exact {recall:.3f}")
  # Measured, seeds 0-9 x 4 OpenBLAS kernels (default, Haswell, Sandybridge, Prescott): 0.9995 to 1.0.
  assert recall >= 0.95, recall


def test_scann_padding_never_enters_the_table():
  """ScaNN's tree search fills a list it cannot complete with row 0 and NaN scores; M larger than what
  the searched leaves hold must give -1 entries, not row 0 again and again."""
  pytest.importorskip("scann")
  rng = np.random.default_rng(8)
  gallery = rng.normal(size=(2000, 16)).astype(np.float32)
  cp = np.repeat(np.arange(20), 100)
  queries, qp = gallery[1::100] + 0.01, cp[1::100]
  got = mining.mine(queries, gallery, qp, cp, 1500, backend="scann", retriever_options={"brute_force_below": 500})
  valid = got.valid
  assert valid.sum(axis=1).min() > 30 and not valid.all()  # padding was there and was dropped
  assert all(len(set(r) - {-1}) == (np.asarray(r) >= 0).sum() for r in got.table.tolist())
  assert np.isfinite(got.scores[valid]).all() and np.isneginf(got.scores[~valid]).all()
  assert not (cp[got.table[valid]] == np.repeat(qp, valid.sum(axis=1))).any()
  # Mining loses nothing beyond what the retriever itself misses: the mined list is the index's own ranking,
  # as the search that decided each query returned it, with the query's product removed. (Compared with the
  # calls mining made, not with a fresh search: ScaNN's answers depend on k and on the build, which differs
  # run to run and machine to machine.)
  from afmrl_jax.retrieval import make_retriever
  index = make_retriever("scann", brute_force_below=500).build(mining.unit_rows(gallery), np.arange(2000))
  qn = mining.unit_rows(queries)
  last = {}  # query row (bytes) -> the ranking of the last search that held it

  def search(q, k):
    rows, scores = index.search(q, k)
    for one, r, sc in zip(q, rows, scores):
      last[one.tobytes()] = np.where(np.isfinite(sc), r, -1)
    return rows, scores

  ids, _ = mining._mine_local(search, 2000, mining._products(cp), qn, qp, mining.own_product_counts(qp, cp), 30, 8)
  want = [[i for i in last[q.tobytes()].tolist() if i >= 0 and cp[i] != p][:30] for q, p in zip(qn, qp.tolist())]
  assert all(len(w) == 30 for w in want)
  np.testing.assert_array_equal(ids, np.asarray(want))


# ----------------------------------------------------------------------------------------------------
# Filters


def hand_table():
  """3 queries x 4 mined neighbours (query 2 found only 3)."""
  return MinedTable(np.array([[0, 1, 2, 3], [4, 0, 5, 1], [2, 5, 3, -1]]),
                    np.array([[0.95, 0.9, 0.7, 0.6], [0.8, 0.75, 0.5, 0.4], [0.99, 0.6, 0.3, -np.inf]]), 7)


# Candidate term ids (0 = padding). Sets: {1,2,3}, {1,2}, {5}, {1,2,3,4}, {1,2} (other order, a repeat), {}.
CAND_TERMS = np.array([[3, 2, 1, 0], [1, 2, 0, 0], [5, 0, 0, 0], [1, 2, 3, 4], [2, 1, 2, 0], [0, 0, 0, 0]])
QUERY_TERMS = np.array([[1, 2, 3], [2, 1, 0], [0, 0, 0]])  # query 2 has no attributes


def test_term_set_labels_ignore_order_repeats_and_width():
  a = np.array([[1, 2, 3, 0], [3, 3, 2, 1], [0, 0, 0, 0], [1, 2, 0, 0]])
  b = np.array([[2, 1], [0, 0]])
  la, lb = mining.term_set_labels(a, b)
  assert la[0] == la[1] and la[0] != la[3]
  assert lb[0] == la[3]
  assert la[2] == -1 and lb[1] == -1


def test_attribute_rule_keep_mask():
  t = hand_table()
  keep = mining.FILTERS["attribute"](t, FilterInputs(QUERY_TERMS, CAND_TERMS), FilterConfig(("attribute",)))
  assert keep.tolist() == [[False, True, True, True],  # q0 {1,2,3}: row 0 has it; row 3 is a superset
                           [False, True, True, False],  # q1 {1,2}: rows 4 and 1; row 5 is empty
                           [True, True, True, False]]  # q2 has no terms: empty sets never match; padding


def test_score_rule_keep_mask():
  t = hand_table()
  inputs = FilterInputs(positive_scores=np.array([0.85, 0.5, np.nan]))
  keep = mining.FILTERS["score"](t, inputs, FilterConfig(("score",), margin=0.05))
  assert keep.tolist() == [[False, True, True, True],  # 0.95 > 0.90; 0.9 is not > 0.9
                           [False, False, True, True],  # 0.8, 0.75 > 0.55
                           [True, True, True, False]]  # NaN positive: nothing dropped; padding never kept
  # A negative margin drops what comes within |margin| below the positive; -inf positive drops nothing.
  inputs = FilterInputs(positive_scores=np.array([0.85, -np.inf, 0.7]))
  keep = mining.FILTERS["score"](t, inputs, FilterConfig(("score",), margin=-0.2))
  assert keep.tolist() == [[False, False, False, True], [True, True, True, True], [False, False, True, False]]


def test_none_rule_and_missing_inputs():
  t = hand_table()
  assert mining.FILTERS["none"](t, FilterInputs(), FilterConfig()).tolist() == t.valid.tolist()
  with pytest.raises(ValueError, match="query_terms"):
    mining.apply_filter(t, FilterInputs(), FilterConfig(("attribute",)))
  with pytest.raises(ValueError, match="unknown"):
    FilterConfig(("nearest",))
  assert FilterConfig("score").rules == ("score",)


def test_apply_filter_compacts_and_counts():
  t = hand_table()
  inputs = FilterInputs(QUERY_TERMS, CAND_TERMS, np.array([0.85, 0.5, np.nan]))
  kept, counts = mining.apply_filter(t, inputs, FilterConfig(("attribute", "score"), margin=0.05))
  # keep = attribute & score:
  #   q0: [F, T, T, T] & [F, T, T, T]; q1: [F, T, T, F] & [F, F, T, T] -> [F, F, T, F]; q2: [T, T, T, -]
  assert kept.table.tolist() == [[1, 2, 3, -1], [5, -1, -1, -1], [2, 5, 3, -1]]
  np.testing.assert_allclose(kept.scores[0, :3], [0.9, 0.7, 0.6])
  assert np.isneginf(kept.scores[kept.table < 0]).all()
  assert int(kept.mined_at_step) == 7
  assert counts == {"mined": 11, "attribute": 3, "score": 3, "dropped": 4, "kept": 7}
  _, none = mining.apply_filter(t, inputs, FilterConfig())
  assert none == {"mined": 11, "none": 0, "dropped": 0, "kept": 11}


def test_true_duplicates_and_filter_quality():
  t = hand_table()
  cand_product = np.array([10, 11, 12, 13, 14, 15])
  cand_true = np.array([1, 1, 12, 13, 2, 15])
  query_product = np.array([20, 21, 22])
  query_true = np.array([1, 2, 15])
  dup = mining.true_duplicates(t.table, query_product, query_true, cand_product, cand_true)
  assert dup.tolist() == [[True, True, False, False], [True, False, False, False], [False, True, False, False]]
  # A neighbour of the query's own product id is not a "duplicate" (mining never returns one anyway).
  assert not mining.true_duplicates(np.array([[0]]), np.array([10]), np.array([1]), cand_product, cand_true).any()
  inputs = FilterInputs(QUERY_TERMS, CAND_TERMS, np.array([0.85, 0.5, np.nan]))
  masks = mining.rule_keep(t, inputs, FilterConfig(("none", "attribute", "score"), margin=0.05))
  q = mining.filter_quality(masks, t.valid, dup)
  # attribute drops (0,0) dup, (1,0) dup, (1,3) not: precision 2/3; 4 duplicates mined: recall 2/4.
  assert q["attribute"] == {"dropped": 3, "true_dropped": 2, "duplicates": 4,
                            "precision": pytest.approx(2 / 3), "recall": 0.5}
  # score drops (0,0) dup, (1,0) dup, (1,1) not: precision 2/3, recall 2/4.
  assert q["score"]["precision"] == pytest.approx(2 / 3) and q["score"]["recall"] == 0.5
  assert q["none"]["dropped"] == 0 and np.isnan(q["none"]["precision"]) and q["none"]["recall"] == 0.0


def test_positive_scores():
  g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
  cp = np.array([3, 3, 4, 5])
  q = np.array([[1.0, 0.0], [0.0, 2.0]])
  qp = np.array([3, 7])
  mean = mining.positive_scores(q, g, qp, cp)
  assert mean[0] == pytest.approx(0.5) and np.isnan(mean[1])
  assert mining.positive_scores(q, g, qp, cp, "max")[0] == pytest.approx(1.0)
  # Query 0 is gallery row 0: left out, its only other positive is row 1 (cosine 0).
  assert mining.positive_scores(q, g, qp, cp, "max", query_rows=np.array([0, -1]))[0] == pytest.approx(0.0)
  alone = mining.positive_scores(q[:1], g[:1], qp[:1], cp[:1], query_rows=np.array([0]))
  assert np.isnan(alone).all()


def test_mined_table_checkpoint_round_trip(tmp_path):
  t = hand_table()
  path = str(tmp_path / "mined.npz")
  t.save(path)
  back = MinedTable.load(path)
  for k, v in t.to_pytree().items():
    np.testing.assert_array_equal(back.to_pytree()[k], v)
    assert back.to_pytree()[k].dtype == v.dtype
  tree = t.to_pytree()
  assert set(tree) == {"table", "scores", "mined_at_step"} and all(isinstance(v, np.ndarray) for v in tree.values())
  with pytest.raises(ValueError, match="scalar"):
    MinedTable(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2))


def test_doc_examples_run():
  doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "mining.md"
  blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
  assert len(blocks) >= 3
  namespace = {}
  for block in blocks:
    exec(compile(block, str(doc), "exec"), namespace)  # noqa: S102 - our own documentation
  assert namespace["counts"]["mined"] == 40 * 8


def test_mining_filters_script_on_the_ci_catalog(tmp_path):
  import json
  import os
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  out = tmp_path / "mining.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "launch/mining_filters.py", "--preset", "ci", "--cache_dir",
                         str(tmp_path / "cache"), "--num_mined", "8", "--out", str(out)],
                        cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| attribute |" in proc.stdout
  result = json.loads(out.read_text())
  rules = result["rules"]
  assert {"none", "attribute", "attribute_true", "score(margin=0.1)"} <= set(rules)
  assert rules["none"]["dropped"] == 0
  assert result["mined"] == result["queries"] * 8
  # The ground-truth attributes are equal on every relisted duplicate: the oracle finds them all.
  if result["duplicates_mined"]:
    assert rules["attribute_true"]["recall"] == 1.0
