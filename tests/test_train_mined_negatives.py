"""Stage 1 with mined hard negatives (`config.mining`): the batches carry each query's mined listings of
other products, the table is refreshed every `mining.every` steps and saved, and a run stopped between
refreshes resumes bit for bit (it reloads the table of the last refresh; at a refresh step it mines again
with the restored parameters)."""

import json
import os

import jax
import numpy as np
import pytest

from afmrl_jax.retrieval import mining
from afmrl_jax.stages.stage1 import mined_negatives, run as stage1
from afmrl_jax.config import schema
from tests.test_train_stage1_e2e import cache, small_config  # noqa: F401 (cache: the shared catalog fixture)
from tests.test_train_stage1_resume import _losses

pytestmark = pytest.mark.usefixtures("module_compilation_cache")

STEPS, EVERY, H = 8, 3, 2
MINING = {"mining.enabled": True, "mining.every": EVERY, "mining.per_query": H, "mining.num_mined": 4,
          "mining.filter": "attribute", "train.eval_at_end": False}


@pytest.fixture(scope="module")
def full(cache, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  result, model, data = stage1.train(schema.parse(small_config(cache, STEPS, **MINING)), workdir)
  return workdir, result, data


def test_refreshes_are_logged_and_saved(full):
  workdir, result, data = full
  with open(os.path.join(workdir, "mined", "refreshes.jsonl")) as f:
    refreshes = [json.loads(line) for line in f]
  assert [r["step"] for r in refreshes] == [0, 3, 6]
  n = len(data.train_table)
  for r in refreshes:
    assert r["mined"] == n * 4 and 0 <= r["mined_dropped"] <= r["mined"]
  # Tables no saved checkpoint can need are gone (checkpoints: step 8 only; its refresh is step 6).
  assert sorted(os.listdir(os.path.join(workdir, "mined"))) == ["refreshes.jsonl", "step_6.npz"]
  # The saved tables hold other products only; after the 'attribute' filter no neighbour has the query's
  # attribute term set.
  table = mining.MinedTable.load(mined_negatives.table_path(workdir, 6))
  assert int(table.mined_at_step) == 6 and table.table.shape == (n, 4)
  product = np.asarray(data.train_table.product_id)
  at = np.maximum(table.table, 0)
  assert not ((product[at] == product[:, None]) & table.valid).any()
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all("mined_dropped" in r for r in logged if "loss" in r)


def test_batches_carry_h_mined_listings_of_other_products(full, cache):
  workdir, result, data = full
  from afmrl_jax import parallel
  from afmrl_jax.train import model as builders
  from afmrl_jax.config import schema
  run = schema.parse(small_config(cache, STEPS, **MINING))
  mesh = parallel.make_mesh(run.mesh)
  model = builders.create_model(run, data.tokenizer, mesh)
  miner = mined_negatives.MinedNegatives(run.mining, data, model, mesh, workdir)
  assert miner._restore(7)  # the table of step 6
  batch = next(iter(data.train_iter()))
  out = miner.extend(dict(batch), 7)
  b = len(batch["listing_id"])
  assert out["mined_input_ids"].shape[:2] == (b, H) and out["mined_pixel_values"].shape[:2] == (b, H)
  assert out["mined_terms"].shape[:2] == (b, H)
  lid_to_row = {int(l): i for i, l in enumerate(data.train_table.listing_id)}
  product = np.asarray(data.train_table.product_id)
  batch_products = set(product[[lid_to_row[int(q)] for q in batch["listing_id"]]].tolist())
  for q, mined_ids in zip(batch["listing_id"], out["mined_listing_id"]):
    rows = [lid_to_row[int(m)] for m in mined_ids]
    # h distinct listings, none of a product any query of the batch has (they would be false negatives)
    assert len(set(rows)) == H and not batch_products & set(product[rows].tolist())
    kept = miner.mined.table[lid_to_row[int(q)]]
    kept = {r for r in kept[kept >= 0].tolist() if product[r] not in batch_products}
    assert set(rows) <= kept if len(kept) >= H else kept <= set(rows)  # else topped up with other listings
  # The same step draws the same negatives; another step may not.
  again = miner.extend(dict(batch), 7)
  np.testing.assert_array_equal(again["mined_listing_id"], out["mined_listing_id"])


# Between refreshes (the table of step 3 is loaded); at one (mined again with the restored parameters).
@pytest.mark.parametrize("stop", [5, pytest.param(6, marks=pytest.mark.slow)])
def test_stop_and_resume_equals_uninterrupted(stop, full, cache, tmp_path):
  full_dir, full_result, _ = full
  workdir = str(tmp_path / "split")
  first, *_ = stage1.train(schema.parse(small_config(cache, STEPS, **{"train.stop_after_steps": stop}, **MINING)),
                            workdir)
  assert first.stopped_early and first.step == stop
  second, *_ = stage1.train(schema.parse(small_config(cache, STEPS, **MINING)), workdir)
  assert second.step == STEPS and min(second.losses) == stop + 1
  assert _losses(workdir) == _losses(full_dir)
  for a, b in ((second.state["params"], full_result.state["params"]),
               (second.state["opt_state"], full_result.state["opt_state"])):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
  mine_a = mining.MinedTable.load(mined_negatives.table_path(workdir, 6))
  mine_b = mining.MinedTable.load(mined_negatives.table_path(full_dir, 6))
  np.testing.assert_array_equal(mine_a.table, mine_b.table)
