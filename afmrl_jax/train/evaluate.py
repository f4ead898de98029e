"""Retrieval evaluation: embed gallery and queries, index, score, report.

Called at the end of stage-1 training and by the `eval` stage (see docs/interfaces.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

Batch = Mapping[str, Any]


def default_eval_config() -> dict[str, Any]:
  """The `config.eval` fields and their defaults (plain dict; wrap in a ConfigDict in configs/)."""
  return dict(
      retriever="scann",  # 'scann' (the index stage 2 uses) or 'exact' (blockwise inner product)
      recall_ks=(1, 5, 10),  # instance Recall@K and group Recall@K reported in the table
      curve_ks=(1, 2, 3, 5, 10, 20, 50),  # Recall@K vs K plot
      map_k=10,  # mAP@K with category relevance
      knn_k=10,  # neighbours voting in kNN category classification
      num_clusters=0,  # k-means clusters; 0 = number of categories
      seed=0,
      exclude_self=True,  # a query's own listing in the gallery is neither a hit nor a rank
      scann_brute_force_below=20000,  # gallery rows; below it ScaNN scores exhaustively
      scann_num_leaves=0,  # 0 = about sqrt(gallery rows)
      scann_leaves_to_search=0,  # 0 = about a tenth of the leaves (at least 8)
      scann_reorder=0,  # 0 = max(100, 4 * searched k)
      save_index=True,
      output_dir="eval",  # relative to the workdir
      num_report_queries=12,
      report_top=5,
      train_metrics_file="train_metrics.jsonl",  # relative to the workdir; the loss curve's source
  )


def evaluate(
    embed_fn: Callable[[Batch], Any],
    gallery_batches: Iterable[Batch],
    query_batches: Iterable[Batch],
    workdir: str,
    config: Any,
    *,
    listings: Mapping[int, Any] | None = None,
    step: int | None = None,
) -> dict[str, float]:
  """Embeds, indexes and scores; writes the report under `workdir/<eval.output_dir>`.

  Args:
    embed_fn: batch dict -> embeddings [B, D] (NumPy or jax array).
    gallery_batches: batch dicts with `listing_id`, `product_id`, `category_id` ([B] ints), optional
      `valid` [B] bool and display keys `title`, `attributes` ([B] str), `image` ([B, H, W, 3] uint8).
    query_batches: likewise for the queries.
    workdir: run directory.
    config: run ConfigDict with an `eval` field, or the eval config itself (see `default_eval_config`).
    listings: optional listing_id -> Listing-like record for display fields absent from the batches.
    step: training step; when given, outputs go to `<output_dir>/step_<step>`.
  Returns:
    Flat dict of float metrics (see docs/interfaces.md).
  """
  raise NotImplementedError("afmrl_jax/train/evaluate.py: evaluate() is being written.")
