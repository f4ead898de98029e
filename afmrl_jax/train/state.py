"""Train state, optimizer and sharded parameter creation.

The train state is a plain pytree dict `{'step': int32[], 'params': nnx.State, 'opt_state': optax state}`
(what the jitted step donates and orbax saves). `params` holds only the trainable variables (every
`nnx.Param`, or only the `nnx.LoRAParam` adapters with LoRA on); the frozen rest of the model lives in a
separate `nnx.State` that is an input of the step but never an output, so it is never copied or donated.

Parameters are created already sharded: the model constructor runs inside `jax.jit` with
`out_shardings` computed from the variables' logical axis names under `parallel.logical_rules()`, so
no device (or the host) ever holds a whole large model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from afmrl_jax import parallel
from afmrl_jax.config.sections import OptimizerConfig
from afmrl_jax.models import sharding as model_sharding



def make_schedule(opt: OptimizerConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to `min_lr_ratio`."""
  warmup = min(int(opt.warmup_steps), max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=opt.learning_rate * opt.min_lr_ratio)


def weight_decay_mask(params: Any) -> Any:
  """Decay matrices and kernels only (ndim >= 2); biases, norms and scalars are not decayed."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(opt: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping (if `grad_clip > 0`) followed by AdamW on the warmup + cosine schedule."""
  adamw = optax.adamw(make_schedule(opt, num_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay, mask=weight_decay_mask)
  if opt.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw)
  return adamw


@dataclasses.dataclass
class ShardedModel:
  """A model split for functional training.

  graphdef: the static structure (`nnx.merge(graphdef, params, rest)` rebuilds the module).
  params / rest: trainable and frozen variables as `nnx.State`, sharded on the mesh.
  param_shardings / rest_shardings: matching trees of `NamedSharding`.
  """
  graphdef: Any
  params: nnx.State
  rest: nnx.State
  param_shardings: Any
  rest_shardings: Any

  def merge(self, params: nnx.State | None = None) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)


def create_sharded(build: Callable[[], nnx.Module], mesh: Mesh, trainable: Any) -> ShardedModel:
  """Runs `build()` under jit with out_shardings from the logical axis rules.

  Args:
    build: zero-argument constructor of the model (seeded inside, so the result is deterministic).
    mesh: the device mesh.
    trainable: nnx filter of the trainable variables (`nnx.Param` or `nnx.LoRAParam`).
  """
  with jax.set_mesh(mesh), parallel.logical_rules():
    abstract = nnx.eval_shape(build)
    graphdef, abs_params, abs_rest = nnx.split(abstract, trainable, ...)
    # models.sharding drops mesh axes a dimension does not divide (small vision towers on big meshes).
    param_sh = model_sharding.state_shardings(abs_params, mesh)
    rest_sh = model_sharding.state_shardings(abs_rest, mesh)

    def init():
      _, params, rest = nnx.split(build(), trainable, ...)
      return params, rest

    params, rest = jax.jit(init, out_shardings=(param_sh, rest_sh))()
  return ShardedModel(graphdef, params, rest, param_sh, rest_sh)


def is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def opt_state_shardings(tx: optax.GradientTransformation, params: nnx.State, param_shardings: Any,
                        mesh: Mesh) -> Any:
  """Optimizer-state shardings: moments follow their parameter, counters are replicated."""
  abstract = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                               transform_non_params=lambda _: replicated, is_leaf=is_variable)


def state_shardings(tx: optax.GradientTransformation, model: ShardedModel, mesh: Mesh) -> dict[str, Any]:
  """Shardings of the train-state dict (`step`, `params`, `opt_state`)."""
  return {
      "step": NamedSharding(mesh, PartitionSpec()),
      "params": model.param_shardings,
      "opt_state": opt_state_shardings(tx, model.params, model.param_shardings, mesh),
  }


def _fresh_state(tx: optax.GradientTransformation, params: nnx.State) -> dict[str, Any]:
  """The one layout of the train state."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def init_train_state(tx: optax.GradientTransformation, model: ShardedModel, mesh: Mesh,
                     shardings: dict[str, Any] | None = None) -> dict[str, Any]:
  """The step-0 train state, created sharded (`model.params` is copied, not donated)."""
  shardings = shardings or state_shardings(tx, model, mesh)
  with jax.set_mesh(mesh):
    return jax.jit(lambda p: _fresh_state(tx, p), out_shardings=shardings)(model.params)


def train_state_shapes(tx: optax.GradientTransformation, model: ShardedModel, mesh: Mesh) -> dict[str, Any]:
  """ShapeDtypeStructs (with shardings) of the train state: a restore target that allocates nothing."""
  abstract = jax.eval_shape(lambda p: _fresh_state(tx, p), model.params)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      state_shardings(tx, model, mesh))


def count_params(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
