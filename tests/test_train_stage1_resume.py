"""Stage 1 stopped after step k and resumed equals an uninterrupted run bit for bit (parameters, optimizer
state and every step's loss), with the real catalog, pipeline (iterator state in the checkpoint), model
and loss; and a SIGTERM to `python -m afmrl_jax.main` saves a checkpoint and exits cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from afmrl_jax.train import stage1
from tests.test_train_stage1_e2e import small_config

STEPS = 10
K = 7  # not a multiple of checkpoint.every=10: the stop itself must save


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(autouse=True, scope="module")
def compilation_cache(tmp_path_factory):
  """The three runs compile the same programs: keep them in a persistent cache for this module."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield
  for n, v in old.items():
    jax.config.update(n, v)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_stop_and_resume_equals_uninterrupted(cache, tmp_path):
  kw = {"train.eval_at_end": False, "pipeline.fresh_views": True}
  full, *_ = stage1.train(small_config(cache, STEPS, **kw), str(tmp_path / "full"))
  workdir = str(tmp_path / "split")
  first, *_ = stage1.train(small_config(cache, STEPS, **{"train.stop_after_steps": K}, **kw), workdir)
  assert first.stopped_early and first.step == K
  second, *_ = stage1.train(small_config(cache, STEPS, **kw), workdir)
  assert second.step == STEPS and min(second.losses) == K + 1
  for s in range(1, STEPS + 1):
    got = first.losses[s] if s <= K else second.losses[s]
    assert got == full.losses[s], s
  assert _losses(workdir) == _losses(str(tmp_path / "full"))
  for a, b in ((second.state["params"], full.state["params"]),
               (second.state["opt_state"], full.state["opt_state"])):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
