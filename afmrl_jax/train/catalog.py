"""The catalog of a run, for every stage: the synthetic catalog or a manifest, its tokenizer and BM25
statistics, and the generated attributes a run may read instead of the teacher's."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

from afmrl_jax.config import schema
from afmrl_jax.errors import ConfigError
from afmrl_jax.fields import narrow
from afmrl_jax.train import files


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


def attribute_coverage_problem(run: schema.Run, strings: list[str]) -> str | None:
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


def check_attribute_coverage(run: schema.Run, listings, generated: Mapping[int, str] | None) -> None:
  """Stops (ConfigError, `attribute_coverage_problem`) on training `listings` without enough attribute
  strings; warns when some have none."""
  source = run.attributes.source
  strings = [(generated or {}).get(l.listing_id, "") if generated is not None else source_string(l, source)
             for l in listings]
  problem = attribute_coverage_problem(run, strings)
  if problem:
    raise ConfigError([problem])
  missing = sum(not s.strip() for s in strings)
  if run.loss.needs_bm25 and missing:
    logging.warning("%.0f%% of the training listings have no attribute string from attributes.source=%r: "
                    "the loss is InfoNCE on their rows.", 100 * missing / len(strings), source)


def synthetic_catalog_config(run: schema.Run):
  """The synthetic catalog's own config (`data.catalog.CatalogConfig`) from `run.catalog`."""
  from afmrl_jax.data.catalog import CatalogConfig
  return narrow(run.catalog, CatalogConfig)


# A manifest run's record of how the manifest was read: its categories and their keys, and each id space's
# {user id: int id} (the ints in metrics, reports and generated-attributes files).
MANIFEST_IDS = os.path.join("catalog", "manifest_ids.json")


def load_catalog(run: schema.Run, workdir: str):
  """(catalog, tokenizer, BM25 corpus stats) of `run`."""
  from afmrl_jax.attributes.bm25 import CorpusStats
  from afmrl_jax.data import defaults, manifest, tokenizer as tokenizer_lib
  cache = run.catalog.cache_dir or os.path.join(workdir, "data_cache")
  hf_tok = run.model.tokenizer or run.model.hf_checkpoint
  if run.catalog.manifest:
    catalog = manifest.catalog_from_manifest(run.catalog.manifest, run.catalog.image_size,
                                             skip_bad_rows=run.catalog.skip_bad_rows,
                                             split_seed=run.catalog.split_seed, eval_share=run.catalog.eval_share)
    if catalog.report is not None and catalog.report.skipped:
      logging.warning("%s", catalog.report.summary())
    from afmrl_jax import parallel
    if parallel.is_process_0():
      print(f"catalog {run.catalog.manifest}: {manifest.split_summary(catalog.listings)}", flush=True)
    r = catalog.report
    files.write_json(os.path.join(workdir, MANIFEST_IDS), {
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
