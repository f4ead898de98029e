"""A workdir that cannot be silently corrupted: the config fingerprint beside the checkpoints.

When a run first starts in a workdir, `prepare(run, workdir)` stores the fields that give its checkpoints
their meaning (model, loss, data, optimizer, LoRA, RL; not logging, evaluation, checkpoint frequency or
run length) in `<workdir>/config_fingerprint.json`. A run that would resume from the workdir's checkpoints
under a config whose fingerprint differs is refused before anything is built or written, with one line
naming every differing field (old -> new); `--config.checkpoint.allow_config_change=True` resumes anyway,
says so on the console and, once the checkpoint has restored, appends the change and the step to
`<workdir>/config_changes.jsonl`. `train.num_steps` is not fingerprinted (a run may be extended), but the
cosine schedule decays to it: a resume that changes it says so in one line (the learning rate of the next
step, old and new) and records it in the same file. Every trainer calls `prepare` first (instead of writing
config.json itself); `prepare` returns the on-resume callback that `loop.resume_and_run` calls after a
successful restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

from afmrl_jax import parallel
from afmrl_jax.config import schema
from afmrl_jax.train import checkpointing

from afmrl_jax.errors import WorkdirError
from afmrl_jax.train import files

FINGERPRINT_FILE = "config_fingerprint.json"
CHANGES_FILE = "config_changes.jsonl"

# What the checkpoints mean: top-level fields, then whole sections (minus the knobs below).
FINGERPRINT_TOP = ("stage", "task", "dtype")
FINGERPRINT_SECTIONS = ("model", "lora", "loss", "mining", "catalog", "pipeline", "attributes", "generator",
                        "optimizer", "rar", "grpo", "reward")
# Throughput and bookkeeping knobs inside those sections: they change neither the batches nor the math.
NOT_FINGERPRINTED = ("catalog.cache_dir", "pipeline.eval_batch_size", "pipeline.num_threads",
                     "pipeline.prefetch_buffer_size", "pipeline.worker_processes", "generator.eval_batch_size",
                     "generator.num_threads", "generator.prefetch_buffer_size", "rar.rollout_chunks",
                     "rar.eval_queries")


def _not_fingerprinted(config: dict[str, Any]) -> set[str]:
  """NOT_FINGERPRINTED, adjusted by what the run uses: with mining on, `pipeline.eval_batch_size` is the
  batch the mining refresh embeds with, and another batch size gives other float sums, so other neighbours
  near a tie: other mined negatives (kept); with a manifest, `pipeline.fresh_views` does nothing (it
  re-renders the synthetic catalog's products; `stages.stage1.data.pipeline_config`), so it is no change (dropped)."""
  skip = set(NOT_FINGERPRINTED)
  if (config.get("mining") or {}).get("enabled"):
    skip.discard("pipeline.eval_batch_size")
  if (config.get("catalog") or {}).get("manifest"):
    skip.add("pipeline.fresh_views")
  return skip


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
  if isinstance(value, dict):
    for key in sorted(value):
      _flatten(value[key], f"{prefix}.{key}", out)
  else:
    out[prefix] = value


def fingerprint_fields(config: dict[str, Any]) -> dict[str, Any]:
  """{`config.<section>.<field>`: JSON value} of the fields that give a run's checkpoints their meaning,
  from `Run.to_dict()` (or a saved config.json); nested dicts (`model.arch`) are flattened too."""
  config = json.loads(json.dumps(config, default=str))  # tuples -> lists, as stored
  out: dict[str, Any] = {}
  for name in FINGERPRINT_TOP:
    if name in config:
      out[f"config.{name}"] = config[name]
  for section in FINGERPRINT_SECTIONS:
    if isinstance(config.get(section), dict):
      _flatten(config[section], f"config.{section}", out)
  for name in _not_fingerprinted(config):
    out.pop(f"config.{name}", None)
  return out


def digest(fields: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{field: (old, new)} for the fields both fingerprints hold with different values (a field only one
  side has was added to or removed from the schema in between, and is not a change of the run)."""
  return {k: (old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]}


def _show(value: Any) -> str:
  text = repr(value) if isinstance(value, str) else json.dumps(value)
  return text if len(text) <= 80 else text[:77] + "..."


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
  return "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())


def stored_fingerprint(workdir: str) -> dict[str, Any] | None:
  """The fields of `<workdir>/config_fingerprint.json`; for a workdir written before fingerprints, those of
  its `config.json`; None without either."""
  path = os.path.join(workdir, FINGERPRINT_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)["fields"]
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return fingerprint_fields(json.load(f))
  return None


def _write_fingerprint(workdir: str, fields: dict[str, Any]) -> None:
  files.write_json(os.path.join(workdir, FINGERPRINT_FILE), {"digest": digest(fields), "fields": fields})


def prepare(run: schema.Run, workdir: str) -> Callable[[int], None]:
  """Checks `run` (a `schema.Run`) against the fingerprint of the checkpoints it would resume from.

  A fresh start writes the fingerprint and `<workdir>/config.json` now; a resume leaves them (and the
  record of an allowed change) to the callback this returns, which the stage hands to
  `loop.resume_and_run(on_resume=...)`; the loop calls it once the checkpoint has restored, so a resume
  that fails (a model of another shape) changes nothing in the workdir.
  Raises WorkdirError (one line naming every differing field, old -> new; its hint names the override)
  when resuming under a different config without `checkpoint.allow_config_change`."""
  fields = fingerprint_fields(run.to_dict())
  ckpt = run.checkpoint
  stored = stored_fingerprint(workdir) if checkpointing.has_checkpoint(workdir) else None
  if stored is None:  # a fresh workdir (or checkpoints without any record of their config)
    _write_fingerprint(workdir, fields)
    files.write_json(os.path.join(workdir, "config.json"), run.to_dict())
    return _nothing
  if not (ckpt.enabled and ckpt.resume):
    # This run does not resume: the fingerprint keeps guarding the checkpoints already in the workdir.
    return _nothing
  changes = differences(stored, fields)
  step = checkpointing.latest_saved_step(workdir)
  if changes and not ckpt.allow_config_change:
    raise WorkdirError(
        f"{workdir} holds checkpoints (step {step}) of a run with a different config: {describe(changes)}",
        hint=f"rerun with that config, use a new --workdir, or pass --config.checkpoint.allow_config_change=True "
             f"to resume under this one (recorded in {CHANGES_FILE})")
  old_steps = _stored_num_steps(workdir)
  pending = {
      "fields": fields, "changes": changes, "config": run.to_dict(), "optimizer": run.optimizer,
      "num_steps": (old_steps, run.train.num_steps) if old_steps not in (None, run.train.num_steps) else None,
      "new_fields": bool(set(fields) - set(stored))}
  return lambda resumed_step: commit(workdir, resumed_step, pending)


def _stored_num_steps(workdir: str) -> int | None:
  """`train.num_steps` of the run that last trained in `workdir` (its config.json), None if unknown."""
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      return int(json.load(f)["train"]["num_steps"])
  except (OSError, KeyError, TypeError, ValueError):
    return None


def _schedule_change(optimizer: Any, old: int, new: int, step: int) -> tuple[str, list[float]]:
  """The console words for a resume at `step` whose `train.num_steps` went `old` -> `new`, and the learning
  rate of the next update under each (`train.state.make_schedule`: the cosine decays to num_steps)."""
  from afmrl_jax.train.state import make_schedule  # optax: only when a resume changed the run length
  rates = [float(f"{float(make_schedule(optimizer, n)(step)):.6g}") for n in (old, new)]
  return (f"config.train.num_steps changed {old} -> {new} at step {step}: the learning-rate schedule (warmup, "
          f"then cosine decay to step {new}) changes with it; the learning rate of step {step} is "
          f"{rates[1]:.3g}, not {rates[0]:.3g}"), rates


def _nothing(step: int) -> None:
  del step


def commit(workdir: str, step: int, pending: dict[str, Any]) -> None:
  """After a resume from `step` restored: appends the allowed change (if any) to `config_changes.jsonl`
  and prints one line saying so; writes the fingerprint and `config.json` of the run that `prepare`
  checked (`pending`: its fingerprint fields, changes and config)."""
  changes = pending["changes"]
  num_steps = pending["num_steps"]
  if num_steps is not None and step >= num_steps[1]:
    # Nothing trains under the new length: config.json keeps the length the checkpoints were trained with.
    pending["config"]["train"]["num_steps"] = num_steps[0]
    num_steps = None
  path = os.path.join(workdir, CHANGES_FILE)
  if (changes or num_steps) and parallel.is_process_0():
    row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "changes": {k: [a, b] for k, (a, b) in changes.items()}}
    if num_steps:  # not fingerprinted (a run may be extended), but it moves the learning-rate schedule
      line, rates = _schedule_change(pending["optimizer"], *num_steps, step)
      row["changes"]["config.train.num_steps"] = list(num_steps)
      row["learning_rate_at_step"] = rates
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row, default=str) + "\n")
    if changes:
      print(f"config changed at step {step} (config.checkpoint.allow_config_change=True): {describe(changes)}; "
            f"recorded in {path}", flush=True)
    if num_steps:
      print(f"{line}; recorded in {path}", flush=True)
  if changes or pending["new_fields"] or not os.path.isfile(os.path.join(workdir, FINGERPRINT_FILE)):
    # Also adopts the config of a workdir from before fingerprints, or before a field was fingerprinted.
    _write_fingerprint(workdir, pending["fields"])
  files.write_json(os.path.join(workdir, "config.json"), pending["config"])
