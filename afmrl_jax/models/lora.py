"""LoRA adapters for NNX module trees: wrap projections, train only the adapters, merge for export.

`apply_lora(model, config, rngs)` replaces every projection whose attribute name is in
`config.targets` (HF names: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
`down_proj`) by a `LoRAProjection` that keeps the original module as `base` and adds
`scale * (x @ a) @ b` with `b` initialised to zero, so the wrapped model starts out identical.

Adapter weights are `nnx.LoRAParam` (a subclass of `nnx.Param`), so `trainable_filter(True)` gives
the filter to hand to `nnx.Optimizer(..., wrt=...)` / `nnx.grad(..., argnums=nnx.DiffState(0, ...))`:
base weights get no optimizer state and are never updated. `lora_mask(state)` is the same as an
optax mask for code that works on plain parameter pytrees.

`merge_lora(model)` folds `scale * a @ b` into each base kernel and puts the base module back, giving
a plain model to export (HF safetensors) or to serve.

Kernels: the wrapped module must have a `kernel` parameter whose leading `in_axes` axes contract with
the trailing axes of the input (nnx.Linear: kernel [in, out]; einsum projections such as
[embed, heads, head_dim] with in_axes=1, or [heads, head_dim, embed] with in_axes=2). The adapter is
a [in..., rank] and b [rank, out...].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA hyper-parameters.

  rank: adapter rank r; alpha: scale numerator (the update is alpha / r * x a b);
  targets: attribute names of the projections to adapt (matched against the last path element,
  or a '/'-joined path suffix such as 'attn/qkv');
  in_axes: per-target override of how many leading kernel axes are input axes (default 1).
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  in_axes: tuple[tuple[str, int], ...] = ()

  @classmethod
  def from_dict(cls, d: Any) -> "LoRAConfig":
    """From a ConfigDict / mapping with keys rank, alpha, targets (, in_axes)."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"config.lora: unknown field(s) {sorted(unknown)}; known: rank, alpha, targets, in_axes.")
    if "targets" in d:
      d["targets"] = tuple(d["targets"])
    if "in_axes" in d:
      d["in_axes"] = tuple((str(k), int(v)) for k, v in dict(d["in_axes"]).items())
    return cls(**d)


def _axis_names(var: nnx.Variable) -> tuple[Any, ...] | None:
  """The logical axis names (`out_sharding` metadata) of a Variable, or None."""
  meta = var.get_metadata()
  names = meta.get("out_sharding") if isinstance(meta, dict) else None
  return tuple(names) if names else None


class LoRAProjection(nnx.Module):
  """`base(x) + alpha / rank * (x a) b` for a projection with a `kernel` of shape [in..., out...].

  x: [..., in...] -> [..., out...] (the base module's own output; bias, if any, stays in the base).
  """

  def __init__(self, base: nnx.Module, rank: int, alpha: float, *, in_axes: int = 1, rngs: nnx.Rngs):
    kernel = getattr(base, "kernel", None)
    if not isinstance(kernel, nnx.Variable):
      raise TypeError(f"LoRA: cannot adapt {type(base).__name__}: it has no `kernel` parameter.")
    shape = kernel.shape
    if not 1 <= in_axes < len(shape):
      raise ValueError(f"LoRA: in_axes={in_axes} does not fit kernel shape {shape} of {type(base).__name__}.")
    self.base = base
    self.rank = rank
    self.scale = float(alpha) / rank
    self.in_axes = in_axes
    in_shape, out_shape = shape[:in_axes], shape[in_axes:]
    fan_in = math.prod(in_shape)
    names = _axis_names(kernel)
    a_meta = {"out_sharding": (*names[:in_axes], "lora_rank")} if names else {}
    b_meta = {"out_sharding": ("lora_rank", *names[in_axes:])} if names else {}
    if names and jax.sharding.get_abstract_mesh().empty:
      # No mesh in context (unsharded use): keep the axis names as metadata only.
      a_meta["eager_sharding"] = b_meta["eager_sharding"] = False
    dtype = kernel.dtype
    # Kaiming-uniform a (as the LoRA paper / PEFT), zero b: the initial update is exactly zero.
    bound = 1.0 / math.sqrt(fan_in)
    self.lora_a = nnx.LoRAParam(
        jax.random.uniform(rngs.params(), (*in_shape, rank), dtype, -bound, bound), **a_meta)
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, *out_shape), dtype), **b_meta)

  def delta_kernel(self) -> jax.Array:
    """scale * a @ b reshaped to the base kernel's shape [in..., out...]."""
    a = self.lora_a[...]
    b = self.lora_b[...]
    return self.scale * jnp.tensordot(a, b, axes=1)

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    out = self.base(x, *args, **kwargs)
    a = self.lora_a[...].astype(x.dtype)
    b = self.lora_b[...].astype(x.dtype)
    n = self.in_axes
    h = jnp.tensordot(x, a, axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
    return out + (self.scale * jnp.tensordot(h, b, axes=1)).astype(out.dtype)


def _matches(path: Sequence[Any], targets: Sequence[str]) -> str | None:
  """The target pattern a module path matches (last name or '/'-joined suffix), else None."""
  names = [str(p) for p in path]
  for target in targets:
    parts = target.split("/")
    if len(names) >= len(parts) and names[-len(parts):] == parts:
      return target
  return None


def _get_child(parent: Any, key: Any) -> Any:
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set_child(parent: Any, key: Any, value: Any) -> None:
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
  """Wraps every target projection of `model` in place; returns the '/'-joined paths wrapped.

  Raises ValueError naming `config.lora.targets` when nothing matched (a typo would otherwise
  silently train nothing).
  """
  in_axes = dict(config.in_axes)
  found = []
  for path, module in list(nnx.iter_modules(model)):
    if not path or isinstance(module, LoRAProjection) or any(p == "base" for p in path):
      continue
    target = _matches(path, config.targets)
    if target is None:
      continue
    found.append((path, module, target))
  if not found:
    raise ValueError(
        f"config.lora.targets={list(config.targets)} matched no module of {type(model).__name__}; "
        "use the projections' attribute names (e.g. q_proj, up_proj).")
  wrapped = []
  for path, module, target in found:
    parent = model
    for key in path[:-1]:
      parent = _get_child(parent, key)
    _set_child(parent, path[-1], LoRAProjection(
        module, config.rank, config.alpha, in_axes=in_axes.get(target, in_axes.get(str(path[-1]), 1)),
        rngs=rngs))
    wrapped.append("/".join(map(str, path)))
  return wrapped


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel and unwraps it, in place; returns `model`."""
  for path, module in list(nnx.iter_modules(model)):
    if not isinstance(module, LoRAProjection):
      continue
    base = module.base
    kernel = base.kernel
    kernel[...] = (kernel[...] + module.delta_kernel()).astype(kernel.dtype)
    parent = model
    for key in path[:-1]:
      parent = _get_child(parent, key)
    _set_child(parent, path[-1], base)
  return model


def trainable_filter(lora_enabled: bool) -> Any:
  """The nnx filter of trainable parameters: only adapters with LoRA, every Param without."""
  return nnx.LoRAParam if lora_enabled else nnx.Param


def lora_mask(state: Any) -> Any:
  """optax mask over an `nnx.State` / pytree of Variables: True at LoRA parameters only.

  Use as `optax.masked(tx, lora_mask(params))` when the optimizer is built on a plain state.
  """
  return jax.tree.map(lambda v: isinstance(v, nnx.LoRAParam), state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
