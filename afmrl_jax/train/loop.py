"""The generic training loop: sharded state, one jitted step, checkpoints, resume, clean stops, logs.

Stage trainers supply a model constructor, a loss `loss_fn(model, batch) -> (loss, metrics)` (or a
`grad_fn` with the same contract that returns gradients itself, e.g. GradCache) and a data iterator
with grain's `get_state()` / `set_state()`. Everything else is here, once:

* state `{'step', 'params', 'opt_state'}` created sharded (`train.state`), restored from the latest
  checkpoint when one exists (with the data iterator's position, so the resumed run sees exactly the
  batches the uninterrupted one would);
* one `jax.jit` step with explicit in/out shardings and the state donated, compiled once (its
  `cost_analysis()` gives the FLOPs for MFU);
* a NaN/Inf loss stops the run naming the step and the batch (its listing ids), checked at every log
  boundary and before every checkpoint so a bad state is never saved;
* SIGTERM/SIGINT, or `stop_after_steps`, save a checkpoint and return cleanly.
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
from afmrl_jax.train import checkpointing
from afmrl_jax.train import logging as train_logging
from afmrl_jax.train import state as state_lib


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message names the step and the batch."""


@dataclasses.dataclass
class LoopConfig:
  """What the loop needs to know; stage trainers fill it from their ConfigDict."""
  num_steps: int
  stop_after_steps: int = 0  # stop (with a checkpoint) after this many steps of this process; 0 = off
  log_every: int = 10
  checkpoint_every: int = 100
  checkpoint_keep: int = 3
  checkpoint_async: bool = True
  checkpoint_enabled: bool = True
  resume: bool = True
  check_finite: bool = True
  examples_per_step: int = 1
  metrics_file: str = "metrics.jsonl"


@dataclasses.dataclass
class LoopResult:
  """What a finished (or stopped) run hands back."""
  model: state_lib.ShardedModel  # with the final trainable params merged in
  state: dict[str, Any]
  step: int  # completed steps
  losses: dict[int, float]  # step (1-based, completed) -> loss, for the steps this process ran
  stopped_early: bool
  stop_reason: str
  flops_per_step_per_device: float | None
  steps_per_s: float | None


def _device_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The numeric arrays of a host batch (strings and display fields stay on the host)."""
  out = {}
  for key, value in batch.items():
    arr = np.asarray(value)
    if arr.dtype.kind in "biuf":
      out[key] = arr
  return out


def _describe_batch(batch: Mapping[str, Any]) -> str:
  ids = batch.get("listing_id")
  if ids is None:
    return "(no listing ids in the batch)"
  ids = np.asarray(ids).ravel()
  shown = ", ".join(str(int(i)) for i in ids[:16])
  return f"listing ids [{shown}{', ...' if ids.size > 16 else ''}] ({ids.size} rows on this process)"


def make_train_step(graphdef: Any, tx: optax.GradientTransformation,
                    loss_fn: Callable | None = None, grad_fn: Callable | None = None) -> Callable:
  """step(state, rest, batch) -> (state, metrics): gradients of the loss w.r.t. `state['params']`.

  loss_fn(model, batch) -> (loss, metrics); or grad_fn(params, rest, batch) -> ((loss, metrics), grads).
  """
  if (loss_fn is None) == (grad_fn is None):
    raise ValueError("make_train_step: give exactly one of loss_fn and grad_fn.")

  def default_grad_fn(params, rest, batch):
    def objective(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch)
    return jax.value_and_grad(objective, has_aux=True)(params)

  compute = grad_fn or default_grad_fn

  def step(state, rest, batch):
    (loss, metrics), grads = compute(state["params"], rest, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step


def run(*, build: Callable[[], nnx.Module], trainable: Any, mesh: Mesh, tx: optax.GradientTransformation,
        data: Iterator, workdir: str, loop: LoopConfig, loss_fn: Callable | None = None,
        grad_fn_factory: Callable[[Any], Callable] | None = None,
        after_init: Callable[[state_lib.ShardedModel], None] | None = None,
        checkpoint_dir: str | None = None) -> LoopResult:
  """Trains until `loop.num_steps` (or a stop); see the module docstring.

  Args:
    build: zero-argument model constructor (deterministic).
    trainable: nnx filter of the trainable variables.
    data: iterator of process-local batch dicts with `get_state()` / `set_state()`.
    grad_fn_factory: graphdef -> grad_fn (see make_train_step), instead of loss_fn.
    after_init: called with the freshly created model before the train state is made or restored
      (e.g. to load pretrained weights in place: frozen weights are not checkpointed).
  """
  model = state_lib.create_sharded(build, mesh, trainable)
  shardings = state_lib.state_shardings(tx, model, mesh)
  ckpt = checkpointing.Checkpointer(checkpoint_dir or f"{workdir}/checkpoints", keep=loop.checkpoint_keep,
                                    async_save=loop.checkpoint_async) if loop.checkpoint_enabled else None
  latest = ckpt.latest_step() if (ckpt is not None and loop.resume) else None
  if after_init is not None:
    after_init(model)
  state = state_lib.init_train_state(tx, model, mesh, shardings)
  if latest is not None:
    state, data_state = ckpt.restore(latest, state_lib.abstract_like(state))
    if data_state is not None and hasattr(data, "set_state"):
      data.set_state(data_state)
    logging.info("Resumed from %s/%d.", ckpt.directory, latest)
  start = int(jax.device_get(state["step"]))

  grad_fn = grad_fn_factory(model.graphdef) if grad_fn_factory is not None else None
  step_fn = make_train_step(model.graphdef, tx, loss_fn=loss_fn, grad_fn=grad_fn)
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step_fn, in_shardings=(shardings, model.rest_shardings, None),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))

  logger = train_logging.MetricsLogger(workdir, loop.num_steps, loop.examples_per_step,
                                       metrics_file=loop.metrics_file, resumed_step=start)
  losses: dict[int, float] = {}
  pending: list[tuple[int, Any, dict[str, Any]]] = []  # (step, device metrics, host batch) since last check
  compiled = None
  flops = None
  stop_reason = ""
  step = start
  t_start = None
  steps_timed = 0

  def check_pending(log_last: bool) -> None:
    """Fetches the metrics of the steps since the last check; raises on a non-finite loss."""
    if not pending:
      return
    host = jax.device_get([m for _, m, _ in pending])
    for (s, _, batch), m in zip(pending, host):
      loss = float(m["loss"])
      if loop.check_finite and not np.isfinite(loss):
        raise NonFiniteLossError(
            f"The loss became {loss} at step {s} (batch of step {s}: {_describe_batch(batch)}); "
            f"the last good checkpoint is in {ckpt.directory if ckpt else '(checkpoints disabled)'}.")
      losses[s] = loss
    if log_last:
      logger.log(pending[-1][0], host[-1])
    pending.clear()

  def save(at: int) -> None:
    if ckpt is None:
      return
    data_state = data.get_state() if hasattr(data, "get_state") else None
    ckpt.save(at, state, data_state)

  try:
    with checkpointing.stop_on_signals() as stop_request, jax.set_mesh(mesh), parallel.logical_rules():
      while step < loop.num_steps:
        host_batch = next(data)
        batch = parallel.global_batch(_device_batch(host_batch), mesh)
        if compiled is None:
          compiled = jitted.lower(state, model.rest, batch).compile()
          flops = train_logging.compiled_flops(compiled)
          logger.flops = flops
        state, metrics = compiled(state, model.rest, batch)
        step += 1
        pending.append((step, metrics, {"listing_id": host_batch.get("listing_id")}))
        if step == start + 1:
          # The first step includes compilation: time from its end.
          jax.block_until_ready(metrics)
          t_start = time.perf_counter()
          logger.start(step)
        else:
          steps_timed += 1
        boundary = step % loop.log_every == 0 or step == loop.num_steps
        by_request = bool(stop_request)
        by_budget = loop.stop_after_steps and step - start >= loop.stop_after_steps
        checkpoint_now = step % loop.checkpoint_every == 0 or step == loop.num_steps or by_request or by_budget
        if boundary or checkpoint_now:
          check_pending(log_last=boundary)
        if checkpoint_now:
          save(step)
        if by_request or (by_budget and step < loop.num_steps):
          stop_reason = stop_request.signal_name if by_request else f"stop_after_steps={loop.stop_after_steps}"
          logging.warning("Stopping at step %d (%s); resume by running the same command again.", step,
                          stop_reason)
          break
      check_pending(log_last=False)
  finally:
    logger.close()
    if ckpt is not None:
      ckpt.close()
  elapsed = time.perf_counter() - t_start if t_start is not None else 0.0
  model.params = state["params"]
  return LoopResult(
      model=model, state=state, step=step, losses=losses, stopped_early=bool(stop_reason),
      stop_reason=stop_reason, flops_per_step_per_device=flops,
      steps_per_s=(steps_timed / elapsed) if elapsed > 0 and steps_timed else None)
