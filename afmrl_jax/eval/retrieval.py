"""Retrieval evaluation: embed gallery and queries, index, score, report.

Called at the end of stage-1 training and by the `eval` stage (contract in docs/interfaces.md).
Identity is the *true* product id (relisted duplicates of one product are hits); coarse relevance
(mAP@K, classification, clustering) is the category.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from afmrl_jax.config.sections import EvalConfig
from afmrl_jax.eval.embed import ID_KEYS, Batch, embed_all, gather_across_processes
from afmrl_jax.retrieval import make_retriever
from afmrl_jax.retrieval import metrics as M
from afmrl_jax.retrieval.sharded import ShardedIndex
from afmrl_jax.eval import report
from afmrl_jax.train import files


def _sum_across_processes(x: np.ndarray) -> np.ndarray:
  """float64 `x` summed over the processes. It travels as float32 high and low parts (the gather goes
  through jax arrays, float32 unless jax_enable_x64), which keep about 48 of its 53 mantissa bits."""
  jax = sys.modules.get("jax")
  if jax is None or jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  hi = x.astype(np.float32)
  g = np.asarray(multihost_utils.process_allgather(np.stack([hi, (x - hi).astype(np.float32)])), np.float64)
  return (g[:, 0] + g[:, 1]).sum(axis=0)


def reorder(side: dict[str, Any], order: np.ndarray) -> dict[str, Any]:
  out = {k: side[k][order] for k in ("embeddings",) + ID_KEYS if k in side}
  out["display"] = {k: [v[i] for i in order] for k, v in side.get("display", {}).items()}
  return out


@dataclasses.dataclass
class GalleryStats:
  """What the metrics need of the gallery embeddings: per-category sums of the unit rows (nearest-centroid
  classification) and the k-means sample (canonical rows, embeddings [S, D], category ids [S])."""
  classes: np.ndarray
  class_sums: np.ndarray
  cluster_embeddings: np.ndarray
  cluster_labels: np.ndarray


def _cluster_rows(n: int, cfg: EvalConfig) -> np.ndarray:
  """The canonical gallery rows k-means runs on: all, or a seeded sample of `cfg.cluster_sample`."""
  rows = np.arange(n)
  if 0 < cfg.cluster_sample < n:  # k-means cost grows with N; a sample estimates the scores
    rows = np.sort(np.random.default_rng(cfg.seed).choice(rows, cfg.cluster_sample, replace=False))
  return rows


def gallery_stats(gallery: dict[str, Any], cfg: EvalConfig) -> GalleryStats:
  """`GalleryStats` of a whole gallery in canonical order (`embeddings` [N, D], `category_id` [N])."""
  classes = np.unique(gallery["category_id"])
  rows = _cluster_rows(len(gallery["category_id"]), cfg)
  return GalleryStats(classes, M.class_sums(gallery["embeddings"], gallery["category_id"], classes),
                      gallery["embeddings"][rows], gallery["category_id"][rows])


def _sharded_gallery_stats(local: dict[str, Any], shard_rows: np.ndarray, gallery: dict[str, Any],
                           cfg: EvalConfig) -> GalleryStats:
  """`GalleryStats` from each process's gallery rows (`local`, at canonical rows `shard_rows`): the
  category sums are added up, and only the k-means sample's embeddings are gathered."""
  classes = np.unique(gallery["category_id"])
  sums = _sum_across_processes(M.class_sums(local["embeddings"], local["category_id"], classes))
  mine = np.isin(shard_rows, _cluster_rows(len(gallery["category_id"]), cfg))
  sample = gather_across_processes({"row": shard_rows[mine], "embeddings": local["embeddings"][mine]},
                                    keys=("row", "embeddings"))
  order = np.argsort(sample["row"], kind="stable")
  return GalleryStats(classes, sums, sample["embeddings"][order], gallery["category_id"][sample["row"][order]])


def compute_metrics(query: dict[str, Any], gallery: dict[str, Any], ranked_rows: np.ndarray,
                    cfg: EvalConfig, stats: GalleryStats | None = None) -> dict[str, float]:
  """All metrics from gallery row indices ranked per query ([Q, K], self already excluded; -1 = no result,
  which counts as a miss); `stats` of the gallery embeddings default to `gallery_stats(gallery, cfg)` (a
  sharded gallery brings its own)."""
  k_avail = ranked_rows.shape[1]
  q_pid, q_cat = query["product_id"], query["category_id"]
  q_ids = query["listing_id"] if cfg.exclude_self else None
  g_ids = gallery["listing_id"] if cfg.exclude_self else None
  product_pos = M.count_positives(q_pid, gallery["product_id"], q_ids, g_ids)
  category_pos = M.count_positives(q_cat, gallery["category_id"], q_ids, g_ids)
  # A row of -1 (an approximate index found fewer results) has label MISSING: a miss, and no kNN vote.
  product_hits = M.relevance(M.labels_at(gallery["product_id"], ranked_rows), q_pid)
  category_labels = M.labels_at(gallery["category_id"], ranked_rows)
  category_hits = M.relevance(category_labels, q_cat)

  out: dict[str, float] = {}
  for k in sorted(set(cfg.recall_ks) | set(cfg.curve_ks)):
    if k <= k_avail:
      out[f"recall@{k}"] = M.recall_at_k(product_hits, k, product_pos)
      out[f"group_recall@{k}"] = M.group_recall_at_k(product_hits, product_pos, k)
  map_k = min(cfg.map_k, k_avail)
  out[f"map@{map_k}"] = M.map_at_k(category_hits, category_pos, map_k)
  out["knn_accuracy"] = M.knn_accuracy(category_labels, q_cat, min(cfg.knn_k, k_avail))
  stats = stats or gallery_stats(gallery, cfg)
  out["centroid_accuracy"] = M.centroid_accuracy_from_sums(query["embeddings"], q_cat, stats.class_sums,
                                                           stats.classes)
  out.update(M.kmeans_clustering_scores(stats.cluster_embeddings, stats.cluster_labels, cfg.num_clusters,
                                        cfg.seed))
  out["num_queries"] = float(len(q_pid))
  out["num_gallery"] = float(len(gallery["product_id"]))
  out["num_queries_without_positive"] = float(np.sum(product_pos == 0))
  return out


def make_index(cfg: EvalConfig, kind: str | None = None):
  """An unbuilt retriever of `kind` (default `cfg.retriever`) with `cfg`'s ScaNN / exact options."""
  kind = kind or cfg.retriever
  return make_retriever(kind, **_retriever_options(cfg, kind))


def _retriever_options(cfg: EvalConfig, kind: str) -> dict[str, Any]:
  if kind == "exact":
    backend = cfg.exact_backend
    if backend == "auto":
      jax = sys.modules.get("jax")
      backend = "jax" if jax is not None and jax.default_backend() != "cpu" else "numpy"
    return dict(backend=backend)
  return dict(brute_force_below=cfg.scann_brute_force_below, num_leaves=cfg.scann_num_leaves,
              leaves_to_search=cfg.scann_leaves_to_search, reorder=cfg.scann_reorder)


def available_k(num_gallery: int, cfg: EvalConfig, queries_in_gallery: bool) -> int:
  """The most results every query can have in a gallery of `num_gallery` listings: one fewer when the
  queries' own listings are in the gallery and excluded (`exclude_self`)."""
  return num_gallery - 1 if cfg.exclude_self and queries_in_gallery and num_gallery > 1 else num_gallery


def index_gallery(local: dict[str, Any], retriever, sharded: bool) -> tuple[dict[str, Any], Any, np.ndarray | None]:
  """Indexes a gallery whose rows (`embed_all` output) are spread over the processes.

  Returns the gallery in canonical order (by listing id: k-means and tie-breaking must not depend on how
  it was split into batches or processes) with its ids, the index to search (row ids = canonical rows),
  and the canonical rows of this process's `local` rows (None when not sharded). Gathered: every process
  holds the embeddings too and builds `retriever` over all of them. Sharded: only the ids are gathered;
  `retriever` holds this process's rows in a `ShardedIndex` whose search merges every process's top k.
  """
  gallery = gather_across_processes(local, ID_KEYS if sharded else ("embeddings",) + ID_KEYS)
  gallery = reorder(gallery, np.argsort(gallery["listing_id"], kind="stable"))
  if sharded:
    if len(np.unique(gallery["listing_id"])) < len(gallery["listing_id"]):
      raise ValueError("evaluate: gallery listing ids repeat; a sharded gallery needs unique listing ids.")
    shard_rows = np.searchsorted(gallery["listing_id"], local["listing_id"])
    order = np.argsort(shard_rows)  # each shard in canonical order: exact ties break as in one index
    return (gallery, ShardedIndex(retriever).build(local["embeddings"][order], shard_rows[order]), shard_rows)
  retriever.build(gallery["embeddings"], np.arange(len(gallery["listing_id"]), dtype=np.int64))
  return gallery, retriever, None


def evaluate(
    embed_fn: Callable[[Batch], Any],
    gallery_batches: Iterable[Batch],
    query_batches: Iterable[Batch],
    workdir: str,
    cfg: EvalConfig = EvalConfig(),
    *,
    listings: Mapping[int, Any] | None = None,
    step: int | None = None,
    train_metrics_path: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, float]:
  """Embeds, indexes and scores; writes the report under `workdir/<eval.output_dir>`.

  Args:
    embed_fn: batch dict -> process-local embeddings [B, D] (NumPy or jax array).
    gallery_batches: batch dicts with `listing_id`, `product_id`, `category_id` ([B] ints), optional
      `valid` [B] bool and display keys `title`, `attributes`, `category` ([B] str),
      `image` ([B, H, W, 3] uint8).
    query_batches: likewise for the queries.
    workdir: run directory.
    cfg: what to compute and write.
    listings: optional listing_id -> Listing-like record for display fields absent from the batches.
    step: training step; when given, outputs go to `<output_dir>/step_<step>`.
    train_metrics_path: the training run's metrics JSONL, for the loss curve of the report.
    info: extra JSON-able entries for metrics.json (top level) and metrics.md, e.g. stage 1's
      `catalog_skipped` / `catalog_skipped_reasons`.
  Returns:
    Flat dict of float metrics (see docs/interfaces.md), identical on every process.
  """
  local = embed_all(embed_fn, gallery_batches, "gallery")
  query = gather_across_processes(embed_all(embed_fn, query_batches, "query"))
  if local["embeddings"].shape[1] != query["embeddings"].shape[1]:
    raise ValueError(f"evaluate: gallery width {local['embeddings'].shape[1]} != query width "
                     f"{query['embeddings'].shape[1]}.")
  sharded = cfg.gallery_search == "sharded"
  gallery, index, shard_rows = index_gallery(local, make_index(cfg), sharded)
  retriever = index.retriever if sharded else index
  stats = _sharded_gallery_stats(local, shard_rows, gallery, cfg) if sharded else None
  n = len(gallery["listing_id"])
  want = max(cfg.recall_ks + cfg.curve_ks + (cfg.map_k, cfg.knn_k, cfg.report_top))
  k = min(want, available_k(n, cfg, bool(np.isin(query["listing_id"], gallery["listing_id"]).any())))
  search_k = min(k + 1, n) if cfg.exclude_self else k
  rows, scores = index.search(query["embeddings"], search_k)
  if cfg.exclude_self:
    _, rows, scores = M.exclude_self(M.labels_at(gallery["listing_id"], rows), query["listing_id"], k, rows,
                                     scores)
  metrics = compute_metrics(query, gallery, rows, cfg, stats)

  jax = sys.modules.get("jax")
  process = jax.process_index() if jax is not None else 0
  out_dir = os.path.join(workdir, cfg.output_dir)
  if step is not None:
    out_dir = os.path.join(out_dir, f"step_{int(step)}")
  if process != 0 and not sharded:
    return metrics
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise OSError(f"evaluate: cannot create the output folder {out_dir} ({e}); check --workdir.") from e
  _remove_stale_gallery_files(out_dir, sharded, process, jax.process_count() if jax is not None else 1)
  if sharded:  # each process writes its own shard (the output folder must be shared by the processes)
    if cfg.save_index and index.size:
      retriever.save(os.path.join(out_dir, "index", f"process-{process:03d}"))
    np.savez(os.path.join(out_dir, _shard_file(process)),
             embeddings=local["embeddings"], **{key: local[key] for key in ID_KEYS})
    if process != 0:
      return metrics
  else:
    if cfg.save_index:
      retriever.save(os.path.join(out_dir, "index"))
    np.savez(os.path.join(out_dir, "gallery_embeddings.npz"), embeddings=gallery["embeddings"],
             **{key: gallery[key] for key in ID_KEYS})
  files.write_metrics_json(os.path.join(out_dir, "metrics.json"), metrics,
                            info=dict(step=step, retriever=cfg.retriever,
                                      retriever_mode=getattr(retriever, "mode", "exact"),
                                      config=dataclasses.asdict(cfg), **(info or {})))
  if cfg.report:
    report.write_report(out_dir, metrics, cfg, query=query, gallery=gallery, ranked_rows=rows,
                        scores=scores, listings=listings,
                        train_metrics_path=train_metrics_path, info=info)
  return metrics


def load_gallery_embeddings(out_dir: str) -> dict[str, np.ndarray]:
  """The gallery embeddings an evaluation wrote to `out_dir`: `gallery_embeddings.npz`, or the
  `gallery_embeddings.process-NNN.npz` shards of a sharded search joined in listing-id order.
  Returns {"embeddings" [N, D], "listing_id", "product_id", "category_id" [N]}."""
  single = os.path.join(out_dir, "gallery_embeddings.npz")
  if os.path.isfile(single):
    with np.load(single) as f:
      return {k: f[k] for k in f.files}
  names = sorted(n for n in os.listdir(out_dir) if _shard_of(n) is not None)
  if not names:
    raise FileNotFoundError(f"No gallery_embeddings.npz or gallery_embeddings.process-NNN.npz in {out_dir}.")
  parts = []
  for name in names:
    with np.load(os.path.join(out_dir, name)) as f:
      parts.append({k: f[k] for k in f.files})
  joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  if len(np.unique(joined["listing_id"])) != len(joined["listing_id"]):
    raise ValueError(f"{out_dir}: the gallery_embeddings.process-NNN.npz files repeat listings (left from an "
                     "evaluation with more processes?); evaluate again into an empty folder.")
  order = np.argsort(joined["listing_id"], kind="stable")
  return {k: v[order] for k, v in joined.items()}


def _remove_stale_gallery_files(out_dir: str, sharded: bool, process: int, num_processes: int) -> None:
  """Process 0 removes what an earlier evaluation of the other kind (or with more processes) left in
  `out_dir`, so that `load_gallery_embeddings` reads only this evaluation's gallery."""
  if process != 0:
    return
  for name in os.listdir(out_dir):
    shard = _shard_of(name)
    stale_shard = shard is not None and (not sharded or shard >= num_processes)
    if stale_shard or (sharded and name == "gallery_embeddings.npz"):
      os.remove(os.path.join(out_dir, name))


def _shard_file(process: int) -> str:
  """The file a sharded evaluation's process writes its gallery rows to."""
  return f"gallery_embeddings.process-{process:03d}.npz"


def _shard_of(name: str) -> int | None:
  """The process whose `_shard_file` `name` is; None for any other file."""
  head, tail = "gallery_embeddings.process-", ".npz"
  digits = name[len(head):-len(tail)] if name.startswith(head) and name.endswith(tail) else ""
  return int(digits) if digits.isdigit() else None
