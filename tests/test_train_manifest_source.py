"""Stage 1 reads an on-disk manifest; `config.catalog.skip_bad_rows` skips and counts bad rows."""

import json

import numpy as np
import pytest

import configs.stage1 as stage1_configs
from afmrl_jax.data import catalog as data_catalog
from afmrl_jax.data import manifest
from afmrl_jax.stages.stage1 import data as stage1_data
from afmrl_jax.config.schema import ConfigError
from afmrl_jax.train import catalog as catalog_lib
from afmrl_jax.config import schema


@pytest.fixture
def manifest_rows(tmp_path):
  cat = data_catalog.generate_catalog(
      data_catalog.CatalogConfig(seed=3, families_per_category=2, listings_per_product=2, num_workers=0))
  path = manifest.write_manifest(cat, str(tmp_path / "m"))
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  return path, rows


def _rewrite(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def manifest_with_a_bad_row(manifest_rows):
  path, rows = manifest_rows
  del rows[1]["title"]  # row 2 lacks a required field
  _rewrite(path, rows)
  return path, len(rows)


def test_bad_manifest_row_stops_or_is_skipped(manifest_with_a_bad_row, tmp_path):
  path, num_rows = manifest_with_a_bad_row
  config = stage1_configs.get_config("ci")
  config.catalog.manifest = path
  with pytest.raises(manifest.ManifestError, match=r"row 2.*'title'"):
    catalog_lib.load_catalog(schema.parse(config), str(tmp_path / "w"))
  config.catalog.skip_bad_rows = True
  catalog, _, stats = catalog_lib.load_catalog(schema.parse(config), str(tmp_path / "w"))
  assert len(catalog) == num_rows - 1
  assert [row for row, _ in catalog.report.skipped] == [2]
  assert stats.num_docs > 0


def _config(path, **attributes):
  config = stage1_configs.get_config("ci")
  config.catalog.manifest = path
  for key, value in attributes.items():
    config.attributes[key] = value
  return config


def test_manifest_without_teacher_attributes_stops_a_loss_that_needs_them(manifest_rows, tmp_path):
  """Before: every BM25 term empty, plain InfoNCE, no word. Now: one sentence, or InfoNCE by choice."""
  path, rows = manifest_rows
  for r in rows:
    r.pop("teacher_attributes", None)
  _rewrite(path, rows)
  with pytest.raises(ConfigError) as e:
    stage1_data.make(schema.parse(_config(path)), str(tmp_path / "w"))
  (problem,) = e.value.problems
  assert problem.startswith("config.loss uses attribute terms (bias_scale=4.0, mask='none') but 100% of the ")
  assert "config.attributes.source='teacher'" in problem and "max_missing_share=1.0" in problem
  stage1_data.make(schema.parse(_config(path, max_missing_share=1.0)), str(tmp_path / "w"))  # accepted: InfoNCE, warned
  infonce = _config(path)
  infonce.loss.bias_scale = 0.0
  stage1_data.make(schema.parse(infonce), str(tmp_path / "w"))  # a loss without terms needs no attributes


def test_manifest_honours_the_attribute_source(manifest_rows, tmp_path):
  """`true` takes the manifest's ground-truth `attributes` (before: the teacher's, silently); `none` gives
  no terms, so a loss that needs them stops."""
  from afmrl_jax.attributes.bm25 import CorpusStats
  path, rows = manifest_rows
  truth = [r["attributes"] for r in rows if r.get("split", "train") == "train"]
  teacher = [r["teacher_attributes"] for r in rows if r.get("split", "train") == "train"]
  assert truth != teacher
  data = stage1_data.make(schema.parse(_config(path, source="true")), str(tmp_path / "w"))
  want = CorpusStats.from_texts(truth)
  assert data.stats.term_to_id == want.term_to_id != CorpusStats.from_texts(teacher).term_to_id
  np.testing.assert_allclose(data.idf, want.idf)
  batch = next(data.train_iter())
  by_id = {r["listing_id"]: r for r in rows}
  for lid, terms in zip(batch["listing_id"], batch["query_terms"]):  # each query's terms: its true attributes'
    np.testing.assert_array_equal(terms, data.stats.encode(by_id[int(lid)]["attributes"], len(terms)))
  with pytest.raises(ConfigError, match="100% of the"):
    stage1_data.make(schema.parse(_config(path, source="none")), str(tmp_path / "w"))
  # The record of how the manifest was read sits in the workdir.
  with open(tmp_path / "w" / catalog_lib.MANIFEST_IDS) as f:
    record = json.load(f)
  assert record["manifest"] == path and record["categories"] == sorted({r["category"] for r in rows})
  assert record["ids"]["listing"] == {str(r["listing_id"]): r["listing_id"] for r in rows}


def test_manifest_with_a_generated_file_takes_its_terms_from_the_file(manifest_rows, tmp_path):
  """The BM25 vocabulary of a manifest run with a generated-attributes file is the file's strings' (before:
  built from no string at all, so every term was padding and AGCL silently InfoNCE)."""
  from afmrl_jax.attributes.bm25 import CorpusStats
  path, rows = manifest_rows
  generated = tmp_path / "gen.jsonl"
  generated.write_text("".join(json.dumps({"listing_id": r["listing_id"], "attributes": r["attributes"]}) + "\n"
                               for r in rows))
  data = stage1_data.make(schema.parse(_config(path, source=str(generated))), str(tmp_path / "w"))
  want = CorpusStats.from_texts([r["attributes"] for r in rows if r.get("split", "train") == "train"])
  assert data.stats.term_to_id == want.term_to_id and data.stats.vocab_size > 1
  batch = next(data.train_iter())
  assert np.count_nonzero(batch["query_terms"]) > 0
