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
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging

from afmrl_jax.fields import Checked, bounded, narrow


@dataclasses.dataclass(frozen=True)
class AttributeOptions(Checked):
  """Where the attribute strings come from, and whether they join the prompt text."""
  # 'teacher' (the catalog's teacher attributes) | 'true' (ground truth: an oracle for ablations) | 'none' |
  # path to a generated-attributes JSONL ({"listing_id": int, "attributes": str} per line)
  source: str = "teacher"
  enrich_queries: bool = False  # append the attributes to the query (and candidate) text
  skip_bad_rows: bool = False  # a generated file's unknown or repeated listing ids: skip and count them
  # A loss with BM25 terms stops when more than this share of training listings has no attribute string
  # (1.0: train anyway, with a warning saying how much of it is InfoNCE).
  max_missing_share: float = bounded(0.5, 0.0, 1.0)


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


def read_generated_attributes(path: str, known_ids=None, skip_bad_rows: bool = False) -> dict[int, str]:
  """listing_id -> attribute string from a generated-attributes JSONL file.

  A bad line (not JSON, no `listing_id` / `attributes`), a listing id the catalog does not have
  (`known_ids`) or one seen before raises ValueError naming the file and line; with `skip_bad_rows` such
  lines are skipped, counted and logged instead.
  """
  out: dict[int, str] = {}
  skipped: list[str] = []
  known = None if known_ids is None else set(int(i) for i in known_ids)
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        lid, text = int(row["listing_id"]), str(row["attributes"])
        problem = ("is not a listing of this catalog" if known is not None and lid not in known
                   else "appears twice" if lid in out else "")
      except (ValueError, KeyError, TypeError) as e:
        lid, problem = None, f'is not {{"listing_id": int, "attributes": str}} ({e})'
      if problem:
        message = f"{path}:{n}: listing {lid} {problem}" if lid is not None else f"{path}:{n}: the line {problem}"
        if not skip_bad_rows:
          raise ValueError(message + "; fix the file or set config.attributes.skip_bad_rows=True.")
        skipped.append(message)
        continue
      out[lid] = text
  if skipped:
    logging.warning("Skipped %d bad line(s) of %s; first: %s", len(skipped), path, skipped[0])
  return out


def source_string(listing: Any, source: str) -> str:
  """The attribute string a catalog listing (or a manifest row) has under a named source (`teacher`,
  `true`, `none`); a generated file's strings come from `read_generated_attributes`."""
  if source == "teacher":
    return listing.teacher_attributes
  if source == "true":  # a Listing's product attributes; a ManifestRow's `attributes`
    return getattr(listing, "product_attributes", None) or getattr(listing, "attributes", "")
  return ""


def attribute_coverage_problem(run: Any, strings: list[str]) -> str | None:
  """The one-line problem when the loss uses BM25 terms but more than `attributes.max_missing_share` of the
  training listings' attribute `strings` (under `attributes.source`) are empty; None when they suffice."""
  if not run.loss.needs_bm25 or not strings:
    return None
  missing = sum(not s.strip() for s in strings) / len(strings)
  if missing <= run.attributes.max_missing_share:
    return None
  return (f"config.loss uses attribute terms (bias_scale={run.loss.bias_scale}, mask={run.loss.mask!r}) but "
          f"{missing:.0%} of the {len(strings)} training listings have no attribute string from "
          f"config.attributes.source={run.attributes.source!r}: give the manifest `teacher_attributes` (or "
          f"`attributes` with source=true), choose another source, train InfoNCE (config.loss.bias_scale=0), "
          f"or accept it with config.attributes.max_missing_share=1.0.")


def check_attribute_coverage(run: Any, listings, generated: Mapping[int, str] | None) -> None:
  """Stops (ConfigError, `attribute_coverage_problem`) on training `listings` without enough attribute
  strings; warns when some have none."""
  from afmrl_jax.config import schema
  source = run.attributes.source
  strings = [(generated or {}).get(l.listing_id, "") if generated is not None else source_string(l, source)
             for l in listings]
  problem = attribute_coverage_problem(run, strings)
  if problem:
    raise schema.ConfigError([problem])
  missing = sum(not s.strip() for s in strings)
  if run.loss.needs_bm25 and missing:
    logging.warning("%.0f%% of the training listings have no attribute string from attributes.source=%r: "
                    "the loss is InfoNCE on their rows.", 100 * missing / len(strings), source)


def pipeline_config(run: Any):
  """`run.pipeline` completed with what other sections decide: the image size and the attribute strings."""
  source = run.attributes.source
  named = "true" if source == "true" else "teacher"  # a generated file overrides per listing
  return dataclasses.replace(run.pipeline, image_size=run.catalog.image_size,
                             text_attributes=named if run.attributes.enrich_queries else "none",
                             term_source=named)


def synthetic_catalog_config(run: Any):
  """The synthetic catalog's own config (`data.catalog.CatalogConfig`) from `run.catalog`."""
  from afmrl_jax.data.catalog import CatalogConfig
  return narrow(run.catalog, CatalogConfig)


# A manifest run's record of how the manifest was read: its categories and their keys, and each id space's
# {user id: int id} (the ints in metrics, reports and generated-attributes files).
MANIFEST_IDS = os.path.join("catalog", "manifest_ids.json")


def load_catalog(run: Any, workdir: str):
  """(catalog, tokenizer, BM25 corpus stats) of `run` (a `schema.Run` or its ConfigDict)."""
  from afmrl_jax.attributes.bm25 import CorpusStats
  from afmrl_jax.data import defaults, manifest, tokenizer as tokenizer_lib
  from afmrl_jax.config import schema
  run = schema.parse(run)
  cache = run.catalog.cache_dir or os.path.join(workdir, "data_cache")
  hf_tok = run.model.tokenizer or run.model.hf_checkpoint
  if run.catalog.manifest:
    catalog = manifest.catalog_from_manifest(run.catalog.manifest, run.catalog.image_size,
                                             skip_bad_rows=run.catalog.skip_bad_rows,
                                             split_seed=run.catalog.split_seed, eval_share=run.catalog.eval_share)
    if catalog.report is not None and catalog.report.skipped:
      logging.warning("%s", catalog.report.summary())
    import jax
    if jax.process_index() == 0:
      print(f"catalog {run.catalog.manifest}: {manifest.split_summary(catalog.listings)}", flush=True)
    from afmrl_jax.eval import report
    r = catalog.report
    report.write_json(os.path.join(workdir, MANIFEST_IDS), {
        "manifest": run.catalog.manifest, "categories": list(r.categories),
        "category_keys": {k: list(v) for k, v in r.category_keys.items()},
        "ids": {space: {str(user): int(i) for user, i in ids.items()} for space, ids in r.ids.items()},
        "splits": manifest.split_summary(catalog.listings)})
    train = catalog.split("train")
    if hf_tok:
      tokenizer = tokenizer_lib.load_tokenizer(hf_tok)
    else:
      texts = [t for l in train for t in (l.title, l.teacher_attributes)]
      tokenizer = tokenizer_lib.default_tokenizer(texts, os.path.join(cache, "manifest_tokenizer"))
    stats = CorpusStats.from_texts([source_string(l, run.attributes.source) for l in train])
    return catalog, tokenizer, stats
  data = defaults.default_catalog(cache, synthetic_catalog_config(run))
  tokenizer = tokenizer_lib.load_tokenizer(hf_tok) if hf_tok else data.tokenizer
  stats = data.stats
  if run.attributes.source == "true":
    stats = CorpusStats.from_texts([l.product_attributes for l in data.catalog.split("train")])
  return data.catalog, tokenizer, stats


def make(run: Any, workdir: str) -> Stage1Data:
  """The catalog, tokenizer, BM25 statistics and pipelines of `run` (a `schema.Run` or its ConfigDict)."""
  from afmrl_jax.data import pipeline
  from afmrl_jax.data.table import ListingTable
  from afmrl_jax.config import schema
  run = schema.parse(run)
  catalog, tokenizer, stats = load_catalog(run, workdir)
  source = run.attributes.source
  generated = None
  if source == "none":  # every listing's string is empty: no terms, no text
    generated = {l.listing_id: "" for l in catalog.listings}
  elif source not in ("teacher", "true"):
    generated = read_generated_attributes(source, [l.listing_id for l in catalog.listings],
                                          run.attributes.skip_bad_rows)
  check_attribute_coverage(run, catalog.split("train"), generated)
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
  fresh = synthetic_catalog_config(run) if pipe.fresh_views else None

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
