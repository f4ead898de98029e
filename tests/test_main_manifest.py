"""The README's "your own catalog" command as written: `--config.catalog.manifest=/data/catalog.parquet` on a
preset (whose `pipeline.fresh_views=True` belongs to the synthetic catalog) trains, with no flag to turn
fresh views off; they are off for a manifest in the one place that derives the pipeline's config."""

import json

from tests.test_data_manifest_real import _rows, _write_parquet
from tests.test_main import _main


def test_the_readme_manifest_command_trains_without_a_fresh_views_flag(tmp_path):
  # 40 products of 3 listings: the default eval_share (0.2) holds out 8, a gallery of 16 >= the Ks (10).
  rows = _rows(tmp_path / "data", products_per_category=20, listings_per_product=3)
  path = _write_parquet(tmp_path / "data" / "catalog.parquet", rows)
  work = tmp_path / "work"
  proc = _main("--config=configs/stage1.py:ci", f"--workdir={work}", f"--config.catalog.manifest={path}",
               "--config.train.num_steps=2", "--config.train.eval_at_end=False", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "fresh_views" not in proc.stderr
  assert json.loads((work / "summary.json").read_text())["step"] == 2
  # The preset's value stays in the resolved config; the pipeline the run built had fresh views off.
  from afmrl_jax.config import schema
  from afmrl_jax.stages.stage1 import data as stage1_data
  run = schema.load_saved(str(work))
  assert run.pipeline.fresh_views and run.catalog.manifest == path
  assert not stage1_data.pipeline_config(run).fresh_views
  # A fresh_views value is no change of a manifest run: the workdir resumes under either.
  proc = _main("--config=configs/stage1.py:ci", f"--workdir={work}", f"--config.catalog.manifest={path}",
               "--config.train.num_steps=2", "--config.train.eval_at_end=False",
               "--config.pipeline.fresh_views=False", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "already at step 2 (train.num_steps=2); nothing to train" in proc.stdout
