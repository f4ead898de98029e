"""CIT, cyclic iterative training: the whole method as one resumable command.

    python -m afmrl_jax.main --config=configs/cit.py --workdir=/tmp/cit

The chain, each stage in its own sub-directory of the workdir:

  sft           the generator distilled from the teacher's attributes
  generate_sft  its attributes for the whole catalog
  stage1        AGCL with those attributes in the inputs (and as BM25 terms)
  stage2        RAR: GRPO on the generator, the stage-1 model frozen as the environment
  generate_rar  the tuned generator's attributes for the whole catalog
  stage1_cit    stage 1 again from the first round's weights, on `cit.train_fraction` of the training
                products, with the RAR attributes; it ends with the retrieval evaluation

`cit.stages` holds each stage's full config (`configs/cit.py` fills them from the stage configs at one
preset); this module only wires the paths between them. A stage that finished (`cit_stage.json` in its
directory) is skipped; the interrupted one is run again in its directory, where it resumes from its own
checkpoints (or committed shards). `cit_report.json` / `.md` put every stage's numbers side by side.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import logging

from afmrl_jax.config import schema
from afmrl_jax.config.sections import CHAIN, CONFIG_OF, CITOptions
from afmrl_jax.eval import report
from afmrl_jax.train import files

DONE = "cit_stage.json"



def _attributes_file(workdir: str, step: str, config: Any) -> str:
  return os.path.join(workdir, step, config.generation.output_dir, "attributes.jsonl")


def stage_config(step: str, options: CITOptions, workdir: str) -> ml_collections.ConfigDict:
  """The config of chain step `step`: its stage's config with the paths to the earlier steps."""
  if CONFIG_OF[step] not in options.stages:
    raise ValueError(f"config.cit.stages has no '{CONFIG_OF[step]}' config (configs/cit.py fills all four).")
  c = ml_collections.ConfigDict(copy.deepcopy(dict(options.stages[CONFIG_OF[step]])))
  d = lambda name: os.path.join(workdir, name)
  c.catalog.cache_dir = c.catalog.cache_dir or d("data_cache")  # one catalog for the whole chain
  generate = ml_collections.ConfigDict(dict(options.stages["generate"]))
  if step == "generate_sft":
    c.checkpoint.restore_dir = d("sft")
  elif step == "stage1":
    c.attributes.source = _attributes_file(workdir, "generate_sft", generate)
    c.attributes.enrich_queries = True
  elif step == "stage2":
    c.rar.policy, c.rar.environment = d("sft"), d("stage1")
  elif step == "generate_rar":
    c.checkpoint.restore_dir = d("stage2")
  elif step == "stage1_cit":
    c.attributes.source = _attributes_file(workdir, "generate_rar", generate)
    c.attributes.enrich_queries = True
    c.checkpoint.init_from = d("stage1")
    c.pipeline.train_fraction = options.train_fraction
    c.train.num_steps = max(1, round(c.train.num_steps * options.train_fraction))
  return c


def _headline(step: str, summary: dict[str, Any]) -> dict[str, Any]:
  """The numbers of one stage's summary worth a side-by-side row."""
  out: dict[str, Any] = {}
  for key in ("attribute_eval", "eval"):
    for name, value in (summary.get(key) or {}).items():
      if name in ("f1_vs_truth", "product_agreement", "mean_keys", "malformed_rate", "recall@1", "recall@5",
                  "recall@10", "map@10"):
        out[name] = value
  for name in ("reward_mean_first", "reward_mean_last", "attribute_keys_first", "attribute_keys_last",
               "reward_time_share", "listings", "step", "wall_s"):
    if name in summary:
      out[name] = summary[name]
  return out


def write_report(workdir: str, rows: dict[str, dict[str, Any]]) -> None:
  """cit_report.json and a markdown table with one row per chain step."""
  files.write_json(os.path.join(workdir, "cit_report.json"), rows)
  columns = sorted({k for r in rows.values() for k in r})
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  lines += [f"| {step} | " + " | ".join(fmt(r[c]) if c in r else "" for c in columns) + " |"
            for step, r in rows.items()]
  with open(os.path.join(workdir, "cit_report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def run_cit(run: schema.Run, workdir: str, run_stage: Callable[[Any, str], dict]) -> dict[str, Any]:
  """The `cit` stage: runs the chain (skipping finished steps) with `run_stage` (the registry's, handed in
  so that this stage imports no other); returns the side-by-side report."""
  rows: dict[str, dict[str, Any]] = {}
  for step in CHAIN:
    step_dir = os.path.join(workdir, step)
    done = os.path.join(step_dir, DONE)
    if os.path.isfile(done):
      with open(done, encoding="utf-8") as f:
        summary = json.load(f)
      logging.warning("CIT: %s finished before; skipped.", step)
    else:
      print(f"=== CIT: {step} -> {step_dir}", flush=True)
      summary = run_stage(stage_config(step, run.cit, workdir), step_dir)
      if summary.get("stopped_early"):  # interrupted (SIGTERM, stop_after_steps): not done, stop the chain
        rows[step] = _headline(step, summary)
        break
      files.write_json(done, summary)
    rows[step] = _headline(step, summary)
  write_report(workdir, rows)
  return rows
