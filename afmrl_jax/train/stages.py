"""`run_stage(config, workdir)`: validate a config and run the stage it names (the one dispatch table)."""

from __future__ import annotations

from typing import Any


def run_stage(config: Any, workdir: str) -> dict:
  """Validates `config` (a ConfigDict or `schema.Run`) and runs `config.stage`; returns its summary."""
  from afmrl_jax.train import cit, generate_stage, sft, stage1, stage2
  from afmrl_jax.train.validate import validate
  run = validate(config, workdir)
  evaluators = {"representation": stage1.evaluate_checkpoint, "generator": sft.evaluate_checkpoint}
  stages = {"stage1": stage1.train_and_evaluate, "eval": evaluators[run.task], "sft": sft.train_and_evaluate,
            "generate": generate_stage.run_generation, "stage2": stage2.train_and_evaluate,
            "cit": cit.run_cit}
  return stages[run.stage](run, workdir)
