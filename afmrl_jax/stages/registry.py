"""`run_stage(config, workdir)`: validate a config and run the stage it names (the one dispatch table)."""

from __future__ import annotations

from typing import Any


def run_stage(config: Any, workdir: str) -> dict:
  """Validates `config` (a ConfigDict or `schema.Run`) and runs `config.stage`; returns its summary."""
  from afmrl_jax.stages import cit, generate as generate_stage
  from afmrl_jax.stages.sft import run as sft
  from afmrl_jax.stages.stage1 import run as stage1
  from afmrl_jax.stages.stage2 import run as stage2
  from afmrl_jax.stages.validate import validate, validate_catalog
  run = validate(config, workdir)
  if run.stage == "eval":  # evaluate what the workdir was trained with; take only eval knobs from here
    from absl import logging
    from afmrl_jax.config import schema
    run, ignored = schema.for_evaluation(run, workdir)
    if ignored:
      logging.warning("eval: the evaluated run's stored config applies; ignored here: %s (only %s are "
                      "taken from this command).", ", ".join(ignored), ", ".join(schema.EVAL_SECTIONS))
  validate_catalog(run)
  evaluators = {"representation": stage1.evaluate_checkpoint, "generator": sft.evaluate_checkpoint}
  stages = {"stage1": stage1.train_and_evaluate, "eval": evaluators[run.task], "sft": sft.train_and_evaluate,
            "generate": generate_stage.run_generation, "stage2": stage2.train_and_evaluate,
            "cit": lambda run, workdir: cit.run_cit(run, workdir, run_stage)}
  return stages[run.stage](run, workdir)
