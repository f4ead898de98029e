"""ScaNN index over L2-normalised gallery embeddings, saved in the workdir and reloadable.

Small galleries are scored exhaustively (exact, and faster to build than a tree); above
`brute_force_below` rows a k-means tree partitions the gallery, anisotropic hashing (AH) scores the
searched leaves and the best `reorder` candidates are re-scored exactly.
"""

from __future__ import annotations

import math
import os

import numpy as np

from afmrl_jax.retrieval.base import check_ids, read_meta, unit_rows, write_meta


class ScannRetriever:
  """ScaNN maximum-inner-product search (dot product of unit vectors = cosine).

  Args:
    brute_force_below: galleries with fewer rows are scored exhaustively.
    num_leaves: tree leaves; 0 = about sqrt(N).
    leaves_to_search: leaves probed per query; 0 = a third of the leaves, at least 8.
    reorder: candidates re-scored exactly after AH; 0 = max(100, 4 * k) at search time.
    dims_per_block: AH sub-space width (2 is ScaNN's recommended accuracy/speed point).
    anisotropic_threshold: AH's anisotropic quantisation threshold (0.2 as in ScaNN's examples).
  """

  kind = "scann"

  def __init__(self, brute_force_below: int = 20000, num_leaves: int = 0, leaves_to_search: int = 0,
               reorder: int = 0, dims_per_block: int = 2, anisotropic_threshold: float = 0.2,
               seed_neighbors: int = 10):
    self.options = dict(brute_force_below=int(brute_force_below), num_leaves=int(num_leaves),
                        leaves_to_search=int(leaves_to_search), reorder=int(reorder),
                        dims_per_block=int(dims_per_block),
                        anisotropic_threshold=float(anisotropic_threshold),
                        seed_neighbors=int(seed_neighbors))
    self.searcher = None
    self.ids: np.ndarray | None = None
    self.mode: str | None = None  # 'brute_force' or 'tree_ah' once built

  def _plan(self, n: int) -> dict[str, int]:
    o = self.options
    leaves = o["num_leaves"] or max(2, int(round(math.sqrt(n))))
    leaves = min(leaves, max(2, n // 10))  # ScaNN needs a few points per leaf to train
    search = o["leaves_to_search"] or max(8, leaves // 3)
    return dict(num_leaves=leaves, leaves_to_search=min(search, leaves))

  def build(self, embeddings: np.ndarray, ids: np.ndarray | None = None) -> "ScannRetriever":
    """Indexes embeddings [N, D] (normalised here) under ids int64 [N] (row numbers if None)."""
    import scann  # lazy: ScaNN is heavy and only needed when an index is built or loaded

    db = unit_rows(embeddings)
    n = db.shape[0]
    self.ids = check_ids(ids, n)
    o = self.options
    builder = scann.scann_ops_pybind.builder(db, min(o["seed_neighbors"], n), "dot_product")
    if n < o["brute_force_below"]:
      self.mode = "brute_force"
      builder = builder.score_brute_force()
    else:
      self.mode = "tree_ah"
      plan = self._plan(n)
      builder = builder.tree(num_leaves=plan["num_leaves"], num_leaves_to_search=plan["leaves_to_search"],
                             training_sample_size=n).score_ah(
                                 o["dims_per_block"],
                                 anisotropic_quantization_threshold=o["anisotropic_threshold"]).reorder(
                                     max(o["reorder"], 100))
    self.searcher = builder.build()
    self.size = n
    return self

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] -> (ids int64 [Q, k], scores float32 [Q, k]), best first; -1 / -inf at the end of
    a row where the searched leaves held fewer than k rows (tree_ah only)."""
    if self.searcher is None:
      raise RuntimeError("ScannRetriever.search called before build() or load().")
    if not 1 <= k <= self.size:
      raise ValueError(f"ScannRetriever.search: k={k} must be in [1, {self.size}] (the gallery size).")
    q = unit_rows(queries)
    kwargs = dict(final_num_neighbors=k)
    if self.mode == "tree_ah":
      kwargs["pre_reorder_num_neighbors"] = max(self.options["reorder"] or 100, 4 * k)
      kwargs["leaves_to_search"] = self._plan(self.size)["leaves_to_search"]
    if q.shape[0] >= 512:
      idx, scores = self.searcher.search_batched_parallel(q, **kwargs)
    else:
      idx, scores = self.searcher.search_batched(q, **kwargs)
    idx = np.asarray(idx, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if idx.shape != (q.shape[0], k):
      raise RuntimeError(f"ScaNN returned shape {idx.shape}, expected {(q.shape[0], k)}.")
    # When the searched leaves hold fewer than k rows, ScaNN pads the list with row 0 and a NaN score:
    # that is "no result" (-1, -inf), never row 0 (it would count as a hit or a neighbour).
    pad = ~np.isfinite(scores)
    return np.where(pad, -1, self.ids[idx]), np.where(pad, -np.inf, scores).astype(np.float32)

  def save(self, directory: str) -> None:
    """Writes the ScaNN artifacts (relative paths, so the folder can move), ids and options."""
    if self.searcher is None:
      raise RuntimeError("ScannRetriever.save called before build().")
    artifacts = os.path.join(directory, "scann")
    os.makedirs(artifacts, exist_ok=True)
    self.searcher.serialize(artifacts, relative_path=True)
    np.save(os.path.join(directory, "ids.npy"), self.ids)
    write_meta(directory, self.kind, mode=self.mode, size=self.size, options=self.options)

  @classmethod
  def load(cls, directory: str) -> "ScannRetriever":
    import scann

    meta = read_meta(directory, cls.kind)
    r = cls(**meta["options"])
    r.searcher = scann.scann_ops_pybind.load_searcher(os.path.join(directory, "scann"))
    r.ids = np.load(os.path.join(directory, "ids.npy"))
    r.mode, r.size = meta["mode"], meta["size"]
    return r
