"""The generic training loop on a toy sharded model: exact resume, clean stops, NaN detection, optimizer.

The model is a two-layer MLP with logical axis names (so FSDP/tensor sharding is exercised on the 8
simulated CPU devices) and the data a real grain pipeline with checkpointable iterator state.
"""

import math
import os
import signal
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from afmrl_jax.config import sections
from afmrl_jax import parallel
from afmrl_jax.train import checkpointing
from afmrl_jax.train import loop as loop_lib
from afmrl_jax.train import state as state_lib

DIM = 8


class Toy(nnx.Module):
  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.w1 = nnx.Linear(DIM, 16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
    self.w2 = nnx.Linear(16, DIM, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)

  def __call__(self, x):
    return self.w2(jax.nn.gelu(self.w1(x)))


def build():
  return Toy(nnx.Rngs(0))


TARGET = np.random.default_rng(1).normal(size=(DIM, DIM)).astype(np.float32)


def _example(i):
  x = np.random.default_rng(int(i)).normal(size=(DIM,)).astype(np.float32)
  return {"x": x, "y": (x @ TARGET).astype(np.float32), "listing_id": np.int32(i)}


def data_iter(batch=16):
  ds = grain.MapDataset.range(4096).shuffle(seed=3).map(_example).batch(batch, drop_remainder=True)
  return iter(ds.repeat().to_iter_dataset())


def loss_fn(model, batch):
  err = model(batch["x"]) - batch["y"]
  loss = jnp.mean(err ** 2)
  return loss, {"mse": loss}


def opt_config(**kw):
  return sections.OptimizerConfig(**{**dict(learning_rate=3e-2, warmup_steps=3, min_lr_ratio=0.1, b1=0.9,
                                             b2=0.98, eps=1e-8, weight_decay=0.01, grad_clip=1.0), **kw})


def train(workdir, num_steps=12, stop_after=0, every=4, mesh_shape=None, loss=loss_fn, data=None):
  """What a stage does: model, state, step, checkpointer (resume), loop."""
  mesh = parallel.make_mesh(mesh_shape or {"data": 2, "fsdp": 2, "tensor": 2})
  model = state_lib.create_sharded(build, mesh, nnx.Param)
  tx = state_lib.make_optimizer(opt_config(), num_steps)
  shardings = state_lib.state_shardings(tx, model, mesh)
  step_fn = loop_lib.make_train_step(model.graphdef, tx, loss_fn=loss)
  data = data or data_iter()
  checkpointer = checkpointing.Checkpointer.for_workdir(str(workdir), sections.CheckpointOptions(
      every=every, keep=2))
  state, _ = checkpointer.restore_latest(state_lib.init_train_state(tx, model, mesh, shardings), data)
  options = sections.TrainOptions(num_steps=num_steps, stop_after_steps=stop_after, log_every=1)
  return loop_lib.run(step_fn, state, model.rest, data, mesh=mesh, shardings=(shardings, model.rest_shardings),
                      options=options, workdir=str(workdir), examples_per_step=16, checkpointer=checkpointer)


def params_np(result):
  return jax.tree.map(np.asarray, result.state["params"])


def test_schedule_warmup_and_cosine():
  sched = state_lib.make_schedule(opt_config(learning_rate=1.0, warmup_steps=4, min_lr_ratio=0.1), 20)
  assert float(sched(0)) == 0.0
  assert math.isclose(float(sched(2)), 0.5, rel_tol=1e-6)
  assert math.isclose(float(sched(4)), 1.0, rel_tol=1e-6)
  # halfway through the cosine: lr = end + (peak - end) * 0.5
  assert math.isclose(float(sched(12)), 0.1 + 0.9 * 0.5, rel_tol=1e-5)
  assert math.isclose(float(sched(20)), 0.1, rel_tol=1e-5)


def test_optimizer_clips_and_skips_decay_on_vectors():
  tx = state_lib.make_optimizer(opt_config(learning_rate=1.0, warmup_steps=0, weight_decay=0.5,
                                           grad_clip=1.0), 10)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  opt = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, opt, params)
  # zero gradient: only decoupled weight decay moves params, and only the matrix: -lr * wd * w
  np.testing.assert_allclose(updates["w"], -0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], np.zeros(2), atol=0)
  # clipping: a huge gradient has the same first Adam step direction/size as a unit one
  big = {"w": 1e6 * jnp.ones((2, 2)), "b": jnp.zeros(2)}
  tx2 = state_lib.make_optimizer(opt_config(learning_rate=1.0, warmup_steps=0, weight_decay=0.0), 10)
  u_big, _ = tx2.update(big, tx2.init(params), params)
  np.testing.assert_allclose(u_big["w"], -np.ones((2, 2)), rtol=1e-4)


def test_parameters_created_sharded():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = state_lib.create_sharded(build, mesh, nnx.Param)
  kernel = model.params["w1"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  # each device holds a quarter of the [8, 16] kernel
  assert {s.data.shape for s in kernel.addressable_shards} == {(4, 8)}
  # same values as the unsharded constructor
  with nnx.use_eager_sharding(False):
    plain = build()
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(plain.w1.kernel[...]))


def test_loss_falls(tmp_path):
  result = train(tmp_path, num_steps=30, every=100)
  assert result.step == 30 and not result.stopped_early
  first = np.mean([result.losses[s] for s in range(1, 5)])
  last = np.mean([result.losses[s] for s in range(27, 31)])
  assert last < 0.5 * first


def test_stop_and_resume_is_bitwise_exact(tmp_path):
  full = train(tmp_path / "full", num_steps=12)
  first = train(tmp_path / "split", num_steps=12, stop_after=6)
  assert first.stopped_early and first.step == 6
  second = train(tmp_path / "split", num_steps=12)
  assert second.step == 12 and min(second.losses) == 7
  for s in range(1, 13):
    got = first.losses[s] if s <= 6 else second.losses[s]
    assert got == full.losses[s], s
  jax.tree.map(np.testing.assert_array_equal, params_np(second), params_np(full))
  opt_full = jax.tree.map(np.asarray, full.state["opt_state"])
  opt_split = jax.tree.map(np.asarray, second.state["opt_state"])
  jax.tree.map(np.testing.assert_array_equal, opt_split, opt_full)


def test_stop_between_checkpoints_resumes_from_stop(tmp_path):
  # stop at 5 (checkpoint every 4): the stop itself saves step 5, so nothing is recomputed
  train(tmp_path, num_steps=8, stop_after=5)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps[-1] == 5 and len(steps) <= 2  # keep=2
  again = train(tmp_path, num_steps=8)
  assert min(again.losses) == 6


def test_sigterm_saves_and_stops(tmp_path):
  data = data_iter()
  calls = {"n": 0}

  class Signalling:
    """Sends SIGTERM to this process while the 3rd batch is being read."""
    def __next__(self):
      calls["n"] += 1
      if calls["n"] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return next(data)

    def get_state(self):
      return data.get_state()

    def set_state(self, s):
      data.set_state(s)

  assert threading.current_thread() is threading.main_thread()
  result = train(tmp_path, num_steps=12, data=Signalling())
  assert result.stopped_early and result.stop_reason == "SIGTERM" and result.step == 3
  assert 3 in [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  # the handler is removed afterwards
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_nan_loss_names_step_and_batch(tmp_path):
  def bad_loss(model, batch):
    loss, m = loss_fn(model, batch)
    # poisoned from the 4th step on (counted through the optimizer state would be circular; use data)
    poisoned = jnp.any(batch["listing_id"] == BAD_ID)
    return jnp.where(poisoned, jnp.nan, loss), m

  it = data_iter()
  ids = [next(it)["listing_id"] for _ in range(4)]
  global BAD_ID
  BAD_ID = int(ids[3][0])
  with pytest.raises(loop_lib.NonFiniteLossError, match=rf"step 4 .*{BAD_ID}"):
    train(tmp_path, num_steps=12, every=100, loss=bad_loss)


BAD_ID = -1
