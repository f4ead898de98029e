"""Manifests: round trip through the tfds builder (array_record, no TensorFlow) and grain; bad input."""
import json
import os
import sys

import grain
import numpy as np
import pytest

from afmrl_jax.attributes import CorpusStats
from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import manifest, pipeline, tfds_builder, tokenizer
from afmrl_jax.data.table import ListingTable

CFG = catalog_lib.CatalogConfig(seed=7, families_per_category=2, listings_per_product=2, num_workers=0)


@pytest.fixture(scope="module")
def cat():
  return catalog_lib.generate_catalog(CFG)


@pytest.fixture(scope="module")
def written(cat, tmp_path_factory):
  d = tmp_path_factory.mktemp("manifest")
  return manifest.write_manifest(cat, str(d))


def test_manifest_round_trip_through_tfds_and_grain(cat, written, tmp_path):
  import tensorflow_datasets as tfds
  builder = tfds_builder.build_catalog_dataset(
      str(tmp_path / "data"), tfds_builder.CatalogBuilderConfig(name="rt", manifest=written))
  sources = tfds.data_source("afmrl_catalog/rt", data_dir=str(tmp_path / "data"))
  assert set(sources) == {s for s in catalog_lib.SPLITS if cat.split(s)}
  assert builder.skipped == []
  for split, src in sources.items():
    want = cat.split(split)
    assert len(src) == len(want)
    for rec, l in zip((src[i] for i in range(len(src))), want):
      got = tfds_builder.decode_record(rec)
      assert np.array_equal(got["image"], l.image)  # PNG is lossless
      for f in ("listing_id", "product_id", "true_product_id", "family_id", "category", "title",
                "teacher_attributes", "product_attributes", "split"):
        assert got[f] == getattr(l, f), f
  assert "tensorflow" not in sys.modules
  # The same grain batches from the array_record source as from the in-memory catalog.
  tok = tokenizer.default_tokenizer(cat.texts(), str(tmp_path / "tok"), vocab_size=512)
  stats = CorpusStats.from_texts([l.teacher_attributes for l in cat.split("train")])
  cfg = pipeline.PipelineConfig(batch_size=8, text_attributes="teacher", num_threads=1)
  one = grain.sharding.NoSharding()
  a = iter(pipeline.train_dataset(ListingTable.from_catalog(cat, "train"), tok, stats, cfg, shard_options=one))
  b = iter(pipeline.train_dataset(ListingTable.from_data_source(sources["train"]), tok, stats, cfg,
                                  shard_options=one))
  for _ in range(3):
    x, y = next(a), next(b)
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_synthetic_catalog_through_builder(cat, tmp_path):
  builder = tfds_builder.build_catalog_dataset(str(tmp_path), tfds_builder.CatalogBuilderConfig(name="syn", catalog=CFG))
  src = builder.as_data_source()
  assert len(src["train"]) == len(cat.split("train"))
  rec = tfds_builder.decode_record(src["query"][0])
  assert rec["listing_id"] == cat.split("query")[0].listing_id
  assert np.array_equal(rec["image"], cat.split("query")[0].image)


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _write(path, rows, extra_lines=()):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line + "\n")


@pytest.fixture
def bad_manifest(written, tmp_path):
  rows = _rows(written)[:6]
  base = os.path.dirname(written)
  for r in rows:
    r["image"] = os.path.join(base, r["image"])
  (tmp_path / "corrupt.png").write_bytes(b"this is not a png")
  rows[1]["image"] = str(tmp_path / "nope.png")  # row 2: missing image
  del rows[2]["title"]  # row 3: missing field
  rows[3]["category"] = 5  # row 4: a category that is not a string (user categories are taken from the data)
  rows[4]["image"] = str(tmp_path / "corrupt.png")  # row 5: corrupt image (found when decoding)
  path = str(tmp_path / "bad.jsonl")
  _write(path, rows, extra_lines=["{not json"])  # row 7: bad JSON
  return path


@pytest.mark.parametrize("row,field,needle", [
    (2, "image", "does not exist"), (3, "title", "missing required field"), (4, "category", "must be a string"),
    (7, None, "not valid JSON")])
def test_bad_rows_raise_naming_file_row_and_field(bad_manifest, row, field, needle):
  rows = _rows_text(bad_manifest)
  path = bad_manifest + f".only{row}"
  with open(path, "w") as f:
    f.write(rows[0] + rows[row - 1])  # a good row, then the bad one (now row 2)
  with pytest.raises(manifest.ManifestError) as e:
    manifest.read_manifest(path)
  msg = str(e.value)
  assert path in msg and "row 2" in msg and needle in msg
  if field:
    assert repr(field) in msg


def _rows_text(path):
  with open(path) as f:
    return f.readlines()


def test_corrupt_image_raises_when_decoding(bad_manifest):
  report = manifest.read_manifest(bad_manifest, skip_bad_rows=True)
  with pytest.raises(manifest.ManifestError, match=r"row 5: field 'image': cannot decode"):
    list(manifest.iter_listings(report, 64))


def test_skip_bad_rows_counts_and_reports(bad_manifest, tmp_path):
  report = manifest.read_manifest(bad_manifest, skip_bad_rows=True)
  assert [r for r, _ in report.skipped] == [2, 3, 4, 7]
  listings = list(manifest.iter_listings(report, 64, skip_bad_rows=True))
  assert len(listings) == 2 and [r for r, _ in report.skipped] == [2, 3, 4, 7, 5]
  assert "5 skipped" in report.summary()
  cat = manifest.catalog_from_manifest(bad_manifest, 64, skip_bad_rows=True)
  assert len(cat) == 2 and sorted(r for r, _ in cat.report.skipped) == [2, 3, 4, 5, 7]
  builder = tfds_builder.build_catalog_dataset(
      str(tmp_path / "d"), tfds_builder.CatalogBuilderConfig(name="skip", manifest=bad_manifest, skip_bad_rows=True))
  assert sorted(r for r, _ in builder.skipped) == [2, 3, 4, 5, 7]
  assert sum(len(s) for s in builder.as_data_source().values()) == 2


def test_builder_without_skip_fails_on_bad_row(bad_manifest, tmp_path):
  with pytest.raises(manifest.ManifestError, match="row 2"):
    tfds_builder.build_catalog_dataset(str(tmp_path), tfds_builder.CatalogBuilderConfig(name="bad", manifest=bad_manifest))


def test_manifest_attributes_as_object_and_custom_categories(tmp_path, written):
  row = _rows(written)[0]
  row["image"] = os.path.join(os.path.dirname(written), row["image"])
  row["category"] = "hats"
  row["attributes"] = {"colour": "red", "brim": "wide"}
  path = str(tmp_path / "m.jsonl")
  _write(path, [row])
  rep = manifest.read_manifest(path, categories=("hats",))
  assert rep.rows[0].attributes == "colour: red; brim: wide"
  cat = manifest.catalog_from_manifest(path, 32, categories=("hats",))
  assert cat.listings[0].image.shape == (32, 32, 3) and cat.report.skipped == []
