"""A generated-attributes file (config.attributes.source) drives the BM25 terms of the loss."""

import json

import numpy as np
import pytest

import configs.stage1 as stage1_configs
from afmrl_jax.stages.stage1 import data as stage1_data
from afmrl_jax.train import catalog as catalog_lib
from afmrl_jax.config import schema

GENERATED = "colour: red; pattern: stripes"


def test_generated_attributes_replace_teacher_terms(tmp_path):
  config = stage1_configs.get_config("ci")
  config.catalog.cache_dir = str(tmp_path / "cache")
  catalog, _, stats = catalog_lib.load_catalog(schema.parse(config), str(tmp_path / "w0"))
  teacher_batch = next(stage1_data.make(schema.parse(config), str(tmp_path / "w0")).train_iter())
  # The teacher strings vary from row to row.
  assert not (teacher_batch["query_terms"] == teacher_batch["query_terms"][0]).all()

  path = tmp_path / "generated.jsonl"
  path.write_text("".join(json.dumps({"listing_id": l.listing_id, "attributes": GENERATED}) + "\n"
                          for l in catalog.listings))
  config.attributes.source = str(path)
  batch = next(stage1_data.make(schema.parse(config), str(tmp_path / "w1")).train_iter())
  expected = stats.encode(GENERATED, config.pipeline.max_terms)
  assert (expected > 0).sum() >= 3  # the generated terms are in the vocabulary
  for side in ("query_terms", "candidate_terms"):
    np.testing.assert_array_equal(batch[side], np.broadcast_to(expected, batch[side].shape))


def test_unknown_or_repeated_listing_ids_name_the_line(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text('{"listing_id": 1, "attributes": "colour: red"}\n'
                  '{"listing_id": 99, "attributes": "colour: blue"}\n'
                  '{"listing_id": 1, "attributes": "colour: green"}\n'
                  'not json\n')
  with pytest.raises(ValueError, match=r"a.jsonl:2: listing 99 is not a listing of this catalog"):
    catalog_lib.read_generated_attributes(str(path), known_ids=[1, 2])
  path.write_text('{"listing_id": 1, "attributes": "colour: red"}\n{"listing_id": 1, "attributes": "x: y"}\n')
  with pytest.raises(ValueError, match=r"a.jsonl:2: listing 1 appears twice"):
    catalog_lib.read_generated_attributes(str(path), known_ids=[1, 2])
  path.write_text('{"listing_id": 1, "attributes": "colour: red"}\n{"listing_id": 99, "attributes": "a: b"}\n'
                  '{"listing_id": 1, "attributes": "x: y"}\nnot json\n{"listing_id": 2, "attributes": "c: d"}\n')
  assert catalog_lib.read_generated_attributes(str(path), known_ids=[1, 2], skip_bad_rows=True) == {
      1: "colour: red", 2: "c: d"}
