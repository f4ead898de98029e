"""Stage 1: AGCL representation learning, then retrieval evaluation (docs/method.md).

    python -m afmrl_jax.main --config=configs/stage1.py:tiny --workdir=/tmp/stage1

`train_and_evaluate(run, workdir)` is the `stage1` stage and `evaluate_checkpoint(run, workdir)` the
`eval` stage; both take a `schema.Run` (or the ConfigDict it parses from).
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging

from afmrl_jax import parallel
from afmrl_jax.fields import narrow
from afmrl_jax.losses.config import AGCLConfig
from afmrl_jax.train import model as builders
from afmrl_jax.train import checkpointing
from afmrl_jax.eval import report
from afmrl_jax.train import loop as loop_lib
from afmrl_jax.stages.stage1 import mined_negatives
from afmrl_jax.train import workdir as workdir_lib
from afmrl_jax.config import schema
from afmrl_jax.stages.stage1 import data as stage1_data
from afmrl_jax.stages.stage1 import objective as stage1_step
from afmrl_jax.train import state as state_lib
from afmrl_jax.eval import embed as embed_lib
from afmrl_jax.train import files


# What to change when the AGCL loss turns NaN/Inf (the loop names the step and batch).
NONFINITE_HINT = ("lower config.optimizer.learning_rate or raise config.loss.tau; the run resumes from its last "
                  "checkpoint")


def train(run: schema.Run, workdir: str, data: stage1_data.Stage1Data | None = None, mesh=None
          ) -> tuple[loop_lib.LoopResult, state_lib.ShardedModel, stage1_data.Stage1Data]:
  """Runs (or resumes) stage-1 training; returns the loop result, the trained model and the data."""
  on_resume = workdir_lib.prepare(run, workdir)  # refuses a resume under a changed config; writes config.json

  # Mesh: (data, fsdp, tensor); the batch is split over data x fsdp.
  mesh = mesh or parallel.make_mesh(run.mesh)

  # Data: catalog, tokenizer, BM25 statistics, grain pipelines (iterator state is checkpointed).
  data = data or stage1_data.make(run, workdir)
  train_iter = data.train_iter()

  # Model and sharding: parameters created on their shards; frozen weights live in `model.rest`.
  model = builders.create_model(run, data.tokenizer, mesh)
  tx = state_lib.make_optimizer(run.optimizer, run.train.num_steps)

  # Step: AGCL over the whole global batch, by plain autodiff or GradCache.
  agcl = stage1_step.make_agcl(narrow(run.loss, AGCLConfig), run.loss.strategy, data.idf, data.avg_doc_len)
  if run.gradcache.enabled:
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    grad_fn = stage1_step.make_gradcache_grad_fn(model.graphdef, agcl, data.image_grid_thw,
                                                 run.gradcache.chunk, batch_shards)
    step_fn = loop_lib.make_train_step(model.graphdef, tx, grad_fn=grad_fn)
  else:
    step_fn = loop_lib.make_train_step(model.graphdef, tx,
                                       loss_fn=stage1_step.make_loss_fn(agcl, data.image_grid_thw))

  # Mined hard negatives: every `mining.every` steps the current model mines each training listing's
  # nearest other products; each query brings `mining.per_query` of them as extra candidate columns.
  mined_negatives_hook = None
  if run.mining.enabled:
    mined_negatives_hook = mined_negatives.MinedNegatives(run.mining, data, model, mesh, workdir)

  # Checkpoint and loop: resume the train state and the data position from the latest save, then train.
  result = loop_lib.resume_and_run(step_fn, model, tx, train_iter, mesh=mesh, options=run.train,
                                   checkpoint=run.checkpoint, workdir=workdir,
                                   examples_per_step=run.pipeline.batch_size, per_batch=mined_negatives_hook,
                                   on_resume=on_resume,
                                   nonfinite_hint=NONFINITE_HINT)
  model.params = result.state["params"]
  return result, model, data


def catalog_skips(data: stage1_data.Stage1Data, keep: int = 5) -> dict[str, Any]:
  """`catalog_skipped` (manifest rows skipped under `config.catalog.skip_bad_rows`, each row once) and
  `catalog_skipped_reasons` (the first `keep`, in row order) of a manifest run; {} for the synthetic catalog.
  The run's summary, `eval/metrics.json` and `eval/metrics.md` carry them."""
  manifest_report = getattr(getattr(data, "catalog", None), "report", None)
  if manifest_report is None:
    return {}
  by_row = dict(sorted(manifest_report.skipped, key=lambda s: s[0]))  # (row, reason); a row is one skip
  return {"catalog_skipped": len(by_row), "catalog_skipped_reasons": list(by_row.values())[:keep]}


def run_evaluation(run: schema.Run, workdir: str, model: state_lib.ShardedModel,
                   data: stage1_data.Stage1Data, mesh, step: int | None) -> dict[str, float]:
  """Embeds the query and gallery splits with `model` and scores them (`train.evaluate`)."""
  from afmrl_jax.eval.retrieval import evaluate
  embed_fn = embed_lib.make_embed_fn((model.graphdef, model.params, model.rest), mesh, data.image_grid_thw,
                                       run.pipeline.eval_batch_size)
  return evaluate(embed_fn, data.eval_batches("gallery"), data.eval_batches("query"), workdir, run.eval,
                  listings=data.listings_by_id(), step=step,
                  train_metrics_path=os.path.join(workdir, run.train.metrics_file), info=catalog_skips(data))


def train_and_evaluate(run: schema.Run, workdir: str) -> dict[str, Any]:
  """The `stage1` stage; returns a JSON-able summary (also written to `<workdir>/summary.json`)."""
  t0 = time.perf_counter()
  mesh = parallel.make_mesh(run.mesh)
  result, model, data = train(run, workdir, mesh=mesh)
  summary: dict[str, Any] = {
      "step": result.step,
      "start_step": result.start_step,
      "stopped_early": result.stopped_early,
      "stop_reason": result.stop_reason,
      "first_loss": result.losses[min(result.losses)] if result.losses else None,
      "last_loss": result.losses[max(result.losses)] if result.losses else None,
      "steps_per_s": result.steps_per_s,
      "examples_per_s": (result.steps_per_s or 0.0) * run.pipeline.batch_size or None,
      "flops_per_step_per_device": result.flops_per_step_per_device,
      "num_trainable_params": state_lib.count_params(model.params),
      **catalog_skips(data),
  }
  if run.train.eval_at_end and not result.stopped_early:
    summary["eval"] = run_evaluation(run, workdir, model, data, mesh, step=None)
  summary["wall_s"] = time.perf_counter() - t0
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def evaluate_checkpoint(run: schema.Run, workdir: str) -> dict[str, Any]:
  """The `eval` stage: latest checkpoint of `checkpoint.restore_dir` (default: the workdir)."""
  mesh = parallel.make_mesh(run.mesh)
  ckpt_dir = checkpointing.checkpoint_dir(run.checkpoint.restore_dir or workdir)
  data = stage1_data.make(run, workdir)
  model, step = builders.restore_model(run, ckpt_dir, data.tokenizer, mesh)
  logging.info("Evaluating %s step %d.", ckpt_dir, step)
  metrics = run_evaluation(run, workdir, model, data, mesh, step=step)
  return {"step": step, "checkpoint_dir": ckpt_dir, "eval": metrics, **catalog_skips(data)}
