"""Stage-1 data from the run config: catalog, tokenizer, BM25 statistics, training and evaluation pipelines.

`make(config, workdir) -> Stage1Data`. The embedded synthetic catalog (with its tokenizer and corpus
statistics) is generated once into `catalog.cache_dir` (default `<workdir>/data_cache`) and loaded on
later runs; an on-disk manifest (`catalog.manifest`) is read instead when set.

Attributes: `attributes.source` is `teacher` (the catalog's teacher strings, default), `true` (the
ground-truth product attributes: an oracle for ablations) or a generated-attributes JSONL file (one
`{"listing_id": int, "attributes": str}` per line). `attributes.enrich_queries` appends them to the prompt
text (both towers, training and evaluation). The BM25 terms of AGCL come from the teacher (or true)
strings; a generated file changes the prompt text only (see the report: the pipeline's term source has no
per-listing override yet).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from afmrl_jax.train import builders


@dataclasses.dataclass
class Stage1Data:
  """Everything stage 1 reads. `train_iter()` is a fresh checkpointable iterator (get/set_state)."""
  tokenizer: Any
  grid: tuple[int, int, int]
  idf: np.ndarray
  avg_doc_len: float
  train_iter: Callable[[], Iterator]
  eval_batches: Callable[[str], Iterator]  # 'gallery' | 'query' -> batch dicts for train.evaluate
  listings_by_id: Callable[[], Mapping[int, Any]]
  catalog: Any


def read_generated_attributes(path: str) -> dict[int, str]:
  """listing_id -> attribute string from a JSONL file; errors name the file and line."""
  out = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        out[int(row["listing_id"])] = str(row["attributes"])
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{n}: expected {{\"listing_id\": int, \"attributes\": str}} ({e}).") from e
  return out


def pipeline_config(config: ml_collections.ConfigDict, *, batch_size: int | None = None):
  """`config.pipeline` (+ catalog image size, attribute options) -> `data.pipeline.PipelineConfig`."""
  from afmrl_jax.data.pipeline import PipelineConfig
  p = config.pipeline
  source = config.attributes.source
  text_attributes = "none"
  if config.attributes.enrich_queries:
    text_attributes = "true" if source == "true" else "teacher"  # a generated file overrides per listing
  return PipelineConfig(
      batch_size=batch_size or p.batch_size, image_size=config.catalog.image_size,
      max_text_len=p.max_text_len, max_terms=p.max_terms, pair_mode=p.pair_mode, sampling=p.batching,
      family_share=p.family_share, fresh_views=p.fresh_views, text_attributes=text_attributes,
      term_source="true" if source == "true" else "teacher", seed=p.shuffle_seed,
      num_threads=max(1, p.num_workers))


def _load_catalog(config, workdir: str):
  """(catalog, tokenizer, corpus stats)."""
  from afmrl_jax.attributes.bm25 import CorpusStats
  from afmrl_jax.data import defaults, manifest, tokenizer as tokenizer_lib
  cache = config.catalog.cache_dir or os.path.join(workdir, "data_cache")
  hf_tok = config.model.tokenizer or config.model.hf_checkpoint
  if config.catalog.manifest:
    catalog = manifest.catalog_from_manifest(config.catalog.manifest, config.catalog.image_size,
                                             skip_bad_rows=config.catalog.skip_bad_rows)
    if catalog.report is not None and catalog.report.skipped:
      logging.warning("%s", catalog.report.summary())
    train = catalog.split("train")
    if hf_tok:
      tokenizer = tokenizer_lib.load_tokenizer(hf_tok)
    else:
      texts = [t for l in train for t in (l.title, l.teacher_attributes)]
      tokenizer = tokenizer_lib.default_tokenizer(texts, os.path.join(cache, "manifest_tokenizer"))
    stats = CorpusStats.from_texts([l.teacher_attributes for l in train])
    return catalog, tokenizer, stats
  data = defaults.default_catalog(cache, builders.catalog_config(config))
  tokenizer = tokenizer_lib.load_tokenizer(hf_tok) if hf_tok else data.tokenizer
  stats = data.stats
  if config.attributes.source == "true":
    stats = CorpusStats.from_texts([l.product_attributes for l in data.catalog.split("train")])
  return data.catalog, tokenizer, stats


def make(config: ml_collections.ConfigDict, workdir: str) -> Stage1Data:
  from afmrl_jax.data import pipeline
  from afmrl_jax.data.table import ListingTable
  catalog, tokenizer, stats = _load_catalog(config, workdir)
  source = config.attributes.source
  generated = read_generated_attributes(source) if source not in ("teacher", "true") else None
  train_cfg = pipeline_config(config)
  eval_cfg = pipeline_config(config, batch_size=config.pipeline.eval_batch_size)
  train_table = ListingTable.from_catalog(catalog, "train")
  grid = tuple(int(g) for g in pipeline.image_grid_thw(train_cfg))
  fresh = builders.catalog_config(config) if (config.pipeline.fresh_views and not config.catalog.manifest) else None
  if config.pipeline.fresh_views and fresh is None:
    raise ValueError("config.pipeline.fresh_views needs the synthetic catalog (config.catalog.manifest is set).")

  def train_iter():
    ds = pipeline.train_dataset(train_table, tokenizer, stats, train_cfg, fresh_view_config=fresh,
                                attributes_by_listing=generated, terms_by_listing=generated)
    return iter(ds)

  tables: dict[str, Any] = {}

  def eval_batches(split: str):
    if split not in tables:
      tables[split] = ListingTable.from_catalog(catalog, split)
    side = "candidate" if split == "gallery" else "query"
    ds = pipeline.eval_dataset(tables[split], tokenizer, stats, eval_cfg, side=side,
                               attributes_by_listing=generated, terms_by_listing=generated)
    for batch in ds:
      batch = dict(batch)
      # Evaluation's identity is the *true* product (relisted duplicates are hits, METHOD.md).
      batch["product_id"] = batch["true_product_id"]
      batch["valid"] = np.asarray(batch["valid"]).astype(bool)
      yield batch

  def listings_by_id():
    return {l.listing_id: l for l in catalog.listings if l.split in ("gallery", "query")}

  return Stage1Data(tokenizer=tokenizer, grid=grid, idf=np.asarray(stats.idf, np.float32),
                    avg_doc_len=float(stats.avg_doc_len), train_iter=train_iter, eval_batches=eval_batches,
                    listings_by_id=listings_by_id, catalog=catalog)
