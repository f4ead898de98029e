"""SFT of the attribute generator: distil the teacher's attribute strings (docs/method.md).

    python -m afmrl_jax.main --config=configs/sft.py:tiny --workdir=/tmp/sft

`train_and_evaluate(run, workdir)` trains a Qwen2.5-VL-architecture generator on image + title ->
`key: value; ...` (answer tokens only carry loss, `train.sft_step`), then scores its greedy generations on
held-out listings (`train.attribute_eval`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from afmrl_jax import parallel
from afmrl_jax.data import generator_data
from afmrl_jax.data.table import ListingTable
from afmrl_jax.eval import attributes as attribute_eval
from afmrl_jax.train import model as builders, checkpointing
from afmrl_jax.config import schema
from afmrl_jax.stages.sft import objective as sft_step
from afmrl_jax.train import loop as loop_lib
from afmrl_jax.train import workdir as workdir_lib
from afmrl_jax.train import state as state_lib
from afmrl_jax.train import catalog as catalog_lib
from afmrl_jax.train import files
from afmrl_jax.stages import generator



def train(run: schema.Run, workdir: str):
  """Runs (or resumes) SFT; returns (loop result, trained model, catalog, tokenizer)."""
  on_resume = workdir_lib.prepare(run, workdir)  # refuses a resume under a changed config; writes config.json

  # Mesh.
  mesh = parallel.make_mesh(run.mesh)

  # Data: catalog and tokenizer as in stage 1; SFT examples (prompt, teacher answer) from the train split.
  catalog, tokenizer, _ = catalog_lib.load_catalog(run, workdir)
  cfg = generator.data_config(run)
  train_iter = iter(generator_data.sft_dataset(ListingTable.from_catalog(catalog, "train"), tokenizer, cfg))
  image_grid_thw = generator_data.image_grid_thw(cfg)

  # Model and sharding.
  model = builders.create_model(run, tokenizer, mesh)
  tx = state_lib.make_optimizer(run.optimizer, run.train.num_steps)

  # Step: answer-token cross-entropy.
  step_fn = loop_lib.make_train_step(model.graphdef, tx, loss_fn=sft_step.make_loss_fn(image_grid_thw))

  # Checkpoint and loop.
  result = loop_lib.resume_and_run(step_fn, model, tx, train_iter, mesh=mesh, options=run.train,
                                   checkpoint=run.checkpoint, workdir=workdir, examples_per_step=cfg.batch_size,
                                   on_resume=on_resume)
  model.params = result.state["params"]
  return result, model, catalog, tokenizer



def evaluate_checkpoint(run: schema.Run, workdir: str) -> dict[str, Any]:
  """The `eval` stage of a generator: the latest checkpoint of `checkpoint.restore_dir` (default: the
  workdir), scored on `sft_eval.split`."""
  catalog, tokenizer, _ = catalog_lib.load_catalog(run, workdir)
  source = run.checkpoint.restore_dir or workdir
  ckpt_dir = checkpointing.checkpoint_dir(source)
  mesh = parallel.make_mesh(run.mesh)
  model, step = generator.restore(run, source, tokenizer, mesh)  # an SFT or a stage-2 (RAR) run
  return {"step": step, "checkpoint_dir": ckpt_dir, "attribute_eval": generator.evaluate(run, model, catalog, tokenizer, workdir)}


def train_and_evaluate(run: schema.Run, workdir: str) -> dict[str, Any]:
  """The `sft` stage; returns a JSON-able summary (also `<workdir>/summary.json`)."""
  t0 = time.perf_counter()
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
    summary["attribute_eval"] = generator.evaluate(run, model, catalog, tokenizer, workdir)
  summary["wall_s"] = time.perf_counter() - t0
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary
