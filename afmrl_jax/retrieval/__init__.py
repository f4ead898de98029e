"""Retrieval: metrics on ranked results, exact and ScaNN indexes behind one Retriever protocol."""

from __future__ import annotations

from typing import Any


def make_retriever(kind: str = "scann", **options: Any):
  """'scann' -> ScannRetriever(**options); 'exact' -> ExactRetriever(**options)."""
  if kind == "scann":
    from afmrl_jax.retrieval.scann_index import ScannRetriever
    return ScannRetriever(**options)
  if kind == "exact":
    from afmrl_jax.retrieval.exact import ExactRetriever
    return ExactRetriever(**options)
  raise ValueError(f"make_retriever: kind must be 'scann' or 'exact', got {kind!r}.")


def load_retriever(directory: str):
  """Reloads whatever retriever `save(directory)` wrote there."""
  from afmrl_jax.retrieval.base import read_meta
  kind = read_meta(directory)["kind"]
  if kind == "scann":
    from afmrl_jax.retrieval.scann_index import ScannRetriever
    return ScannRetriever.load(directory)
  from afmrl_jax.retrieval.exact import ExactRetriever
  return ExactRetriever.load(directory)
