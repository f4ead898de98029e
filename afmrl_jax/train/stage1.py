"""Stage 1: AGCL representation learning, then retrieval evaluation (METHOD.md).

    python -m afmrl_jax.main --config=configs/stage1.py:tiny --workdir=/tmp/stage1

`train_and_evaluate(config, workdir)`:
  1. data: the catalog (generated once and cached in the workdir, or read from a manifest), the
     tokenizer (trained on the catalog, or a local HF one), BM25 corpus statistics of the attribute
     source, and the grain pipelines (`stage1_data`);
  2. model: Qwen2-VL architecture (+ LoRA), parameters created sharded, HF weights loaded when
     `model.hf_checkpoint` is set;
  3. `train.loop.run`: the jitted AGCL step (or GradCache), orbax checkpoints, resume, logs;
  4. `train.evaluate.evaluate` on the query/gallery splits, report under `<workdir>/eval`.
`evaluate_checkpoint(config, workdir)` is the `eval` stage: restore the latest checkpoint and do 4.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

from afmrl_jax import parallel
from afmrl_jax.train import builders
from afmrl_jax.train import checkpointing
from afmrl_jax.train import loop as loop_lib
from afmrl_jax.train import stage1_data
from afmrl_jax.train import stage1_step
from afmrl_jax.train import state as state_lib


def _mesh(config) -> jax.sharding.Mesh:
  return parallel.make_mesh(dict(config.mesh))


def _batch_shards(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _after_init(config, mesh):
  """Loads the HF checkpoint's weights into the freshly created (sharded) model, if one is set."""
  if not config.model.hf_checkpoint:
    return None

  def load(model: state_lib.ShardedModel) -> None:
    from afmrl_jax.models.hf_checkpoint import load_hf_weights
    module = model.merge()
    with jax.set_mesh(mesh):
      load_hf_weights(module, config.model.hf_checkpoint, mesh)
    _, model.params, model.rest = nnx.split(module, builders.trainable_filter(config), ...)

  return load


def _write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config.to_dict(), f, indent=1, sort_keys=True, default=str)


def model_parts(config, data: stage1_data.Stage1Data, mesh):
  """(model constructor, trainable filter, after_init) for this config."""
  vl = builders.vl_config(config, data.tokenizer)
  return builders.model_constructor(config, vl), builders.trainable_filter(config), _after_init(config, mesh)


def train(config: ml_collections.ConfigDict, workdir: str, data: stage1_data.Stage1Data | None = None,
          mesh=None) -> tuple[loop_lib.LoopResult, stage1_data.Stage1Data]:
  """Runs (or resumes) the training loop; returns the loop result and the data it used."""
  mesh = mesh or _mesh(config)
  data = data or stage1_data.make(config, workdir)
  build, trainable, after_init = model_parts(config, data, mesh)
  tx = state_lib.make_optimizer(config.optimizer, config.train.num_steps)
  agcl = stage1_step.make_agcl(builders.agcl_config(config), config.loss.strategy, data.idf, data.avg_doc_len)
  loss_fn, grad_fn_factory = None, None
  if config.gradcache.enabled:
    chunk, shards = config.gradcache.chunk, _batch_shards(mesh)
    grad_fn_factory = lambda graphdef: stage1_step.make_gradcache_grad_fn(graphdef, agcl, data.grid, chunk,
                                                                          shards)
  else:
    loss_fn = stage1_step.make_loss_fn(agcl, data.grid)
  loop = loop_lib.LoopConfig(
      num_steps=config.train.num_steps, stop_after_steps=config.train.stop_after_steps,
      log_every=config.train.log_every, checkpoint_every=config.checkpoint.every,
      checkpoint_keep=config.checkpoint.keep, checkpoint_async=config.checkpoint.async_save,
      checkpoint_enabled=config.checkpoint.enabled, resume=config.checkpoint.resume,
      check_finite=config.train.check_finite, examples_per_step=config.pipeline.batch_size,
      metrics_file=config.eval.train_metrics_file)
  _write_config(config, workdir)
  result = loop_lib.run(build=build, trainable=trainable, mesh=mesh, tx=tx, data=data.train_iter(),
                        workdir=workdir, loop=loop, loss_fn=loss_fn, grad_fn_factory=grad_fn_factory,
                        after_init=after_init)
  return result, data


def run_evaluation(config, workdir: str, model: state_lib.ShardedModel, data: stage1_data.Stage1Data, mesh,
                   step: int | None) -> dict[str, float]:
  """Embeds the query and gallery splits with `model` and scores them (`train.evaluate`)."""
  from afmrl_jax.train.evaluate import evaluate
  embed_fn = stage1_step.make_embed_fn((model.graphdef, model.params, model.rest), mesh, data.grid,
                                       config.pipeline.eval_batch_size)
  return evaluate(embed_fn, data.eval_batches("gallery"), data.eval_batches("query"), workdir, config,
                  listings=data.listings_by_id(), step=step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The `stage1` stage; returns a JSON-able summary (also written to `<workdir>/summary.json`)."""
  t0 = time.perf_counter()
  mesh = _mesh(config)
  result, data = train(config, workdir, mesh=mesh)
  summary: dict[str, Any] = {
      "step": result.step,
      "stopped_early": result.stopped_early,
      "stop_reason": result.stop_reason,
      "first_loss": result.losses[min(result.losses)] if result.losses else None,
      "last_loss": result.losses[max(result.losses)] if result.losses else None,
      "steps_per_s": result.steps_per_s,
      "examples_per_s": (result.steps_per_s or 0.0) * config.pipeline.batch_size or None,
      "flops_per_step_per_device": result.flops_per_step_per_device,
      "num_trainable_params": state_lib.count_params(result.model.params),
  }
  if config.train.eval_at_end and not result.stopped_early:
    summary["eval"] = run_evaluation(config, workdir, result.model, data, mesh, step=None)
  summary["wall_s"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1, sort_keys=True, default=str)
  return summary


def restore_model(config, checkpoint_dir: str, data: stage1_data.Stage1Data, mesh
                  ) -> tuple[state_lib.ShardedModel, int]:
  """The model with the trainable params of the latest checkpoint in `checkpoint_dir`."""
  build, trainable, after_init = model_parts(config, data, mesh)
  model = state_lib.create_sharded(build, mesh, trainable)
  if after_init is not None:
    after_init(model)
  tx = state_lib.make_optimizer(config.optimizer, config.train.num_steps)
  shardings = state_lib.state_shardings(tx, model, mesh)
  abstract = jax.eval_shape(lambda p: {"step": jax.numpy.zeros((), jax.numpy.int32), "params": p,
                                       "opt_state": tx.init(p)}, model.params)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  ckpt = checkpointing.Checkpointer(checkpoint_dir, keep=config.checkpoint.keep, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {checkpoint_dir}; train first (config.stage=stage1).")
    state, _ = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  model.params = state["params"]
  return model, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The `eval` stage: latest checkpoint of `checkpoint.restore_dir` (default: the workdir)."""
  mesh = _mesh(config)
  source = config.checkpoint.restore_dir or workdir
  ckpt_dir = source if os.path.basename(os.path.normpath(source)) == "checkpoints" else os.path.join(
      source, "checkpoints")
  data = stage1_data.make(config, workdir)
  model, step = restore_model(config, ckpt_dir, data, mesh)
  logging.info("Evaluating %s step %d.", ckpt_dir, step)
  metrics = run_evaluation(config, workdir, model, data, mesh, step=step)
  return {"step": step, "checkpoint_dir": ckpt_dir, "eval": metrics}
