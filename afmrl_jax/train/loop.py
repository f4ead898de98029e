"""The training loop every stage shares: one jitted step, logs, checkpoints, clean stops.

A stage builds the pieces and hands them over explicitly (see `stages/stage1/run.py`):

    step_fn = make_train_step(model.graphdef, tx, loss_fn=loss_fn)      # or grad_fn= (GradCache)
    state, _ = checkpointer.restore_latest(init_state, train_iter)      # resume, data position too
    result = run(step_fn, state, model.rest, train_iter, mesh=mesh, shardings=shardings, ...)

`run` jits the step once with explicit in/out shardings and the state donated (its `cost_analysis()`
gives the FLOPs for MFU), then per step: next batch -> global arrays -> step -> at log and checkpoint
boundaries fetch the pending metrics (a NaN/Inf loss stops the run naming the step and the batch, so a
bad state is never saved) -> save. SIGTERM/SIGINT or `stop_after_steps` save and return cleanly (with several
processes, a signal to any of them stops all at the same step: `stop_check_every`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from afmrl_jax import parallel
from afmrl_jax.errors import UserError
from afmrl_jax.config.sections import CheckpointOptions, TrainOptions
from afmrl_jax.train import checkpointing
from afmrl_jax.train import metrics_log as train_logging
from afmrl_jax.train import state as state_lib


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss became NaN or Inf; the message names the step and the batch."""

  hint = "lower config.optimizer.learning_rate; the run resumes from its last checkpoint"  # a stage may pass its own



@dataclasses.dataclass
class LoopResult:
  """What a finished (or stopped) run hands back."""
  state: dict[str, Any]  # the train state after the last completed step
  step: int  # completed steps
  losses: dict[int, float]  # step (1-based, completed) -> loss, for the steps this process ran
  stopped_early: bool
  stop_reason: str
  flops_per_step_per_device: float | None
  steps_per_s: float | None  # timed from the end of the first step this call ran (start_step + 1)
  start_step: int = 0  # the state's step when this call began (a resumed run's checkpoint step)


def _signalled(stop_request: checkpointing.StopRequest, step: int, check_every: int, num_steps: int) -> bool:
  """Whether the run stops for a signal after `step`: at once with one process; with several, at steps
  divisible by `check_every` and at the last step, if any process was signalled (so that all save and
  leave together, and a signal near the end still marks the run as stopped)."""
  if jax.process_count() == 1:
    return bool(stop_request)
  return (step % check_every == 0 or step == num_steps) and parallel.any_process(bool(stop_request))


def _device_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The numeric arrays of a host batch (strings and display fields stay on the host)."""
  arrays = {key: np.asarray(value) for key, value in batch.items()}
  return {key: arr for key, arr in arrays.items() if arr.dtype.kind in "biuf"}


def _describe_batch(ids: Any) -> str:
  if ids is None:
    return "(no listing ids in the batch)"
  ids = np.asarray(ids).ravel()
  shown = ", ".join(str(int(i)) for i in ids[:16])
  return f"listing ids [{shown}{', ...' if ids.size > 16 else ''}] ({ids.size} rows on this process)"


def make_train_step(graphdef: Any, tx: optax.GradientTransformation,
                    loss_fn: Callable | None = None, grad_fn: Callable | None = None,
                    updates_per_step: int = 1) -> Callable:
  """step(state, rest, batch) -> (state, metrics): gradients of the loss w.r.t. `state['params']`.

  loss_fn(model, batch) -> (loss, metrics); or grad_fn(params, rest, batch) -> ((loss, metrics), grads).
  updates_per_step: optimizer updates on the same batch per step (GRPO's inner epochs); the metrics are
  the last update's, and `state['step']` counts steps, not updates.
  """
  if (loss_fn is None) == (grad_fn is None):
    raise ValueError("make_train_step: give exactly one of loss_fn and grad_fn.")

  def default_grad_fn(params, rest, batch):
    def objective(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch)
    return jax.value_and_grad(objective, has_aux=True)(params)

  compute = grad_fn or default_grad_fn

  def step(state, rest, batch):
    params, opt_state = state["params"], state["opt_state"]
    for _ in range(updates_per_step):
      (loss, metrics), grads = compute(params, rest, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step


def resume_and_run(step_fn: Callable, model: Any, tx: optax.GradientTransformation, data: Iterator, *,
                   mesh: Mesh, options: TrainOptions, checkpoint: CheckpointOptions,
                   workdir: str, examples_per_step: int, per_batch: Callable | None = None,
                   on_resume: Callable[[int], None] | None = None, nonfinite_hint: str | None = None) -> LoopResult:
  """What every stage does after building its step: a fresh train state for `model`
  (`train.state.ShardedModel`), resumed from the latest checkpoint of `workdir` (the data iterator too)
  unless `checkpoint.resume` is off, else started from `checkpoint.init_from`'s params; then `run`.
  A resume prints `resumed from step N`, or `already at step N (...); nothing to train` when the checkpoint
  is at or past `train.num_steps` (the stage then returns the restored state)."""
  shardings = state_lib.state_shardings(tx, model, mesh)
  state = state_lib.init_train_state(tx, model, mesh, shardings)
  checkpointer = checkpointing.Checkpointer.for_workdir(workdir, checkpoint)
  resumed = None
  if checkpointer is not None and checkpoint.resume:
    try:
      state, resumed = checkpointer.restore_latest(state, data, set_aside=True)  # damaged steps: moved aside
    except BaseException:
      checkpointer.close()  # e.g. a checkpoint of another model shape (one-line error): release orbax first
      raise
  if resumed is not None and on_resume is not None:
    on_resume(resumed)  # e.g. `workdir.prepare`'s: the config it checked is written now that the restore worked
  if resumed is not None and parallel.is_process_0():
    if resumed >= options.num_steps:  # `run` trains nothing; say so instead of returning silently
      print(f"already at step {resumed} (train.num_steps={options.num_steps}); nothing to train", flush=True)
    else:
      print(f"resumed from step {resumed}", flush=True)
  if resumed is None and checkpoint.init_from:
    state = dict(state, params=checkpointing.restore_params(checkpoint.init_from, state))
  return run(step_fn, state, model.rest, data, mesh=mesh, shardings=(shardings, model.rest_shardings),
             options=options, workdir=workdir, examples_per_step=examples_per_step, checkpointer=checkpointer,
             per_batch=per_batch, nonfinite_hint=nonfinite_hint)


class _PendingMetrics:
  """Device metrics of the steps since the last boundary: fetched together, checked, logged."""

  def __init__(self, logger: train_logging.MetricsLogger, check_finite: bool, checkpoint_dir: str,
               hint: str | None = None):
    self.logger, self.check_finite, self.checkpoint_dir, self.hint = logger, check_finite, checkpoint_dir, hint
    self.losses: dict[int, float] = {}
    self._rows: list[tuple[int, Any, Any]] = []  # (step, device metrics, listing ids of its batch)

  def add(self, step: int, metrics: Any, listing_ids: Any) -> None:
    self._rows.append((step, metrics, listing_ids))

  def flush(self, log_last: bool) -> None:
    """Fetches the pending metrics; raises NonFiniteLossError on a NaN/Inf loss."""
    if not self._rows:
      return
    host = jax.device_get([m for _, m, _ in self._rows])
    for (step, _, ids), m in zip(self._rows, host):
      loss = float(m["loss"])
      if self.check_finite and not np.isfinite(loss):
        error = NonFiniteLossError(f"The loss became {loss} at step {step} (batch of step {step}: "
                                   f"{_describe_batch(ids)}); the last good checkpoint is in {self.checkpoint_dir}.")
        if self.hint:
          error.hint = self.hint
        raise error
      self.losses[step] = loss
    if log_last:
      self.logger.log(self._rows[-1][0], host[-1])
    self._rows.clear()


def run(step_fn: Callable, state: dict[str, Any], rest: Any, data: Iterator, *, mesh: Mesh,
        shardings: tuple[Any, Any], options: TrainOptions, workdir: str, examples_per_step: int,
        checkpointer: checkpointing.Checkpointer | None = None, per_batch: Callable | None = None,
        nonfinite_hint: str | None = None) -> LoopResult:
  """Trains from `state['step']` to `options.num_steps` (or a stop); see the module docstring.

  Args:
    step_fn: step(state, rest, batch) -> (state, metrics with 'loss'), from `make_train_step`.
    state: the train state (fresh or restored), sharded like `shardings[0]`; donated.
    rest: the frozen model variables, sharded like `shardings[1]`.
    data: iterator of process-local batch dicts with `get_state()` / `set_state()`.
    shardings: (train-state shardings, frozen-variable shardings).
    checkpointer: saves every `checkpointer.every` steps, at the end and on a stop; None = no saves.
    per_batch: per_batch(state, host_batch) -> (host batch, host metrics): turns what `data` yields into
      the step's batch with the current state (stage 1: mined negatives; stage 2: sample and score
      rollouts); its metrics are logged with the step's.
    nonfinite_hint: the stage's hint for a NaN/Inf loss (which knob to change); None = the generic one.
  """
  state_sh, rest_sh = shardings
  jitted = jax.jit(step_fn, in_shardings=(state_sh, rest_sh, None),
                   out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
  start = step = int(jax.device_get(state["step"]))
  logger = train_logging.MetricsLogger(workdir, options.num_steps, examples_per_step,
                                       metrics_file=options.metrics_file, resumed_step=start)
  pending = _PendingMetrics(logger, options.check_finite,
                            checkpointer.directory if checkpointer else "(checkpoints disabled)", nonfinite_hint)
  compiled, flops, stop_reason, t_start = None, None, "", None

  def save(at: int) -> None:
    if checkpointer is not None:
      checkpointer.save(at, state, data.get_state() if hasattr(data, "get_state") else None)

  try:
    with checkpointing.stop_on_signals() as stop_request, jax.set_mesh(mesh), parallel.logical_rules():
      while step < options.num_steps:
        host_batch, host_metrics = next(data), {}
        if per_batch is not None:
          host_batch, host_metrics = per_batch(state, host_batch)
        batch = parallel.global_batch(_device_batch(host_batch), mesh)
        if compiled is None:  # compile once; the cost analysis gives the FLOPs per step
          compiled = jitted.lower(state, rest, batch).compile()
          flops = logger.flops = train_logging.compiled_flops(compiled)
        state, metrics = compiled(state, rest, batch)
        metrics = dict(metrics, **host_metrics)
        step += 1
        pending.add(step, metrics, host_batch.get("listing_id"))
        if step == start + 1:  # time from the end of the first step (it includes compilation)
          jax.block_until_ready(metrics)
          t_start = time.perf_counter()
          logger.start(step)

        log_now = step % options.log_every == 0 or step == options.num_steps
        by_budget = bool(options.stop_after_steps) and step - start >= options.stop_after_steps
        signalled = _signalled(stop_request, step, options.stop_check_every, options.num_steps)
        stop_now = signalled or (by_budget and step < options.num_steps)
        save_now = stop_now or step == options.num_steps or bool(
            checkpointer and step % checkpointer.every == 0)
        if log_now or save_now:
          pending.flush(log_last=log_now)
        if save_now:
          save(step)
        if stop_now:
          stop_reason = ((stop_request.signal_name or "a signal to another process") if signalled else
                         f"stop_after_steps={options.stop_after_steps}")
          logging.warning("Stopping at step %d (%s); resume by running the same command again.", step,
                          stop_reason)
          break
      pending.flush(log_last=False)
  finally:
    logger.close()
    if checkpointer is not None:
      checkpointer.close()
  timed = step - start - 1
  elapsed = time.perf_counter() - t_start if t_start is not None else 0.0
  return LoopResult(state=state, step=step, losses=pending.losses, stopped_early=bool(stop_reason),
                    stop_reason=stop_reason, flops_per_step_per_device=flops,
                    steps_per_s=timed / elapsed if elapsed > 0 and timed > 0 else None, start_step=start)
