"""LoRA adapters for NNX module trees: wrap projections, train only the adapters, merge for export.

`apply_lora(model, config, rngs)` adapts every projection whose attribute name is in
`config.targets` (HF names: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
`down_proj`): the module gains `lora_a`, `lora_b` and computes `base(x) + scale * (x @ a) @ b`, with
`b` initialised to zero so the adapted model starts out identical. The base parameters keep their
paths (see `LoRAProjection`), so HF import/export (`models.hf_checkpoint`) works on LoRA models.

Adapter weights are `nnx.LoRAParam` (a subclass of `nnx.Param`), so `trainable_filter(True)` gives
the filter to hand to `nnx.Optimizer(..., wrt=...)` / `nnx.grad(..., argnums=nnx.DiffState(0, ...))`:
base weights get no optimizer state and are never updated. `lora_mask(state)` is the same as an
optax mask for code that works on plain parameter pytrees.

`merge_lora(model)` folds `scale * a @ b` into each base kernel and removes the adapters, giving a
plain model to export (HF safetensors) or to serve.

Kernels: the adapted module must have a `kernel` parameter whose leading `in_axes` axes contract with
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

from afmrl_jax.fields import check, positive

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA hyper-parameters.

  rank: adapter rank r; alpha: scale numerator (the update is alpha / r * x a b);
  targets: attribute names of the projections to adapt (matched against the last path element,
  or a '/'-joined path suffix such as 'attn/qkv');
  in_axes: per-target override of how many leading kernel axes are input axes (default 1);
  scope: only modules under this '/'-joined path prefix (e.g. 'language_model' to leave the
  vision tower's MLPs alone); '' = the whole model.
  """
  rank: int = positive(8)
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  in_axes: tuple[tuple[str, int], ...] = ()
  scope: str = ""

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if isinstance(self.in_axes, dict):
      object.__setattr__(self, "in_axes", tuple((str(k), int(v)) for k, v in self.in_axes.items()))
    empty = [("targets", "is empty; name the projections to adapt (e.g. q_proj, v_proj)")] if not self.targets else []
    check(self, empty)

  @classmethod
  def from_dict(cls, d: Any) -> "LoRAConfig":
    """From a ConfigDict / mapping with keys rank, alpha, targets (, in_axes: {target: n}, scope)."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"config.lora: unknown field(s) {sorted(unknown)}; known: rank, alpha, targets, in_axes, scope.")
    return cls(**d)


def _axis_names(var: nnx.Variable) -> tuple[Any, ...] | None:
  """The logical axis names (`out_sharding` metadata) of a Variable, or None."""
  meta = var.get_metadata()
  names = meta.get("out_sharding") if isinstance(meta, dict) else None
  return tuple(names) if names else None


class LoRAProjection(nnx.Module):
  """Mixin for a projection with a `kernel` [in..., out...]: `base(x) + alpha / rank * (x a) b`.

  `apply_lora` does not wrap the projection in a new module: it turns the projection *itself* into
  a `LoRA<Class>` (a subclass of its own class with this mixin) and adds `lora_a`, `lora_b`. So the
  base parameters keep their paths (`...q_proj.kernel`), and HF import/export and checkpoints of the
  base model keep working on a LoRA model; `merge_lora` turns the class back.

  x: [..., in...] -> [..., out...] (bias, if any, stays in the base).
  """
  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    out = super().__call__(x, *args, **kwargs)
    a = self.lora_a[...].astype(x.dtype)
    b = self.lora_b[...].astype(x.dtype)
    n = self.lora_in_axes
    h = jnp.tensordot(x, a, axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
    return out + (self.lora_scale * jnp.tensordot(h, b, axes=1)).astype(out.dtype)

  def delta_kernel(self) -> jax.Array:
    """scale * a @ b in the base kernel's shape [in..., out...]."""
    return self.lora_scale * jnp.tensordot(self.lora_a[...], self.lora_b[...], axes=1)


_LORA_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
  """The (cached, so jit caches hit) `LoRA<cls>` subclass of `cls`."""
  if cls not in _LORA_CLASSES:
    _LORA_CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRAProjection, cls), {"_lora_base_class": cls})
  return _LORA_CLASSES[cls]


def add_adapter(module: nnx.Module, rank: int, alpha: float, *, in_axes: int = 1, rngs: nnx.Rngs) -> nnx.Module:
  """Turns one projection into its LoRA version in place (see `LoRAProjection`); returns it."""
  kernel = getattr(module, "kernel", None)
  if not isinstance(kernel, nnx.Variable):
    raise TypeError(f"LoRA: cannot adapt {type(module).__name__}: it has no `kernel` parameter.")
  shape = kernel.shape
  if not 1 <= in_axes < len(shape):
    raise ValueError(f"LoRA: in_axes={in_axes} does not fit kernel shape {shape} of {type(module).__name__}.")
  in_shape, out_shape = shape[:in_axes], shape[in_axes:]
  names = _axis_names(kernel)
  a_meta = {"out_sharding": (*names[:in_axes], "lora_rank")} if names else {}
  b_meta = {"out_sharding": ("lora_rank", *names[in_axes:])} if names else {}
  if names:
    # As the base kernels (models.sharding.param): logical names as metadata only, placed by
    # `sharding.shard_model` / `create_sharded`, so adapters can be added with or without a mesh.
    a_meta["eager_sharding"] = b_meta["eager_sharding"] = False
  dtype = kernel.dtype
  # Kaiming-uniform a (as the LoRA paper / PEFT), zero b: the initial update is exactly zero.
  bound = 1.0 / math.sqrt(math.prod(in_shape))
  module.__class__ = _lora_class(type(module))
  module.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (*in_shape, rank), dtype, -bound, bound), **a_meta)
  module.lora_b = nnx.LoRAParam(jnp.zeros((rank, *out_shape), dtype), **b_meta)
  module.lora_scale = float(alpha) / rank
  module.lora_in_axes = in_axes
  return module


def _matches(path: Sequence[Any], targets: Sequence[str]) -> str | None:
  """The target pattern a module path matches (last name or '/'-joined suffix), else None."""
  names = [str(p) for p in path]
  for target in targets:
    parts = target.split("/")
    if len(names) >= len(parts) and names[-len(parts):] == parts:
      return target
  return None


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
  """Adapts every target projection of `model` in place; returns the '/'-joined paths adapted.

  Raises ValueError naming `config.lora.targets` when nothing matched (a typo would otherwise
  silently train nothing).
  """
  in_axes = dict(config.in_axes)
  scope = [p for p in config.scope.split("/") if p]
  found = []
  for path, module in list(nnx.iter_modules(model)):
    if not path or isinstance(module, LoRAProjection) or [str(p) for p in path[:len(scope)]] != scope:
      continue
    target = _matches(path, config.targets)
    if target is not None:
      found.append((path, module, target))
  if not found:
    raise ValueError(
        f"config.lora.targets={list(config.targets)} matched no module of {type(model).__name__} "
        f"under scope {config.scope!r}; "
        "use the projections' attribute names (e.g. q_proj, up_proj).")
  for path, module, target in found:
    add_adapter(module, config.rank, config.alpha,
                in_axes=in_axes.get(target, in_axes.get(str(path[-1]), 1)), rngs=rngs)
  return ["/".join(map(str, path)) for path, _, _ in found]


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel and restores the projection's class, in place.

  Returns `model`, now without LoRA parameters (ready for HF export or serving).
  """
  for _, module in list(nnx.iter_modules(model)):
    if not isinstance(module, LoRAProjection):
      continue
    kernel = module.kernel
    kernel[...] = (kernel[...] + module.delta_kernel()).astype(kernel.dtype)
    for name in ("lora_a", "lora_b", "lora_scale", "lora_in_axes"):
      delattr(module, name)
    module.__class__ = module._lora_base_class
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
