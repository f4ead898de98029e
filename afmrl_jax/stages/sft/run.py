"""SFT of the attribute generator: distil the teacher's attribute strings (docs/method.md).

    python -m afmrl_jax.main --config=configs/sft.py:tiny --workdir=/tmp/sft

`train_and_evaluate(run, workdir)` trains a Qwen2.5-VL-architecture generator on image + title ->
`key: value; ...` (answer tokens only carry loss, `train.sft_step`), then scores its greedy generations on
held-out listings (`train.attribute_eval`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from afmrl_jax import parallel
from afmrl_jax.data import generator_data
from afmrl_jax.data.table import ListingTable
from afmrl_jax.generate.filters import SamplingConfig
from afmrl_jax.generate.sampling import eos_ids_of
from afmrl_jax.eval import attributes as attribute_eval, report
from afmrl_jax.train import model as builders, checkpointing
from afmrl_jax.config import schema
from afmrl_jax.stages.sft import objective as sft_step
from afmrl_jax.stages.stage1 import data as stage1_data
from afmrl_jax.train import loop as loop_lib
from afmrl_jax.train import workdir as workdir_lib
from afmrl_jax.train import state as state_lib


def data_config(run: schema.Run) -> generator_data.GeneratorDataConfig:
  """`run.generator` with the catalog's image size."""
  return dataclasses.replace(run.generator, image_size=run.catalog.image_size)


def greedy(run: schema.Run, vl) -> SamplingConfig:
  """Greedy decoding up to `sft_eval.max_new_tokens`, stopping at the model's EOS."""
  return SamplingConfig(temperature=0.0, max_new_tokens=run.sft_eval.max_new_tokens, eos_ids=eos_ids_of(vl),
                        pad_id=vl.text.pad_token_id or 0)


def train(run: schema.Run | Any, workdir: str):
  """Runs (or resumes) SFT; returns (loop result, trained model, catalog, tokenizer)."""
  run = schema.parse(run)
  workdir_lib.prepare(run, workdir)  # refuses a resume under a changed config; writes config.json

  # Mesh.
  mesh = parallel.make_mesh(run.mesh)

  # Data: catalog and tokenizer as in stage 1; SFT examples (prompt, teacher answer) from the train split.
  catalog, tokenizer, _ = stage1_data.load_catalog(run, workdir)
  cfg = data_config(run)
  train_iter = iter(generator_data.sft_dataset(ListingTable.from_catalog(catalog, "train"), tokenizer, cfg))
  image_grid_thw = generator_data.image_grid_thw(cfg)

  # Model and sharding.
  model = builders.create_model(run, tokenizer, mesh)
  tx = state_lib.make_optimizer(run.optimizer, run.train.num_steps)

  # Step: answer-token cross-entropy.
  step_fn = loop_lib.make_train_step(model.graphdef, tx, loss_fn=sft_step.make_loss_fn(image_grid_thw))

  # Checkpoint and loop.
  result = loop_lib.resume_and_run(step_fn, model, tx, train_iter, mesh=mesh, options=run.train,
                                   checkpoint=run.checkpoint, workdir=workdir, examples_per_step=cfg.batch_size)
  model.params = result.state["params"]
  return result, model, catalog, tokenizer


def evaluate(run: schema.Run, model, catalog, tokenizer, workdir: str) -> dict[str, float]:
  """Attribute quality of `model`'s greedy generations on `run.sft_eval.split` (reports in the workdir)."""
  table = ListingTable.from_catalog(catalog, run.sft_eval.split)
  quality = attribute_eval.evaluate_generator(model.merge(), tokenizer, table, data_config(run), run.sft_eval,
                                              parallel.make_mesh(run.mesh), workdir,
                                              greedy(run, builders.vl_config(run, tokenizer)))
  return attribute_eval.headline(quality)


def evaluate_checkpoint(run: schema.Run | Any, workdir: str) -> dict[str, Any]:
  """The `eval` stage of a generator: the latest checkpoint of `checkpoint.restore_dir` (default: the
  workdir), scored on `sft_eval.split`."""
  run = schema.parse(run)
  catalog, tokenizer, _ = stage1_data.load_catalog(run, workdir)
  source = run.checkpoint.restore_dir or workdir
  ckpt_dir = checkpointing.checkpoint_dir(source)
  mesh = parallel.make_mesh(run.mesh)
  if schema.saved_stage(source) == "stage2":  # a RAR run: its tuned parameters on its SFT policy
    from afmrl_jax.stages.stage2 import run as stage2  # stage2 builds on this module
    model, step = stage2.tuned_policy(source, tokenizer, mesh)
  else:
    model, step = builders.restore_model(run, ckpt_dir, tokenizer, mesh)
  return {"step": step, "checkpoint_dir": ckpt_dir, "attribute_eval": evaluate(run, model, catalog, tokenizer, workdir)}


def train_and_evaluate(run: schema.Run | Any, workdir: str) -> dict[str, Any]:
  """The `sft` stage; returns a JSON-able summary (also `<workdir>/summary.json`)."""
  t0 = time.perf_counter()
  run = schema.parse(run)
  result, model, catalog, tokenizer = train(run, workdir)
  summary: dict[str, Any] = {
      "step": result.step, "stopped_early": result.stopped_early, "stop_reason": result.stop_reason,
      "first_loss": result.losses[min(result.losses)] if result.losses else None,
      "last_loss": result.losses[max(result.losses)] if result.losses else None,
      "steps_per_s": result.steps_per_s,
      "num_trainable_params": state_lib.count_params(model.params),
  }
  # Evaluation: attribute quality of greedy generations on listings never trained on.
  if run.train.eval_at_end and not result.stopped_early:
    summary["attribute_eval"] = evaluate(run, model, catalog, tokenizer, workdir)
  summary["wall_s"] = time.perf_counter() - t0
  report.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary
