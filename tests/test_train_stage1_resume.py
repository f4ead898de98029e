"""Stage 1 stopped after step k and resumed equals an uninterrupted run bit for bit (parameters, optimizer
state and every step's loss), with the real catalog, pipeline (iterator state in the checkpoint), model
and loss; and a SIGTERM to `python -m afmrl_jax.main` saves a checkpoint and exits cleanly."""

import json
import os

import jax
import numpy as np
import pytest

from afmrl_jax.stages.stage1 import run as stage1
from afmrl_jax.config import schema
from tests.test_train_stage1_e2e import small_config

STEPS = 10
K = 7  # not a multiple of checkpoint.every=10: the stop itself must save


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("data_cache")


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_stop_and_resume_equals_uninterrupted(cache, tmp_path):
  kw = {"train.eval_at_end": False, "pipeline.fresh_views": True}
  full, *_ = stage1.train(schema.parse(small_config(cache, STEPS, **kw)), str(tmp_path / "full"))
  workdir = str(tmp_path / "split")
  first, *_ = stage1.train(schema.parse(small_config(cache, STEPS, **{"train.stop_after_steps": K}, **kw)), workdir)
  assert first.stopped_early and first.step == K
  second, *_ = stage1.train(schema.parse(small_config(cache, STEPS, **kw)), workdir)
  assert second.step == STEPS and min(second.losses) == K + 1
  for s in range(1, STEPS + 1):
    got = first.losses[s] if s <= K else second.losses[s]
    assert got == full.losses[s], s
  assert _losses(workdir) == _losses(str(tmp_path / "full"))
  for a, b in ((second.state["params"], full.state["params"]),
               (second.state["opt_state"], full.state["opt_state"])):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
