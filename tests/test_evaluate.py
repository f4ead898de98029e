"""evaluate() end to end on synthetic embeddings: report files written, metrics.json equal to metrics
computed directly (brute-force argsort + plain loops in this file)."""

import json
import os

import numpy as np
import pytest

from afmrl_jax.retrieval import load_retriever
from afmrl_jax.retrieval import metrics as M
from afmrl_jax.eval import report
from afmrl_jax.fields import InvalidFields
from afmrl_jax.eval.retrieval import EvalConfig, evaluate, load_gallery_embeddings

D = 16
NUM_PRODUCTS = 40
CATEGORY_NAMES = ("tops", "dresses", "bags", "shoes")


def _listings():
  """Rows (listing_id, product_id, category_id, split). Product p has 4 listings: the first is a query,
  the rest gallery. Product 40 only has a query (no positive); product 41 only gallery listings.
  Listings 1001, 1005, 1009 (gallery rows) are also asked as queries: their own row must be skipped."""
  rows = []
  lid = 1000
  for p in range(NUM_PRODUCTS):
    for j in range(4):
      rows.append((lid, p, p % 4, "query" if j == 0 else "gallery"))
      lid += 1
  rows.append((lid, 40, 0, "query"))
  rows += [(lid + 1 + j, 41, 1, "gallery") for j in range(3)]
  return rows


ROWS = _listings()
EXTRA_QUERIES = (1001, 1005, 1009)


def _embedding(listing_id, product_id):
  """Product centre + listing noise: noisy enough that retrieval is imperfect."""
  centre = np.random.default_rng(product_id).normal(size=D)
  return centre + 1.3 * np.random.default_rng(10_000 + listing_id).normal(size=D)


def _split(name):
  rows = [r for r in ROWS if r[3] == name]
  if name == "query":
    rows += [r for r in ROWS if r[0] in EXTRA_QUERIES]
  return rows


def _batches(rows, batch_size=16, with_display=True):
  """Fixed-size batches; the last is padded with `valid=False` rows whose embeddings are junk."""
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    pad = batch_size - len(chunk)
    lid = np.array([r[0] for r in chunk] + [-1] * pad)
    pid = np.array([r[1] for r in chunk] + [0] * pad)
    batch = dict(listing_id=lid, product_id=pid, category_id=np.array([r[2] for r in chunk] + [0] * pad),
                 valid=np.arange(batch_size) < len(chunk))
    if with_display:
      batch["title"] = np.array([f"title of {l}" for l in lid])
      batch["attributes"] = np.array([f"colour: c{p}; size: m" for p in pid])
      batch["image"] = np.stack([np.full((8, 8, 3), (l * 37) % 256, np.uint8) for l in lid])
    yield batch


def _embed_fn(batch):
  return np.stack([_embedding(l, p) if l >= 0 else np.full(D, 50.0)  # junk for padding rows
                   for l, p in zip(batch["listing_id"], batch["product_id"])])


def _reference(k=10, map_k=10):
  """Metrics from the full cosine matrix, argsort and loops (independent of the library's ranking code)."""
  g, q = _split("gallery"), _split("query")
  ge = np.stack([_embedding(r[0], r[1]) for r in g])
  qe = np.stack([_embedding(r[0], r[1]) for r in q])
  gn = ge / np.linalg.norm(ge, axis=1, keepdims=True)
  qn = qe / np.linalg.norm(qe, axis=1, keepdims=True)
  sims = qn @ gn.T
  g_lid, g_pid, g_cat = (np.array([r[i] for r in g]) for i in range(3))
  ranked = []
  for qi, (lid, pid, cat, _) in enumerate(q):
    order = [j for j in np.argsort(-sims[qi], kind="stable") if g_lid[j] != lid]
    ranked.append(order[:max(k, 50)])
  ranked = np.array(ranked)
  # The comparison with the library's ranking is exact because no two of these scores are near-tied: a
  # float32 path (any BLAS kernel, ScaNN's brute force) is within ~1e-7 of them on this data (D = 16).
  gaps = -np.diff(np.take_along_axis(sims, ranked, 1), axis=1)
  assert gaps.min() > 5e-7, gaps.min()
  out = {}
  has_pos = []
  for qi, (lid, pid, cat, _) in enumerate(q):
    has_pos.append(np.sum((g_pid == pid) & (g_lid != lid)))
  has_pos = np.array(has_pos)
  valid = has_pos > 0
  for kk in (1, 2, 3, 5, 10, 20, 50):
    hit_any, frac = [], []
    for qi, (lid, pid, cat, _) in enumerate(q):
      if not valid[qi]:
        continue
      found = sum(g_pid[j] == pid for j in ranked[qi, :kk])
      hit_any.append(found > 0)
      frac.append(found / has_pos[qi])
    out[f"recall@{kk}"] = np.mean(hit_any)
    out[f"group_recall@{kk}"] = np.mean(frac)
  aps = []
  for qi, (lid, pid, cat, _) in enumerate(q):
    npos = np.sum((g_cat == cat) & (g_lid != lid))
    window = min(map_k, npos)
    hits, precisions = 0, []
    for i in range(window):
      if g_cat[ranked[qi, i]] == cat:
        hits += 1
        precisions.append(hits / (i + 1))
    aps.append(np.mean(precisions) if precisions else 0.0)
  out[f"map@{map_k}"] = np.mean(aps)
  q_cat = np.array([r[2] for r in q])
  out["knn_accuracy"] = M.knn_accuracy(g_cat[ranked], q_cat, 10)
  out["centroid_accuracy"] = M.nearest_centroid_accuracy(qe, q_cat, ge, g_cat)
  out.update(M.kmeans_clustering_scores(ge, g_cat, 0, 0))
  out["num_queries"], out["num_gallery"] = len(q), len(g)
  out["num_queries_without_positive"] = int(np.sum(~valid))
  return out, ranked, qe, g_pid


def _display_listings():
  """listing_id -> record for the query side (the gallery carries its display fields in the batches)."""
  return {r[0]: dict(title=f"query {r[0]}", teacher_attributes="colour: red; sleeve: long",
                     category=CATEGORY_NAMES[r[2]], image=np.zeros((6, 6, 3), np.uint8)) for r in ROWS}


@pytest.mark.parametrize("retriever", ["exact", "scann"])
def test_evaluate_writes_report_and_matches_direct_metrics(tmp_path, retriever):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:  # what train/metrics_log.py writes
    for step in range(0, 100, 5):
      f.write(json.dumps({"step": step, "loss": 3.0 / (1 + step)}) + "\n")
    f.write(json.dumps({"step": 100, "eval": {"recall@1": 0.5}}) + "\n")
  config = EvalConfig(retriever=retriever, num_report_queries=6)
  metrics = evaluate(_embed_fn, _batches(_split("gallery")),
                     _batches(_split("query"), with_display=False), workdir, config,
                     listings=_display_listings(), train_metrics_path=os.path.join(workdir, "metrics.jsonl"))
  expected, ranked, qe, _ = _reference()
  assert 0.2 < expected["recall@1"] < 0.95  # the synthetic task is neither trivial nor hopeless
  out = os.path.join(workdir, "eval")
  with open(os.path.join(out, "metrics.json")) as f:
    saved = json.load(f)
  assert saved["retriever"] == retriever
  for name, value in expected.items():
    assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert saved["metrics"][name] == pytest.approx(value, abs=1e-9), name
  assert expected["num_queries_without_positive"] == 1 and expected["num_queries"] == 44

  for name in ("metrics.md", "recall_at_k.png", "loss_curve.png", "queries.html", "gallery_embeddings.npz",
               "index/retriever.json"):
    assert os.path.isfile(os.path.join(out, name)), name
  with open(os.path.join(out, "metrics.md")) as f:
    md = f.read()
  assert f"| {expected['recall@1']:.4f} |" in md.replace("| R@1", "")  # the table shows R@1 first
  # The index reloads and ranks as evaluation did (ids are gallery rows).
  rows, _ = load_retriever(os.path.join(out, "index")).search(qe, 11)
  assert rows.shape == (44, 11)
  with np.load(os.path.join(out, "gallery_embeddings.npz")) as z:
    assert z["embeddings"].shape == (len(_split("gallery")), D)
    np.testing.assert_array_equal(z["listing_id"], [r[0] for r in _split("gallery")])

  # HTML: 6 queries x (1 + 5 results) images + 2 plots; every same-product result marked as a hit.
  with open(os.path.join(out, "queries.html")) as f:
    page = f.read()
  assert page.count("data:image/png;base64,") == 2 + 6 * 6
  q = _split("query")
  first_hit = np.array([expected_pid == rank_pid for expected_pid, rank_pid in
                        zip([r[1] for r in q], [_split("gallery")[row][1] for row in ranked[:, 0]])])
  chosen = report.choose_queries(first_hit, 6, 0)
  g_pid = np.array([r[1] for r in _split("gallery")])
  expected_hits = sum(int(np.sum(g_pid[ranked[c, :5]] == q[c][1])) for c in chosen)
  assert page.count("&#10003; hit") == expected_hits
  assert "query 1000" in page or any(f"query {q[c][0]}" in page for c in chosen)
  assert "colour: red" in page and "title of" in page


def test_step_folder_and_no_report(tmp_path):
  config = EvalConfig(retriever="exact", recall_ks=(1, 5), map_k=10, report=False)
  # Gallery fed in reverse order: evaluation sorts it by listing id, so every metric (k-means included)
  # is the same as for the ascending order the reference uses.
  metrics = evaluate(_embed_fn, _batches(_split("gallery")[::-1], with_display=False),
                     _batches(_split("query"), with_display=False), str(tmp_path), config, step=7)
  out = tmp_path / "eval" / "step_7"
  assert sorted(os.listdir(out)) == ["gallery_embeddings.npz", "index", "metrics.json"]
  expected, *_ = _reference()
  for name, value in expected.items():
    assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_cluster_sample_and_jax_exact_backend(tmp_path):
  """k-means runs on a seeded sample of `cluster_sample` gallery rows (sorted, as documented); the
  jax exact backend ranks like the reference."""
  config = EvalConfig(retriever="exact", exact_backend="jax", cluster_sample=50, seed=3, report=False)
  metrics = evaluate(_embed_fn, _batches(_split("gallery")), _batches(_split("query")), str(tmp_path), config)
  expected, *_ = _reference()
  for name in ("recall@1", "recall@10", "group_recall@5", "map@10", "knn_accuracy"):
    assert metrics[name] == pytest.approx(expected[name], abs=1e-9), name
  g = _split("gallery")
  rows = np.sort(np.random.default_rng(3).choice(len(g), 50, replace=False))
  ge = np.stack([_embedding(g[i][0], g[i][1]) for i in rows])
  sample = M.kmeans_clustering_scores(ge, np.array([g[i][2] for i in rows]), 0, 3)
  assert {k: metrics[k] for k in sample} == pytest.approx(sample)


def test_scann_padding_counts_as_a_miss(tmp_path):
  """ScaNN searching 1 of 12 leaves of the 123-row gallery for k = 51 pads every list (in ScaNN itself
  with row 0, listing 1001 of product 0, score NaN). Padding must be a miss: the metrics are those of the
  real results, computed here by hand from the saved index, and the report shows no padded card."""
  config = EvalConfig(retriever="scann", scann_brute_force_below=100, scann_num_leaves=12,
                      scann_leaves_to_search=1, num_report_queries=44)
  metrics = evaluate(_embed_fn, _batches(_split("gallery")), _batches(_split("query")), str(tmp_path), config)
  out = os.path.join(str(tmp_path), "eval")
  q, g = _split("query"), _split("gallery")
  qe = np.stack([_embedding(r[0], r[1]) for r in q])
  rows, _ = load_retriever(os.path.join(out, "index")).search(qe, 51)
  assert (rows < 0).any(axis=1).all()  # every list was padded
  g_lid, g_pid, g_cat = (np.array([r[i] for r in g]) for i in range(3))
  found, first, positives, knn = {k: [] for k in (1, 10, 50)}, [], [], []
  for (lid, pid, cat, _), row in zip(q, rows):
    row = [j for j in row if j < 0 or g_lid[j] != lid][:50]  # own listing out; padding stays a miss
    npos = int(np.sum((g_pid == pid) & (g_lid != lid)))
    if npos:
      for k in found:
        found[k].append(sum(j >= 0 and g_pid[j] == pid for j in row[:k]) / npos)
      first.append(any(j >= 0 and g_pid[j] == pid for j in row[:1]))
    votes = [g_cat[j] for j in row[:10] if j >= 0]  # padding does not vote
    labels, idx, counts = np.unique(votes, return_index=True, return_counts=True)
    knn.append(len(votes) > 0 and labels[np.lexsort((idx, -counts))[0]] == cat)
  for k in found:
    assert metrics[f"group_recall@{k}"] == pytest.approx(np.mean(found[k]), abs=1e-9), k
  assert metrics["recall@1"] == pytest.approx(np.mean(first), abs=1e-9)
  assert metrics["knn_accuracy"] == pytest.approx(np.mean(knn), abs=1e-9)
  assert metrics["group_recall@50"] <= 1.0
  with open(os.path.join(out, "queries.html")) as f:
    page = f.read()
  assert "score nan" not in page and "score -inf" not in page


def test_config_and_input_errors(tmp_path):
  with pytest.raises(TypeError, match="bogus"):
    EvalConfig(bogus=1)
  with pytest.raises(InvalidFields, match="EvalConfig.retriever='faiss' is not one of"):
    EvalConfig(retriever="faiss")
  with pytest.raises(InvalidFields, match="EvalConfig.exact_backend='torch' is not one of"):
    EvalConfig(exact_backend="torch")
  with pytest.raises(InvalidFields, match="EvalConfig.recall_ks=.0, 5. must be a non-empty list"):
    EvalConfig(recall_ks=(0, 5))
  gallery = list(_batches(_split("gallery")))
  bad = [{k: v for k, v in b.items() if k != "category_id"} for b in gallery]
  with pytest.raises(KeyError, match="category_id"):
    evaluate(_embed_fn, bad, gallery, str(tmp_path))
  with pytest.raises(ValueError, match=r"expected \[B, D\]"):
    evaluate(lambda b: np.zeros((3, D)), gallery, gallery, str(tmp_path))
  with pytest.raises(ValueError, match="no batches"):
    evaluate(_embed_fn, [], gallery, str(tmp_path))
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  with pytest.raises(OSError, match="cannot create the output folder"):
    evaluate(_embed_fn, gallery, gallery, str(not_a_dir), EvalConfig(retriever="exact"))


def test_load_gallery_embeddings_joins_process_shards_in_listing_order(tmp_path):
  rng = np.random.default_rng(0)
  n = 7
  whole = {"embeddings": rng.normal(size=(n, 4)).astype(np.float32), "listing_id": np.arange(10, 10 + n),
           "product_id": np.arange(n) // 2, "category_id": np.arange(n) % 3}
  (tmp_path / "one").mkdir()
  np.savez(tmp_path / "one" / "gallery_embeddings.npz", **whole)
  (tmp_path / "sharded").mkdir()
  for p, rows in enumerate(([5, 0, 3], [6, 1, 4, 2])):  # each process holds some rows, in its own order
    np.savez(tmp_path / "sharded" / f"gallery_embeddings.process-00{p}.npz", **{k: v[rows] for k, v in whole.items()})
  for folder in ("one", "sharded"):
    got = load_gallery_embeddings(str(tmp_path / folder))
    assert sorted(got) == sorted(whole)
    for k in whole:
      np.testing.assert_array_equal(got[k], whole[k])
  with pytest.raises(FileNotFoundError, match="gallery_embeddings"):
    load_gallery_embeddings(str(tmp_path))


def test_stale_gallery_files_are_removed_and_repeated_shards_refused(tmp_path):
  from afmrl_jax.eval.retrieval import _remove_stale_gallery_files
  names = ["gallery_embeddings.npz"] + [f"gallery_embeddings.process-00{p}.npz" for p in range(4)]
  shard = {"embeddings": np.zeros((2, 3), np.float32), "listing_id": np.array([1, 2]), "product_id": np.array([1, 2]),
           "category_id": np.array([0, 0])}
  for name in names:
    np.savez(tmp_path / name, **shard)
  os.remove(tmp_path / "gallery_embeddings.npz")
  with pytest.raises(ValueError, match="repeat listings"):
    load_gallery_embeddings(str(tmp_path))  # four shards of the same two listings
  np.savez(tmp_path / "gallery_embeddings.npz", **shard)
  _remove_stale_gallery_files(str(tmp_path), sharded=True, process=1, num_processes=2)  # only process 0 cleans
  assert sorted(os.listdir(tmp_path)) == sorted(names)
  _remove_stale_gallery_files(str(tmp_path), sharded=True, process=0, num_processes=2)
  assert sorted(os.listdir(tmp_path)) == names[1:3]  # a 2-process sharded evaluation keeps shards 0 and 1
  _remove_stale_gallery_files(str(tmp_path), sharded=False, process=0, num_processes=1)
  assert os.listdir(tmp_path) == []
