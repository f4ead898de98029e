"""Building blocks shared by the vision tower and the decoder: dense layers with logical axes,
RMSNorm / LayerNorm with HF numerics, SwiGLU and GELU MLPs, masked dot-product attention.

Projections are plain `nnx.Linear` (kernel `[in, out]`, the transpose of HF's `weight`), so LoRA
and checkpoint code can treat every projection alike. `fused_dense` runs several projections of one
input (q/k/v, gate/up) as a single matmul over their concatenated kernels, and `as_rows` runs them on
the tokens as one `[N, E]` matrix: fewer, larger, 2-D matmuls, which XLA's CPU backend runs (forward and
gradients) much closer to its matmul peak than the same work on `[B, T, E]`. `decode_attention`
attends one new token per row over a KV cache in the cache's own layout: on a CPU the decode step is
dominated by the number of small kernels it launches, not by arithmetic.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afmrl_jax.models.sharding import linear_metadata, param

INIT_STD = 0.02  # HF `initializer_range`


def dense(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, bias: bool,
          dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """nnx.Linear whose kernel carries logical `axes` (and its bias `axes[1]`)."""
  return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(INIT_STD),
                    kernel_metadata=linear_metadata(*axes), bias_metadata=linear_metadata(axes[1]),
                    rngs=rngs)


class RMSNorm(nnx.Module):
  """`scale * x / rms(x)`, normalised in float32 and cast back before the scale (as HF)."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.scale = param(jnp.ones((dim,), param_dtype), 'norm')
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...] * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
  """Standard LayerNorm with scale and bias (Qwen2-VL vision tower), statistics in float32."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.scale = param(jnp.ones((dim,), param_dtype), 'norm')
    self.bias = param(jnp.zeros((dim,), param_dtype), 'norm')
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def activation(name: str):
  """HF `ACT2FN` names used by these models."""
  if name == 'silu':
    return jax.nn.silu
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name in ('gelu', 'gelu_exact'):
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ('gelu_pytorch_tanh', 'gelu_new'):
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f'models.layers: unsupported activation {name!r}')


def can_fuse(*projections: nnx.Module) -> bool:
  """Whether `fused_dense` may compute these projections as one matmul.

  Only plain `nnx.Linear`s with the same dtype, precision and bias use (a LoRA-adapted projection
  adds its own low-rank term), and not under a mesh with a `tensor` axis: concatenating
  tensor-parallel kernels would re-shard them.
  """
  first = projections[0]
  key = lambda p: (p.dtype, p.precision, p.use_bias, p.dot_general, p.preferred_element_type)
  if any(type(p) is not nnx.Linear or key(p) != key(first) for p in projections):
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.shape.get('tensor', 1) == 1


def as_rows(fn, x: jax.Array):
  """`fn` applied to `x [..., E]` as one `[N, E]` matrix; every output reshaped back to `[..., F]`."""
  lead = x.shape[:-1]
  out = fn(x.reshape(-1, x.shape[-1]))
  back = lambda y: y.reshape(lead + y.shape[1:])
  return [back(y) for y in out] if isinstance(out, (list, tuple)) else back(out)


def project(x: jax.Array, projections, *, fused: bool = False) -> list[jax.Array]:
  """`[p(x) for p in projections]` on `x [..., E]` as `[N, E]` rows; with `fused`, one matmul when
  `can_fuse` allows (inference: fewer kernels per decode step; training keeps separate matmuls, which
  run as fast there and keep a zero-initialised LoRA model bitwise equal to its base)."""
  if fused and can_fuse(*projections):
    return as_rows(lambda rows: fused_dense(rows, projections), x)
  return as_rows(lambda rows: [p(rows) for p in projections], x)


def fused_dense(x: jax.Array, projections) -> list[jax.Array]:
  """`[p(x) for p in projections]` as one matmul over the kernels concatenated along `out`.

  x `[..., in]` -> list of `[..., out_i]`. The parameters keep their own names and layout (HF
  import/export, LoRA); the concatenation is loop-invariant inside a decode loop, where XLA hoists
  it out. Same promotion and dot as `nnx.Linear.__call__` (check `can_fuse` first).
  """
  first = projections[0]
  kernel = jnp.concatenate([p.kernel[...] for p in projections], axis=1)
  bias = jnp.concatenate([p.bias[...] for p in projections]) if first.use_bias else None
  x, kernel, bias = first.promote_dtype((x, kernel, bias), dtype=first.dtype)
  kw = {} if first.preferred_element_type is None else {'preferred_element_type': first.preferred_element_type}
  y = first.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=first.precision, **kw)
  if bias is not None:
    y = y + bias
  sizes = [p.kernel.shape[1] for p in projections]
  return jnp.split(y, list(np.cumsum(sizes)[:-1]), axis=-1)


class GatedMLP(nnx.Module):
  """SwiGLU: `down(act(gate(x)) * up(x))` (HF Qwen2MLP / LlamaMLP / Qwen2.5-VL vision MLP)."""

  def __init__(self, dim: int, hidden: int, act: str, *, bias: bool, axes=('embed', 'mlp'),
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = dense(dim, hidden, axes, **kw)
    self.up_proj = dense(dim, hidden, axes, **kw)
    self.down_proj = dense(hidden, dim, axes[::-1], **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array, *, fused: bool = False) -> jax.Array:
    """x `[..., dim]` -> `[..., dim]` on `[N, dim]` rows; `fused`: gate and up as one matmul (`project`)."""
    def rows(r):
      gate, up = project(r, (self.gate_proj, self.up_proj), fused=fused)
      return self.down_proj(self.act(gate) * up)
    return as_rows(rows, x)


class PlainMLP(nnx.Module):
  """`fc2(act(fc1(x)))` (Qwen2-VL vision block)."""

  def __init__(self, dim: int, hidden: int, act: str, *, axes=('vision_embed', 'vision_mlp'),
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = dense(dim, hidden, axes, **kw)
    self.fc2 = dense(hidden, dim, axes[::-1], **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return as_rows(lambda rows: self.fc2(self.act(self.fc1(rows))), x)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None,
              scale: float) -> jax.Array:
  """Grouped-query dot-product attention.

  Args:
    q: `[B, S, H, D]` queries; k, v: `[B, L, KVH, D]` with `H % KVH == 0`.
    allowed: bool, broadcastable to `[B, S, L]` (True = may attend); None = everything.
  Returns:
    `[B, S, H, D]`. Rows with nothing allowed (padding queries) average over all keys instead of
    producing NaN; callers ignore them.
  """
  b, s, h, d = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, s, kvh, h // kvh, d)
  logits = jnp.einsum('bskgd,blkd->bkgsl', qg, k, preferred_element_type=jnp.float32) * scale
  if allowed is not None:
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgsl,blkd->bskgd', probs, v)
  return out.reshape(b, s, h, d)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                     scale: float) -> jax.Array:
  """`attention` for one query per row over a cache, in the cache's own `[B, L, KVH, D]` layout.

  The dot-general form makes XLA transpose the whole cache of every layer at every decode step;
  broadcast-multiply-and-reduce reads it in place (one pass for the logits, one for the output).
  Math in float32.

  Args:
    q: `[B, 1, H, D]`; k, v: `[B, L, KVH, D]`; allowed: bool `[B, 1, L]` (True = may attend).
  Returns:
    `[B, 1, H, D]` in q's dtype.
  """
  b, s, h, d = q.shape
  if s != 1:
    raise ValueError(f'models.layers.decode_attention: one query per row, got q of shape {q.shape}')
  kvh = k.shape[2]
  qg = q.reshape(b, 1, kvh, h // kvh, d).astype(jnp.float32)
  logits = jnp.sum(qg * k[:, :, :, None, :].astype(jnp.float32), axis=-1) * scale  # [B, L, KVH, G]
  logits = jnp.where(allowed[:, 0, :, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=1)
  out = jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)  # [B, KVH, G, D]
  return out.reshape(b, 1, h, d).astype(q.dtype)
