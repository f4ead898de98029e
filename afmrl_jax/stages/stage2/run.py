"""Stage 2, RAR: GRPO on the attribute generator, with a frozen stage-1 model's retrieval as the reward.

    python -m afmrl_jax.main --config=configs/stage2.py:tiny --workdir=/tmp/rar \\
        --config.rar.policy=/tmp/sft --config.rar.environment=/tmp/stage1

`train_and_evaluate(run, workdir)`: the policy starts from the SFT run `rar.policy` (its architecture,
tokenizer and prompt format come from that run's config.json; the KL reference stays frozen at its
weights); each step samples G strings for Q query listings, scores them with the environment
(`train.rar_env`), and takes `rar.updates_per_step` clipped GRPO updates (`train.stage2_step`). The
train state, the query stream's position and (through the step) the sampling keys are checkpointed, so
a resumed run continues bitwise. At the end the greedy policy's attribute quality is scored like SFT's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from afmrl_jax import parallel
from afmrl_jax.data import generator_data
from afmrl_jax.data.table import ListingTable
from afmrl_jax.eval import attributes as attribute_eval, report
from afmrl_jax.train import model as builders
from afmrl_jax.stages.stage2 import environment as rar_env
from afmrl_jax.rl import rollout as rar_rollout
from afmrl_jax.config import schema
from afmrl_jax.train import loop as loop_lib
from afmrl_jax.train import workdir as workdir_lib
from afmrl_jax.rl import objective as stage2_step
from afmrl_jax.train import state as state_lib
from afmrl_jax.train import catalog as catalog_lib
from afmrl_jax.train import files
from afmrl_jax.stages import generator



def _check_same_catalog(policy_table: ListingTable, env_table: ListingTable, run: schema.Run) -> None:
  same = (np.array_equal(policy_table.listing_id, env_table.listing_id)
          and policy_table.title == env_table.title)
  if not same:
    raise ValueError(f"config.rar.policy={run.rar.policy} and config.rar.environment={run.rar.environment} "
                     f"were trained on different catalogs (their '{run.rar.query_split}' splits differ).")


@dataclasses.dataclass
class Stage2Parts:
  """What a RAR step is made of (also what `launch/bench_rar.py` times piece by piece)."""
  run: schema.Run
  policy_run: schema.Run
  mesh: Any
  model: state_lib.ShardedModel  # the policy, at the SFT weights until trained
  environment: rar_env.Environment
  queries: Any  # iterator of Q query prompts per step (get_state / set_state)
  rollout: rar_rollout.Rollout
  tx: Any
  step_fn: Any
  catalog: Any
  tokenizer: Any


def build(run: schema.Run, workdir: str) -> Stage2Parts:
  """The mesh, policy, environment, query stream, rollout and step of `run` (nothing trained yet)."""
  o = run.rar

  # Mesh.
  mesh = parallel.make_mesh(run.mesh)

  # Policy and reference: the SFT generator; the reference keeps its weights (the train state copies them).
  prun = generator.policy_run(run)
  catalog, tokenizer, _ = catalog_lib.load_catalog(prun, o.policy)
  model = generator.policy_model(run, prun, tokenizer, mesh)
  vl = builders.vl_config(prun, tokenizer)

  # Environment: the frozen stage-1 model, its gallery index (built once, saved in the workdir).
  rows_per_chunk = o.queries_per_step * o.group_size // o.rollout_chunks
  env = rar_env.Environment.load(run, workdir, mesh, batch_size=rows_per_chunk)
  query_table = ListingTable.from_catalog(catalog, o.query_split)
  _check_same_catalog(query_table, env.table, run)

  # Data: Q query listings per step, in a seeded order whose position is checkpointed.
  data_cfg = dataclasses.replace(generator.data_config(prun), batch_size=o.queries_per_step, seed=o.seed)
  queries = iter(generator_data.sft_dataset(query_table, tokenizer, data_cfg))
  grid = generator_data.image_grid_thw(data_cfg)

  # Rollout and step: G samples per query scored by the environment, then clipped GRPO updates.
  rollout = rar_rollout.Rollout(model, model.params, env, tokenizer, grid, o, run.grpo, vl, mesh)
  tx = state_lib.make_optimizer(run.optimizer, run.train.num_steps)
  loss_fn = stage2_step.make_loss_fn(grid, run.grpo, rollout.sampling.logprob_temperature)
  step_fn = loop_lib.make_train_step(model.graphdef, tx, loss_fn=loss_fn, updates_per_step=o.updates_per_step)
  return Stage2Parts(run, prun, mesh, model, env, queries, rollout, tx, step_fn, catalog, tokenizer)


def train(run: schema.Run, workdir: str) -> tuple[loop_lib.LoopResult, Stage2Parts]:
  """Runs (or resumes) RAR; returns the loop result and the parts (`parts.model` holds the trained policy)."""
  on_resume = workdir_lib.prepare(run, workdir)  # refuses a resume under a changed config; writes config.json
  parts = build(run, workdir)
  # Checkpoint and loop: the policy's train state and the query position; sampling keys follow the step.
  result = loop_lib.resume_and_run(parts.step_fn, parts.model, parts.tx, parts.queries, mesh=parts.mesh,
                                   options=run.train, checkpoint=run.checkpoint, workdir=workdir,
                                   examples_per_step=run.rar.queries_per_step * run.rar.group_size,
                                   per_batch=parts.rollout, on_resume=on_resume)
  parts.model.params = result.state["params"]
  return result, parts


def greedy_reward(parts: Stage2Parts, params, num_rows: int) -> dict[str, float]:
  """Mean reward (and its parts) of the greedy strings of the policy at `params` for the first `num_rows`
  query listings: a fixed set, so the SFT and the tuned policy are compared on the same queries."""
  table = parts.environment.table
  processes = jax.process_count()  # each scores an equal share of the rows
  rows = np.arange(min(num_rows, len(table)) // processes * processes)
  data_cfg = generator.data_config(parts.policy_run)
  batches = generator_data.prompt_batches(table, parts.tokenizer, data_cfg, rows, with_answers=False)
  vl = builders.vl_config(parts.policy_run, parts.tokenizer)
  texts, cut, _ = attribute_eval.generate_strings(parts.model.merge(params), parts.tokenizer, batches,
                                                  generator_data.image_grid_thw(data_cfg), parts.mesh,
                                                  generator.greedy(parts.policy_run, vl))
  ids = [int(i) for i in table.listing_id[rows]][jax.process_index()::processes]
  rewards, info = parts.environment.score(ids, [texts[i] for i in ids], [i not in cut for i in ids])
  return rar_rollout.process_mean({"reward": float(rewards.mean()),
                                   **{k: v for k, v in info.items() if not k.endswith("_s")}})


def reward_trend(metrics_path: str) -> dict[str, float]:
  """First and last tenth of the logged steps: mean reward, attribute keys, malformed rate; the share
  of step time spent in the reward."""
  out: dict[str, float] = {}
  for key in ("reward_mean", "attribute_keys", "malformed_rate", "reward_equal_groups"):
    data = report.load_train_losses(metrics_path, key)
    if data is None:
      continue
    values = data[1]
    tenth = max(1, len(values) // 10)
    out[f"{key}_first"] = float(values[:tenth].mean())
    out[f"{key}_last"] = float(values[-tenth:].mean())
  reward_s = report.load_train_losses(metrics_path, "reward_s")
  step_s = report.load_train_losses(metrics_path, "step_time_s")
  if reward_s is not None and step_s is not None:
    common = np.intersect1d(reward_s[0], step_s[0])
    r = dict(zip(*reward_s))
    s = dict(zip(*step_s))
    if len(common):
      out["reward_time_share"] = float(np.sum([r[c] for c in common]) / np.sum([s[c] for c in common]))
  return out


def train_and_evaluate(run: schema.Run, workdir: str) -> dict[str, Any]:
  """The `stage2` stage; returns a JSON-able summary (also `<workdir>/summary.json`)."""
  t0 = time.perf_counter()
  result, parts = train(run, workdir)
  metrics_path = os.path.join(workdir, run.train.metrics_file)
  summary: dict[str, Any] = {
      "step": result.step, "stopped_early": result.stopped_early, "stop_reason": result.stop_reason,
      "steps_per_s": result.steps_per_s, **reward_trend(metrics_path),
  }
  if parallel.is_process_0():
    report.plot_loss_curve(metrics_path, os.path.join(workdir, "reward_curve.png"), key="reward_mean",
                           label="mean reward")
  # Evaluation: the greedy reward of the SFT and of the tuned policy on the same queries; the tuned
  # policy's attribute quality on listings never trained on, as after SFT.
  if run.train.eval_at_end and not result.stopped_early and run.rar.eval_queries:
    summary["greedy_reward_sft"] = greedy_reward(parts, parts.rollout.ref_params, run.rar.eval_queries)
    summary["greedy_reward_rar"] = greedy_reward(parts, parts.model.params, run.rar.eval_queries)
  if run.train.eval_at_end and not result.stopped_early:
    summary["attribute_eval"] = generator.evaluate(parts.policy_run, parts.model, parts.catalog, parts.tokenizer,
                                             workdir)
  summary["wall_s"] = time.perf_counter() - t0
  if parallel.is_process_0():
    files.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary
