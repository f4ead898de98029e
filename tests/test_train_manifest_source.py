"""Stage 1 reads an on-disk manifest; `config.catalog.skip_bad_rows` skips and counts bad rows."""

import json

import pytest

import configs.stage1 as stage1_configs
from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import manifest
from afmrl_jax.train import stage1_data


@pytest.fixture
def manifest_with_a_bad_row(tmp_path):
  cat = catalog_lib.generate_catalog(
      catalog_lib.CatalogConfig(seed=3, families_per_category=2, listings_per_product=2, num_workers=0))
  path = manifest.write_manifest(cat, str(tmp_path / "m"))
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  del rows[1]["title"]  # row 2 lacks a required field
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path, len(rows)


def test_bad_manifest_row_stops_or_is_skipped(manifest_with_a_bad_row, tmp_path):
  path, num_rows = manifest_with_a_bad_row
  config = stage1_configs.get_config("ci")
  config.catalog.manifest = path
  with pytest.raises(manifest.ManifestError, match=r"row 2.*'title'"):
    stage1_data.load_catalog(config, str(tmp_path / "w"))
  config.catalog.skip_bad_rows = True
  catalog, _, stats = stage1_data.load_catalog(config, str(tmp_path / "w"))
  assert len(catalog) == num_rows - 1
  assert [row for row, _ in catalog.report.skipped] == [2]
  assert stats.num_docs > 0
