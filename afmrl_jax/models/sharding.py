"""Sharding helpers for the model modules, on top of `afmrl_jax.parallel.LOGICAL_RULES`.

Parameters carry logical axis names in their nnx `out_sharding` metadata (created with
`eager_sharding=False`, so a model also builds with no mesh at all). These helpers turn the names
into concrete shardings for one mesh (`parallel.logical_to_spec`, which drops a mesh axis from a
dimension it does not divide).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from afmrl_jax.parallel import LOGICAL_RULES, logical_to_spec


def param(value: jax.Array, *names: str | None) -> nnx.Param:
  """An nnx.Param annotated with logical axes (one name per dimension)."""
  if len(names) != value.ndim:
    raise ValueError(f'models.sharding.param: {len(names)} axis names {names} for shape {value.shape}')
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def linear_metadata(*names: str | None) -> dict[str, Any]:
  """`kernel_metadata` / `bias_metadata` for nnx.Linear with logical axes."""
  return {'out_sharding': tuple(names), 'eager_sharding': False}


def spec_for(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
             mesh: Mesh | jax.sharding.AbstractMesh, rules=LOGICAL_RULES) -> PartitionSpec:
  """PartitionSpec for one array; mesh axes that do not divide (or are already used) are dropped."""
  return logical_to_spec(logical_axes, shape, mesh, rules)


def _spec_of_variable(v: nnx.Variable, mesh, rules) -> PartitionSpec:
  return spec_for(v.get_metadata().get('out_sharding'), v.get_value().shape, mesh, rules)


def state_shardings(state: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedSharding for every Variable of an nnx (abstract) state, same tree structure."""
  return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, _spec_of_variable(v, mesh, rules))),
                      state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(constructor: Callable[[], nnx.Module], mesh: Mesh,
                   rules=LOGICAL_RULES) -> nnx.Module:
  """Runs `constructor()` under jit with each parameter created directly on its sharding.

  Shapes and logical axes come from an abstract trace first, so neither the host nor any single
  device ever holds the whole model.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(constructor))
  shardings = state_shardings(abstract_state, mesh, rules)

  @jax.jit
  def init():
    return jax.lax.with_sharding_constraint(nnx.state(constructor()), shardings)

  with jax.set_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.Module:
  """Moves an existing model's parameters onto their shardings (returns a new module)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))


def constrain(x: jax.Array, *logical_axes: str | None, rules=LOGICAL_RULES) -> jax.Array:
  """Sharding constraint on an activation when a mesh is set (`jax.set_mesh`); identity otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(logical_axes, x.shape, mesh, rules))
