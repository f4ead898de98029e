"""The Retriever protocol shared by the exact and ScaNN indexes."""

from __future__ import annotations

import json
import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from afmrl_jax.vectors import l2_normalize


@runtime_checkable
class Retriever(Protocol):
  """Maximum-inner-product search over L2-normalised gallery embeddings.

  `build(embeddings [N, D], ids int64 [N]) -> self`; `search(queries [Q, D], k) -> (ids int64 [Q, k],
  scores float32 [Q, k])`, best first; `save(directory)`; `Cls.load(directory)`. An approximate index may
  find fewer than k rows for a query: the row then ends in id -1 with score -inf ("no result": never a
  hit, a neighbour or a mined negative; `metrics.labels_at` reads labels at such ids).
  """

  def build(self, embeddings: np.ndarray, ids: np.ndarray | None = None) -> "Retriever":
    ...

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ...

  def save(self, directory: str) -> None:
    ...

  @classmethod
  def load(cls, directory: str) -> "Retriever":
    ...


def unit_rows(x: np.ndarray) -> np.ndarray:
  """Embeddings x [N, D] as unit float32 rows (`vectors.l2_normalize`); other shapes are refused."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"embeddings must be [N, D], got shape {x.shape}.")
  return l2_normalize(x)


def check_ids(ids: np.ndarray | None, n: int) -> np.ndarray:
  """Gallery ids as int64 [N] (row numbers when None)."""
  if ids is None:
    return np.arange(n, dtype=np.int64)
  ids = np.asarray(ids, dtype=np.int64)
  if ids.shape != (n,):
    raise ValueError(f"ids must be [N={n}], got shape {ids.shape}.")
  return ids


def write_meta(directory: str, kind: str, **fields: Any) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "retriever.json"), "w") as f:
    json.dump(dict(kind=kind, **fields), f, indent=1)


def read_meta(directory: str, kind: str | None = None) -> dict[str, Any]:
  path = os.path.join(directory, "retriever.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no saved retriever here (expected retriever.json from save()).")
  with open(path) as f:
    meta = json.load(f)
  if kind is not None and meta.get("kind") != kind:
    raise ValueError(f"{path}: holds a '{meta.get('kind')}' retriever, not '{kind}'.")
  return meta
