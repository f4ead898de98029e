"""Building blocks shared by the vision tower and the decoder: dense layers with logical axes,
RMSNorm / LayerNorm with HF numerics, SwiGLU and GELU MLPs, masked dot-product attention.

Projections are plain `nnx.Linear` (kernel `[in, out]`, the transpose of HF's `weight`), so LoRA
and checkpoint code can treat every projection alike.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
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


class GatedMLP(nnx.Module):
  """SwiGLU: `down(act(gate(x)) * up(x))` (HF Qwen2MLP / LlamaMLP / Qwen2.5-VL vision MLP)."""

  def __init__(self, dim: int, hidden: int, act: str, *, bias: bool, axes=('embed', 'mlp'),
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = dense(dim, hidden, axes, **kw)
    self.up_proj = dense(dim, hidden, axes, **kw)
    self.down_proj = dense(hidden, dim, axes[::-1], **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nnx.Module):
  """`fc2(act(fc1(x)))` (Qwen2-VL vision block)."""

  def __init__(self, dim: int, hidden: int, act: str, *, axes=('vision_embed', 'vision_mlp'),
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = dense(dim, hidden, axes, **kw)
    self.fc2 = dense(hidden, dim, axes[::-1], **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


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
