"""Embedding a split: the jitted embed program of a representation model (`make_embed_fn`) and
`embed_all`, which runs it over a split's batches and keeps ids and display fields, gathered across
processes. Used by evaluation, stage 2's environment and stage 1's negative mining."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from afmrl_jax import parallel
from afmrl_jax.models import heads


SIDES = ("query", "candidate")


def side(batch: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The model inputs of one tower: `input_ids`, `attention_mask` (+ `pixel_values` if present)."""
  out = {"input_ids": batch[f"{prefix}_input_ids"], "attention_mask": batch[f"{prefix}_attention_mask"]}
  if f"{prefix}_pixel_values" in batch:
    out["pixel_values"] = batch[f"{prefix}_pixel_values"]
  return out


def terms(batch, prefix):
  return batch.get(f"{prefix}_terms")


@functools.lru_cache(maxsize=8)
def _embed_program(graphdef, image_grid_thw):
  """The jitted embedding of a model structure: new parameters (a mining refresh) reuse its compilation."""

  @jax.jit
  def run(params, rest, inputs):
    return heads.embed(nnx.merge(graphdef, params, rest), inputs, image_grid_thw)

  return run


def make_embed_fn(model_parts, mesh, image_grid_thw, batch_size: int) -> Callable:
  """embed_fn(batch) -> np.ndarray [B, D] of this process's rows, for `train.evaluate.evaluate`.

  Reads `input_ids`, `attention_mask`, `pixel_values` (evaluation batches: one side, unprefixed), else
  the `candidate_*` keys when present, else `query_*`. Batches shorter than
  `batch_size` (the last one) are padded to it so one compiled program serves every batch.
  model_parts: (graphdef, params, rest) of the trained model.
  """
  graphdef, params, rest = model_parts
  run = _embed_program(graphdef, tuple(image_grid_thw))

  def embed_fn(batch):
    if "input_ids" in batch:
      inputs = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    else:
      prefix = "candidate" if "candidate_input_ids" in batch else "query"
      inputs = {k: np.asarray(v) for k, v in side(batch, prefix).items()}
    n = inputs["input_ids"].shape[0]
    local = batch_size // jax.process_count()
    if n > local:
      raise ValueError(f"embed_fn: batch of {n} rows exceeds pipeline.eval_batch_size per process ({local}).")
    if n < local:
      inputs = {k: np.concatenate([v, np.repeat(v[-1:], local - n, axis=0)]) for k, v in inputs.items()}
    with jax.set_mesh(mesh), parallel.logical_rules():
      out = run(params, rest, parallel.global_batch(inputs, mesh))
    return parallel.local_rows(out, mesh)[:n]

  return embed_fn


Batch = Mapping[str, Any]


ID_KEYS = ("listing_id", "product_id", "category_id")


DISPLAY_KEYS = ("title", "attributes", "category", "image")


THUMB = 96  # longest side of the images kept for the HTML page, pixels


def _to_numpy(x: Any) -> np.ndarray:
  return x if isinstance(x, np.ndarray) else np.asarray(x)


def _thumbnail(image: np.ndarray) -> np.ndarray:
  """uint8 [h, w, 3] with the longest side <= THUMB (strided, no resampling library needed)."""
  step = max(1, int(np.ceil(max(image.shape[:2]) / THUMB)))
  return np.ascontiguousarray(image[::step, ::step])


def embed_all(embed_fn: Callable[[Batch], Any], batches: Iterable[Batch], side: str) -> dict[str, Any]:
  """Runs embed_fn over all batches; returns `embeddings [N, D]`, the id arrays and display lists."""
  chunks: dict[str, list] = {k: [] for k in ("embeddings",) + ID_KEYS}
  display: dict[str, list] = {k: [] for k in DISPLAY_KEYS}
  for i, batch in enumerate(batches):
    missing = [k for k in ID_KEYS if k not in batch]
    if missing:
      raise KeyError(f"evaluate: {side} batch {i} lacks {missing} (needs {list(ID_KEYS)}; "
                     "see docs/interfaces.md).")
    emb = _to_numpy(embed_fn(batch)).astype(np.float32)
    n = len(_to_numpy(batch["listing_id"]))
    if emb.ndim != 2 or emb.shape[0] != n:
      raise ValueError(f"evaluate: embed_fn returned shape {emb.shape} for a {side} batch of {n} rows; "
                       "expected [B, D].")
    valid = _to_numpy(batch["valid"]).astype(bool) if "valid" in batch else np.ones(n, bool)
    chunks["embeddings"].append(emb[valid])
    for k in ID_KEYS:
      chunks[k].append(_to_numpy(batch[k]).astype(np.int64)[valid])
    for k in DISPLAY_KEYS:
      if k in batch:
        values = [v for v, ok in zip(batch[k], valid) if ok]
        if k == "image":
          values = [_thumbnail(np.asarray(v)) for v in values]
        display[k].extend(values)
  if not chunks["embeddings"]:
    raise ValueError(f"evaluate: the {side} iterable yielded no batches.")
  out: dict[str, Any] = {k: np.concatenate(v) for k, v in chunks.items()}
  n = len(out["listing_id"])
  if n == 0:
    raise ValueError(f"evaluate: the {side} batches hold no valid rows.")
  # Display fields only when every batch carried them.
  out["display"] = {k: v for k, v in display.items() if len(v) == n}
  return out


def gather_across_processes(side: dict[str, Any], keys: tuple[str, ...] = ("embeddings",) + ID_KEYS
                             ) -> dict[str, Any]:
  """`side[keys]` concatenated over the processes in process order (multi-host); display stays local."""
  jax = sys.modules.get("jax")
  if jax is None or jax.process_count() == 1:
    return side
  from jax.experimental import multihost_utils

  # Processes may hold different row counts: pad to the largest and drop the padding after.
  n = len(side[keys[0]])
  counts = np.asarray(multihost_utils.process_allgather(np.asarray([n])), np.int64).reshape(-1)
  top = int(counts.max())
  out = {"display": {}}
  for k in keys:
    x = side[k]
    if x.dtype.kind == "i" and len(x) and np.abs(x).max() >= 2**31:
      # process_allgather goes through jax arrays, int32 unless jax_enable_x64.
      raise ValueError(f"evaluate: {k} values must fit in int32 for the multi-host gather.")
    padded = np.zeros((top,) + x.shape[1:], x.dtype)
    padded[:n] = x
    g = np.asarray(multihost_utils.process_allgather(padded))  # [P, top, ...]
    out[k] = np.concatenate([g[p, :c] for p, c in enumerate(counts)])
  return out
