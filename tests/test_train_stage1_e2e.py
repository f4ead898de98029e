"""Stage 1 end to end on a configuration smaller than `tiny`: real catalog, tokenizer, grain pipeline,
Qwen2-VL model, AGCL, orbax, evaluation. The loss falls, evaluation writes its metrics, and a run stopped
(The kill-and-resume test at this level is tests/test_train_stage1_resume.py.)"""

import json
import os

import jax
import numpy as np
import pytest

import configs.stage1 as stage1_configs
from afmrl_jax.stages.stage1 import run as stage1, data as stage1_data
from afmrl_jax.config import schema

STEPS = 24


def small_config(cache_dir, steps=STEPS, **overrides):
  config = stage1_configs.get_config("ci")
  config.catalog.cache_dir = str(cache_dir)
  config.catalog.families_per_category = 4
  config.train.num_steps = steps
  config.train.log_every = 1
  config.checkpoint.every = 10
  config.pipeline.fresh_views = False  # rendering views costs more than the tiny model here
  config.optimizer.learning_rate = 3e-3
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def full_run(cache, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  config = small_config(cache)
  summary = stage1.train_and_evaluate(schema.parse(config), workdir)
  return config, workdir, summary


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_loss_falls_and_eval_metrics_written(full_run):
  config, workdir, summary = full_run
  assert summary["step"] == STEPS and not summary["stopped_early"]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  first = np.mean([losses[s] for s in range(1, 5)])
  last = np.mean([losses[s] for s in range(STEPS - 3, STEPS + 1)])
  assert last < first - 0.2, (first, last)
  metrics = summary["eval"]
  for key in ("recall@1", "recall@5", "recall@10", "map@10", "nmi", "ari", "purity", "knn_accuracy"):
    assert 0.0 <= metrics[key] <= 1.0, key
  assert metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"]
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    saved = json.load(f)["metrics"]
  assert saved["recall@10"] == pytest.approx(metrics["recall@10"])
  assert os.path.isfile(os.path.join(workdir, "eval", "queries.html"))
  # TensorBoard events were written
  assert any(name.startswith("events") for name in os.listdir(os.path.join(workdir, "tensorboard")))


def test_eval_batches_use_true_product_identity(full_run, cache):
  config, workdir, _ = full_run
  data = stage1_data.make(schema.parse(config), workdir)
  batch = next(iter(data.eval_batches("gallery")))
  np.testing.assert_array_equal(batch["product_id"], batch["true_product_id"])
  assert batch["valid"].dtype == bool


def test_eval_stage_reproduces_end_of_training_metrics(full_run, tmp_path):
  """`configs/eval.py` at the plain preset restores the last checkpoint of a run trained with other
  catalog / pipeline / optimizer settings: the run's stored config applies, so the metrics are the same."""
  import configs.eval as eval_configs
  from afmrl_jax.stages import registry as stages
  config, workdir, summary = full_run
  eval_config = eval_configs.get_config("ci")
  assert eval_config.catalog.families_per_category != config.catalog.families_per_category
  eval_config.checkpoint.restore_dir = workdir
  out = stages.run_stage(eval_config, str(tmp_path))
  assert out["step"] == STEPS
  for key in ("recall@1", "recall@10", "map@10", "knn_accuracy"):
    assert out["eval"][key] == pytest.approx(summary["eval"][key], abs=1e-6), key
