"""Retrieval, classification and clustering metrics on ranked results (pure NumPy).

Deliberately free of jax, TensorFlow and scann so that anyone can score rankings; scikit-learn is
imported lazily, only by the NMI / ARI / k-means functions.

Conventions. `Q` queries, `K` ranked results per query, `N` gallery rows.
  * `hits: bool [Q, K]`: `hits[q, r]` says the rank-`r` (0-based) result of query `q` is relevant.
  * `num_positives: int [Q]`: how many relevant gallery rows query `q` has (its own listing excluded).
  * Every ranking metric is a mean over the queries with at least one positive; a query without any
    positive has no defined recall or AP and is left out (the caller reports how many).
"""

from __future__ import annotations

from typing import Any

import numpy as np


# The label `labels_at` gives a missing result (id -1): equal to no real label, and no kNN vote.
MISSING = np.iinfo(np.int64).min


def labels_at(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """int64 [Q, K]: `labels [N]` (ints) at ranked `rows [Q, K]`, `MISSING` where a row is -1 (an
  approximate index found fewer than K results): a missing result is never a hit, and never itself."""
  labels = np.asarray(labels, np.int64)
  rows = np.asarray(rows, np.int64)
  if not len(labels):
    return np.full(rows.shape, MISSING, np.int64)
  return np.where(rows >= 0, labels[np.maximum(rows, 0)], MISSING)


def relevance(retrieved_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
  """hits [Q, K] = retrieved_labels [Q, K] == query_labels [Q] (per row)."""
  retrieved_labels = np.asarray(retrieved_labels)
  query_labels = np.asarray(query_labels)
  if retrieved_labels.ndim != 2 or query_labels.shape != retrieved_labels.shape[:1]:
    raise ValueError(
        f"relevance: retrieved_labels must be [Q, K] and query_labels [Q], got "
        f"{retrieved_labels.shape} and {query_labels.shape}.")
  return retrieved_labels == query_labels[:, None]


def count_positives(query_labels: np.ndarray, gallery_labels: np.ndarray,
                    query_ids: np.ndarray | None = None,
                    gallery_ids: np.ndarray | None = None) -> np.ndarray:
  """Number of gallery rows sharing each query's label: int64 [Q].

  When ids are given, a gallery row with the query's own id is not counted (a listing is not its own
  positive); this must match how the ranking treated it (see `exclude_self`).
  """
  query_labels = np.asarray(query_labels)
  gallery_labels = np.asarray(gallery_labels)
  values, counts = np.unique(gallery_labels, return_counts=True)
  count_of = dict(zip(values.tolist(), counts.tolist()))
  num = np.array([count_of.get(label, 0) for label in query_labels.tolist()], dtype=np.int64)
  if query_ids is not None and gallery_ids is not None:
    gallery_label_of = dict(zip(np.asarray(gallery_ids).tolist(), gallery_labels.tolist()))
    for q, (qid, qlabel) in enumerate(zip(np.asarray(query_ids).tolist(), query_labels.tolist())):
      if gallery_label_of.get(qid, None) == qlabel:
        num[q] -= 1
  return num


def exclude_self(retrieved_ids: np.ndarray, query_ids: np.ndarray, k: int,
                 *others: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
  """Drops each query's own id from its ranking and keeps the first k: [Q, K+1] -> [Q, k].

  Search k+1 results so that k remain when the query itself is in the gallery. Extra arrays aligned
  with `retrieved_ids` (scores, labels) are filtered the same way and returned after it.
  """
  retrieved_ids = np.asarray(retrieved_ids)
  if retrieved_ids.shape[1] < k:
    raise ValueError(f"exclude_self: need at least k={k} results per query, got {retrieved_ids.shape}.")
  keep = retrieved_ids != np.asarray(query_ids)[:, None]
  # Stable order of kept columns: sort (not keep) first, original position second.
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
  outs = tuple(np.take_along_axis(np.asarray(a), order, axis=1) for a in (retrieved_ids,) + others)
  return outs[0] if not others else outs


def _check(hits: np.ndarray, k: int, num_positives: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  hits = np.asarray(hits, dtype=bool)
  if hits.ndim != 2:
    raise ValueError(f"hits must be [Q, K], got shape {hits.shape}.")
  if not 1 <= k <= hits.shape[1]:
    raise ValueError(f"k={k} must be in [1, {hits.shape[1]}] (the number of ranked results).")
  if num_positives is None:
    return hits, np.ones(hits.shape[0], bool)
  num_positives = np.asarray(num_positives)
  if num_positives.shape != hits.shape[:1]:
    raise ValueError(f"num_positives must be [Q={hits.shape[0]}], got {num_positives.shape}.")
  return hits, num_positives > 0


def _mean(values: np.ndarray, valid: np.ndarray) -> float:
  return float(values[valid].mean()) if valid.any() else float("nan")


def recall_at_k(hits: np.ndarray, k: int, num_positives: np.ndarray | None = None) -> float:
  """Instance Recall@K: share of queries with any relevant result in the top k.

  Queries with `num_positives == 0` are left out when `num_positives` is given. NaN if none is left.
  """
  hits, valid = _check(hits, k, num_positives)
  return _mean(hits[:, :k].any(axis=1).astype(np.float64), valid)


def group_recall_at_k(hits: np.ndarray, num_positives: np.ndarray, k: int) -> float:
  """Recall@K as the fraction of the query's positives found in its top k (stage 2's reward).

  Per query: hits in top k / num_positives (can only reach 1 when num_positives <= k).
  """
  hits, valid = _check(hits, k, num_positives)
  found = hits[:, :k].sum(axis=1).astype(np.float64)
  return _mean(found / np.maximum(np.asarray(num_positives), 1), valid)


def average_precision_at_k(hits: np.ndarray, num_positives: np.ndarray, k: int) -> np.ndarray:
  """Per-query AP@K, M5Product's definition (docs/method.md): float64 [Q].

  K' = min(k, num_positives); AP = sum over relevant ranks i <= K' of precision@i, divided by the
  number of relevant results in the top K'. Edge cases: no hit in the top K' gives 0; a query without
  positives gives NaN (K' = 0, undefined). Because the divisor is the number of hits (not K'), a single
  hit at rank 1 scores 1.0 even if more positives existed: the metric rewards ranking hits early, and
  Recall@K / group Recall@K say how many were found.
  """
  hits, valid = _check(hits, k, num_positives)
  k_eff = np.minimum(k, np.asarray(num_positives))  # [Q]
  ranks = np.arange(1, k + 1)  # 1-based
  in_window = ranks[None, :] <= k_eff[:, None]  # [Q, k]
  rel = hits[:, :k] & in_window
  precision = np.cumsum(rel, axis=1) / ranks[None, :]  # precision@i within the window
  num_hits = rel.sum(axis=1)
  ap = np.where(num_hits > 0, (precision * rel).sum(axis=1) / np.maximum(num_hits, 1), 0.0)
  return np.where(valid, ap, np.nan)


def map_at_k(hits: np.ndarray, num_positives: np.ndarray, k: int) -> float:
  """mAP@K: mean of `average_precision_at_k` over queries with at least one positive."""
  ap = average_precision_at_k(hits, num_positives, k)
  valid = np.asarray(num_positives) > 0
  return _mean(np.nan_to_num(ap), valid)


def knn_accuracy(neighbor_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
  """kNN classification accuracy: each query takes the majority label of its top k neighbours.

  Ties between labels with equal votes go to the label seen first in the ranking (the nearer one).
  neighbor_labels: [Q, K] labels of the ranked results (query itself already excluded); `MISSING`
  entries (no result) do not vote, and a query without any neighbour counts as wrong.
  """
  neighbor_labels = np.asarray(neighbor_labels)[:, :k]
  query_labels = np.asarray(query_labels)
  if neighbor_labels.shape[1] < k:
    raise ValueError(f"knn_accuracy: k={k} but only {neighbor_labels.shape[1]} neighbours given.")
  correct = 0
  for row, truth in zip(neighbor_labels, query_labels):
    if row.dtype.kind in "iu":
      row = row[row != MISSING]
    if not len(row):
      continue
    labels, first, votes = np.unique(row, return_index=True, return_counts=True)
    # Most votes first, then earliest first occurrence.
    best = np.lexsort((first, -votes))[0]
    correct += int(labels[best] == truth)
  return correct / max(len(query_labels), 1)


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_sums(gallery_emb: np.ndarray, gallery_labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """float64 [C, D]: per class of `classes` [C], the sum of its L2-normalised gallery rows [N, D].

  Sums of gallery shards add up to the sums of the whole gallery (sharded evaluation)."""
  onehot = (np.asarray(gallery_labels)[:, None] == np.asarray(classes)[None, :]).astype(np.float64)  # [N, C]
  return onehot.T @ _normalize(gallery_emb)


def centroid_accuracy_from_sums(query_emb: np.ndarray, query_labels: np.ndarray, sums: np.ndarray,
                                classes: np.ndarray) -> float:
  """`nearest_centroid_accuracy` from the classes' `class_sums` [C, D] (the centroid directions)."""
  scores = _normalize(query_emb) @ _normalize(sums).T  # [Q, C]
  pred = np.asarray(classes)[np.argmax(scores, axis=1)]  # argmax takes the first (smallest) class on ties
  return float(np.mean(pred == np.asarray(query_labels)))


def nearest_centroid_accuracy(query_emb: np.ndarray, query_labels: np.ndarray,
                              gallery_emb: np.ndarray, gallery_labels: np.ndarray) -> float:
  """Accuracy of assigning each query to the class whose gallery centroid is nearest in cosine.

  Centroid = mean of the class's L2-normalised gallery embeddings, then normalised. Ties go to the
  smaller label. query_emb [Q, D], gallery_emb [N, D].
  """
  classes = np.unique(np.asarray(gallery_labels))
  return centroid_accuracy_from_sums(query_emb, query_labels, class_sums(gallery_emb, gallery_labels, classes),
                                     classes)


def purity(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
  """Cluster purity: sum over clusters of its most common true label's count, over N."""
  labels_true = np.asarray(labels_true)
  labels_pred = np.asarray(labels_pred)
  total = 0
  for cluster in np.unique(labels_pred):
    _, counts = np.unique(labels_true[labels_pred == cluster], return_counts=True)
    total += counts.max()
  return total / max(len(labels_true), 1)


def clustering_scores(labels_true: np.ndarray, labels_pred: np.ndarray) -> dict[str, float]:
  """NMI (arithmetic normalisation), ARI and purity of a clustering against true labels."""
  from sklearn import metrics as skm  # lazy: keeps `import retrieval.metrics` light

  return dict(
      nmi=float(skm.normalized_mutual_info_score(labels_true, labels_pred)),
      ari=float(skm.adjusted_rand_score(labels_true, labels_pred)),
      purity=float(purity(labels_true, labels_pred)),
  )


def kmeans_clustering_scores(embeddings: np.ndarray, labels: np.ndarray, num_clusters: int = 0,
                             seed: int = 0) -> dict[str, Any]:
  """k-means (on L2-normalised embeddings [N, D]) scored against `labels` [N] by `clustering_scores`.

  num_clusters 0 means the number of distinct labels.
  """
  from sklearn.cluster import KMeans  # lazy, as above

  labels = np.asarray(labels)
  n = num_clusters or len(np.unique(labels))
  n = max(1, min(n, len(labels)))
  pred = KMeans(n_clusters=n, n_init=4, random_state=seed).fit_predict(_normalize(embeddings))
  return clustering_scores(labels, pred)
