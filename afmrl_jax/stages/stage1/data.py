"""Stage-1 data from the run config: catalog, tokenizer, BM25 statistics, training and evaluation pipelines.

`make(run, workdir) -> Stage1Data`. The embedded synthetic catalog (with its tokenizer and corpus
statistics) is generated once into `catalog.cache_dir` (default `<workdir>/data_cache`) and loaded on
later runs; an on-disk manifest (`catalog.manifest`) is read instead when set.

Attributes (`AttributeOptions`): `source` is `teacher` (the catalog's teacher strings, default), `true`
(the ground-truth product attributes, a manifest's `attributes`: an oracle for ablations), `none` (no
attribute strings: no BM25 terms, no text) or a generated-attributes JSONL file (one
`{"listing_id": int, "attributes": str}` per line). The source gives both the BM25 terms of AGCL (and
their corpus statistics) and, with `enrich_queries`, the text appended to the prompts (both towers,
training and evaluation), for the synthetic catalog and for manifests alike. A loss that uses the BM25
terms on training listings of which more than `max_missing_share` have no attribute string stops before
training (it would silently be InfoNCE on them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from afmrl_jax.config import schema
from afmrl_jax.train import catalog as catalog_lib



@dataclasses.dataclass
class Stage1Data:
  """Everything stage 1 reads. `train_iter()` is a fresh checkpointable iterator (get/set_state)."""
  tokenizer: Any
  image_grid_thw: tuple[int, int, int]
  idf: np.ndarray
  avg_doc_len: float
  train_iter: Callable[[], Iterator]
  # eval_batches(split, side=None) -> batch dicts for train.evaluate; side 'query' | 'candidate'
  # (default: 'candidate' for the gallery split, else 'query')
  eval_batches: Callable[..., Iterator]
  listings_by_id: Callable[[], Mapping[int, Any]]
  catalog: Any
  stats: Any = None  # attributes.bm25.CorpusStats of the BM25 terms
  pipeline: Any = None  # the completed data.pipeline.PipelineConfig
  train_table: Any = None  # data.table.ListingTable the training batches draw from
  # listing_id -> attribute string replacing the catalog's (a generated file, or '' for source none); None
  attribute_overrides: Mapping[int, str] | None = None



def pipeline_config(run: schema.Run):
  """`run.pipeline` completed with what other sections decide: the image size, the attribute strings, and
  fresh views only for the synthetic catalog (they re-render its products; a manifest's listings have their
  own photos only, so `pipeline.fresh_views` means nothing there and is off whatever its value)."""
  source = run.attributes.source
  named = "true" if source == "true" else "teacher"  # a generated file overrides per listing
  return dataclasses.replace(run.pipeline, image_size=run.catalog.image_size,
                             text_attributes=named if run.attributes.enrich_queries else "none",
                             term_source=named, fresh_views=run.pipeline.fresh_views and not run.catalog.manifest)



def make(run: schema.Run, workdir: str) -> Stage1Data:
  """The catalog, tokenizer, BM25 statistics and pipelines of `run`."""
  from afmrl_jax.data import pipeline
  from afmrl_jax.data.table import ListingTable
  catalog, tokenizer, stats = catalog_lib.load_catalog(run, workdir)
  source = run.attributes.source
  generated = None
  if source == "none":  # every listing's string is empty: no terms, no text
    generated = {l.listing_id: "" for l in catalog.listings}
  elif source not in ("teacher", "true"):
    generated = catalog_lib.read_generated_attributes(source, [l.listing_id for l in catalog.listings],
                                          run.attributes.skip_bad_rows)
  catalog_lib.check_attribute_coverage(run, catalog.split("train"), generated)
  if run.catalog.manifest and generated is not None and source != "none":
    # The BM25 vocabulary and IDF of a manifest run come from the strings that give the terms: here the
    # generated file's (load_catalog has not read it). The synthetic catalog keeps its cached teacher
    # statistics, which cover every value its generators can write.
    from afmrl_jax.attributes.bm25 import CorpusStats
    stats = CorpusStats.from_texts([generated.get(l.listing_id, "") for l in catalog.split("train")])
  pipe = pipeline_config(run)
  train_table = ListingTable.from_catalog(catalog, "train")
  if pipe.train_fraction < 1.0:
    train_table = train_table.product_share(pipe.train_fraction, pipe.seed)
  image_grid_thw = tuple(int(g) for g in pipeline.image_grid_thw(pipe))
  fresh = catalog_lib.synthetic_catalog_config(run) if pipe.fresh_views else None

  def train_iter():
    ds = pipeline.train_dataset(train_table, tokenizer, stats, pipe, fresh_view_config=fresh,
                                attributes_by_listing=generated, terms_by_listing=generated)
    return iter(ds)

  tables: dict[str, Any] = {}

  def eval_batches(split: str, side: str | None = None):
    if split not in tables:
      tables[split] = ListingTable.from_catalog(catalog, split)
    side = side or ("candidate" if split == "gallery" else "query")
    ds = pipeline.eval_dataset(tables[split], tokenizer, stats, pipe, side=side,
                               attributes_by_listing=generated, terms_by_listing=generated)
    for batch in ds:
      batch = dict(batch)
      # Evaluation's identity is the *true* product (relisted duplicates are hits).
      batch["product_id"] = batch["true_product_id"]
      batch["valid"] = np.asarray(batch["valid"]).astype(bool)
      yield batch

  def listings_by_id():
    return {l.listing_id: l for l in catalog.listings if l.split in ("gallery", "query")}

  return Stage1Data(tokenizer=tokenizer, image_grid_thw=image_grid_thw, idf=np.asarray(stats.idf, np.float32),
                    avg_doc_len=float(stats.avg_doc_len), train_iter=train_iter, eval_batches=eval_batches,
                    listings_by_id=listings_by_id, catalog=catalog, stats=stats, pipeline=pipe,
                    train_table=train_table, attribute_overrides=generated)
