"""Vision tower of Qwen2-VL and Qwen2.5-VL.

Input: `pixel_values [B, P, C*Tp*14*14]`, each row one flattened (channel, temporal, 14, 14) patch,
`P = t*h*w` patches per image in HF's merge-block-major order (every `merge x merge` block of
neighbouring patches is contiguous). All images of a batch share one static grid `(t, h, w)`,
so the attention masks, the 2-D rotary table and Qwen2.5-VL's window permutation are NumPy
constants computed at trace time.

* Qwen2-VL block: LayerNorm, attention, LayerNorm, `fc2(quick_gelu(fc1(x)))`; attention within
  each frame.
* Qwen2.5-VL block: RMSNorm, SwiGLU with bias; attention within windows of
  `window_size / patch / merge` merged cells, except blocks in `fullatt_block_indexes`. Tokens are
  permuted window-major before the blocks (and the merged outputs permuted back), as HF does.
* Patch merger: norm, concatenate each `merge x merge` block, MLP (GELU) to the text width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afmrl_jax.models import rope
from afmrl_jax.models.config import VisionConfig
from afmrl_jax.models.layers import (GatedMLP, LayerNorm, PlainMLP, RMSNorm, activation, as_rows, attention,
                                     dense)
from afmrl_jax.models.sharding import constrain


def window_index(grid_thw: tuple[int, int, int], merge: int, window_size: int,
                 patch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """HF `get_vision_window_index` for one grid.

  Returns (`[t*h*w / merge^2]` merged-cell permutation putting each window's cells together,
  `[num_windows + 1]` cumulative window lengths in patches, empty windows removed).
  """
  t, h, w = grid_thw
  win = window_size // merge // patch_size
  lh, lw = h // merge, w // merge
  index = np.arange(t * lh * lw).reshape(t, lh, lw)
  pad_h, pad_w = win - lh % win, win - lw % win
  nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
  padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
  padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
  seqlens = (padded != -100).sum((2, 3)).reshape(-1)
  flat = padded.reshape(-1)
  cu = np.concatenate([[0], np.cumsum(seqlens) * merge * merge])
  return flat[flat != -100], np.unique(cu)  # cu is non-decreasing, so unique == unique_consecutive


def segment_layout(segments: np.ndarray) -> int | np.ndarray | None:
  """How to restrict attention to `segments` (`[P]` ids, equal ids contiguous).

  Returns None (one segment: attend everywhere), an int L (equal contiguous segments of L tokens:
  attend inside `[P / L]` blocks, O(P * L) instead of O(P^2)), or a `[P, P]` bool mask (uneven).
  """
  bounds = np.flatnonzero(np.diff(segments)) + 1
  if bounds.size == 0:
    return None
  lengths = np.diff(np.concatenate([[0], bounds, [segments.size]]))
  if np.all(lengths == lengths[0]):
    return int(lengths[0])
  return segments[:, None] == segments[None, :]


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = dense(cfg.width, 3 * cfg.width, ('vision_embed', 'vision_mlp'), **kw)
    self.proj = dense(cfg.width, cfg.width, ('vision_mlp', 'vision_embed'), **kw)
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.width // cfg.num_heads

  def __call__(self, x, cos, sin, layout):
    """x `[B, P, W]`, cos/sin `[P, Dh]`, layout from `segment_layout` -> `[B, P, W]`."""
    b, p, w = x.shape
    qkv = as_rows(self.qkv, x).reshape(b, p, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    scale = self.head_dim ** -0.5
    if isinstance(layout, int):  # equal windows / frames: fold them into the batch
      fold = lambda a: a.reshape(b * (p // layout), layout, self.num_heads, self.head_dim)
      out = attention(fold(q), fold(k), fold(v), None, scale).reshape(b, p, self.num_heads, -1)
    else:
      out = attention(q, k, v, None if layout is None else jnp.asarray(layout)[None], scale)
    return as_rows(self.proj, out.reshape(b, p, w))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = LayerNorm if cfg.arch == 'qwen2_vl' else RMSNorm
    self.norm1 = norm(cfg.width, cfg.norm_eps, param_dtype=param_dtype)
    self.norm2 = norm(cfg.width, cfg.norm_eps, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if cfg.arch == 'qwen2_vl':
      self.mlp = PlainMLP(cfg.width, cfg.intermediate_size, cfg.hidden_act, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    else:
      self.mlp = GatedMLP(cfg.width, cfg.intermediate_size, cfg.hidden_act, bias=True,
                          axes=('vision_embed', 'vision_mlp'), dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

  def __call__(self, x, cos, sin, layout):
    x = x + self.attn(self.norm1(x), cos, sin, layout)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """`merge x merge` neighbouring patches -> one token of the text width."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = LayerNorm if cfg.arch == 'qwen2_vl' else RMSNorm
    self.ln_q = norm(cfg.width, 1e-6, param_dtype=param_dtype)
    merged = cfg.width * cfg.spatial_merge_size ** 2
    kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp_0 = dense(merged, merged, ('vision_embed', 'vision_mlp'), **kw)
    self.mlp_2 = dense(merged, cfg.out_hidden_size, ('vision_mlp', 'embed'), **kw)
    self.act = activation('gelu')
    self.unit = cfg.spatial_merge_size ** 2

  def __call__(self, x):
    b, p, w = x.shape
    x = self.ln_q(x).reshape(b, p // self.unit, self.unit * w)
    return as_rows(lambda rows: self.mlp_2(self.act(self.mlp_0(rows))), x)


class VisionTower(nnx.Module):
  """HF `model.visual`: patches `[B, P, Dp]` -> merged image tokens `[B, P / merge^2, out_hidden]`."""

  def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: bool = False, rngs: nnx.Rngs):
    if cfg.arch not in ('qwen2_vl', 'qwen2_5_vl'):
      raise ValueError(f'VisionConfig.arch {cfg.arch!r}: expected qwen2_vl or qwen2_5_vl')
    if cfg.width % cfg.num_heads:
      raise ValueError(f'VisionConfig: width {cfg.width} not divisible by num_heads {cfg.num_heads}')
    self.config = cfg
    self.dtype = dtype
    self.remat = remat
    self.patch_embed = dense(cfg.patch_dim, cfg.width, ('patch', 'vision_embed'), bias=False,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def num_tokens(self, grid_thw: tuple[int, int, int]) -> int:
    """Merged image tokens per image for this grid."""
    return int(np.prod(grid_thw)) // self.config.spatial_merge_size ** 2

  def __call__(self, pixel_values: jax.Array, grid_thw: tuple[int, int, int]) -> jax.Array:
    cfg = self.config
    t, h, w = (int(g) for g in grid_thw)
    m = cfg.spatial_merge_size
    b, p, dp = pixel_values.shape
    if p != t * h * w or dp != cfg.patch_dim or h % m or w % m:
      raise ValueError(f'vision: pixel_values {pixel_values.shape} do not match image_grid_thw '
                       f'{grid_thw} (need [B, t*h*w, {cfg.patch_dim}] with h, w multiples of {m})')
    x = as_rows(self.patch_embed, pixel_values.astype(self.dtype))
    cos, sin = rope.vision_cos_sin((t, h, w), cfg.width // cfg.num_heads, cfg.rope_theta, m)
    frames = np.arange(p) // (h * w)  # HF attends within each frame (cu_seqlens per frame)
    if cfg.arch == 'qwen2_vl':
      full_layout = window_layout = segment_layout(frames)
      perm = None
    else:
      cells, cu = window_index((t, h, w), m, cfg.window_size, cfg.patch_size)
      perm = (cells[:, None] * m * m + np.arange(m * m)[None]).reshape(-1)
      x = x[:, perm]
      cos, sin = cos[perm], sin[perm]
      full_layout = segment_layout(frames[perm])
      window_layout = segment_layout(np.repeat(np.arange(len(cu) - 1), np.diff(cu)))
    cos, sin = jnp.asarray(cos), jnp.asarray(sin)
    for i, block in enumerate(self.blocks):
      full = cfg.arch == 'qwen2_vl' or i in cfg.fullatt_block_indexes
      layout = full_layout if full else window_layout
      if self.remat:  # layout is static (int / NumPy constant): close over it
        x = nnx.remat(lambda blk, x, c, s, lay=layout: blk(x, c, s, lay))(block, x, cos, sin)
      else:
        x = block(x, cos, sin, layout)
      x = constrain(x, 'batch', None, None)
    merged = self.merger(x)
    if perm is not None:
      merged = merged[:, np.argsort(cells)]
    return merged
