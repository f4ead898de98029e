"""Rotary position embeddings: 1-D RoPE, multimodal M-RoPE and the vision tower's 2-D RoPE.

Conventions follow HF transformers (`rotate_half` layout: the two halves of a head are the real and
imaginary parts). M-RoPE splits the `head_dim / 2` frequencies into `mrope_section = (t, h, w)`
chunks; chunk i rotates by position axis `i % 3` of the `[3, B, T]` position ids.

`get_rope_index` computes those `[3, B, T]` ids from token ids, padding mask and the (static) image
grid exactly as HF `Qwen2VLModel.get_rope_index` does, but vectorised so it runs under `jax.jit`:
padding gets position 0, text tokens count up, an image of `(t, h, w)` merged cells gets
`start + (t_idx, h_idx, w_idx)` and advances the counter by `max(h, w)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(dim: int, theta: float) -> np.ndarray:
  """`1 / theta^(2i/dim)` for i < dim/2, float32 `[dim // 2]`."""
  return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x [..., S, H, D]` by `cos/sin [..., S, D]` (broadcast over heads), math in float32."""
  cos = cos[..., None, :].astype(jnp.float32)
  sin = sin[..., None, :].astype(jnp.float32)
  xf = x.astype(jnp.float32)
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def text_cos_sin(position_ids: jax.Array, head_dim: int, theta: float,
                 mrope_section: tuple[int, ...] | None = None) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables `[B, T, head_dim]` for decoder positions.

  Args:
    position_ids: `[B, T]` (1-D RoPE, or the same position on all three M-RoPE axes) or `[3, B, T]`
      (temporal, height, width positions for M-RoPE).
    mrope_section: `(t, h, w)` frequency counts summing to `head_dim // 2`; None for plain RoPE.
  """
  inv = jnp.asarray(inv_frequencies(head_dim, theta))
  pos = position_ids.astype(jnp.float32)
  if mrope_section is None:
    if pos.ndim == 3:  # M-RoPE ids given to a 1-D model: all rows agree for text; take the first.
      pos = pos[0]
    freqs = pos[..., None] * inv  # [B, T, D/2]
  else:
    if sum(mrope_section) != head_dim // 2:
      raise ValueError(f'rope: mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}')
    if pos.ndim == 2:
      pos = jnp.broadcast_to(pos[None], (3,) + pos.shape)
    # axis_of[f] = which of the (t, h, w) position rows drives frequency f.
    axis_of = np.concatenate([np.full(s, i % 3) for i, s in enumerate(mrope_section)])
    onehot = jnp.asarray(np.eye(3, dtype=np.float32)[axis_of].T)  # [3, D/2]
    freqs = jnp.einsum('abt,af->btf', pos, onehot) * inv  # exact: one nonzero term per f
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def vision_positions(grid_thw: tuple[int, int, int], merge: int) -> np.ndarray:
  """`[t*h*w, 2]` (row, col) patch positions in the merge-block-major order HF feeds the tower."""
  t, h, w = grid_thw
  hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  block = (h // merge, merge, w // merge, merge)
  hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
  wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
  return np.tile(np.stack([hpos, wpos], axis=-1), (t, 1))


def vision_cos_sin(grid_thw: tuple[int, int, int], head_dim: int, theta: float,
                   merge: int) -> tuple[np.ndarray, np.ndarray]:
  """2-D rotary tables `[t*h*w, head_dim]`: half the frequencies follow the row, half the column."""
  inv = inv_frequencies(head_dim // 2, theta)  # [head_dim / 4]
  pos = vision_positions(grid_thw, merge).astype(np.float32)
  freqs = np.concatenate([pos[:, :1] * inv, pos[:, 1:] * inv], axis=-1)  # [P, head_dim / 2]
  emb = np.concatenate([freqs, freqs], axis=-1)
  return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def get_rope_index(input_ids: jax.Array, attention_mask: jax.Array | None,
                   image_grid_thw: tuple[int, int, int] | None, *, image_token_id: int,
                   spatial_merge_size: int) -> tuple[jax.Array, jax.Array]:
  """M-RoPE position ids and deltas, as HF `get_rope_index` (images only; one grid for all).

  Args:
    input_ids: `[B, T]` int; each run of `image_token_id` is one image of `image_grid_thw`
      (in patches, before merging).
    attention_mask: `[B, T]` 1 for real tokens, 0 for padding (left, right or both); None = all real.
    image_grid_thw: static `(t, h, w)` patch grid of every image, or None for text only.
  Returns:
    position_ids `[3, B, T]` int32 (padding at 0) and rope_deltas `[B, 1]` int32 with
    `max(position) + 1 - num_real_tokens`: the next token's position is `num_real + delta`.
  """
  ids = jnp.asarray(input_ids)
  b, t = ids.shape
  mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
  # Compress each row to its real tokens (stable order), as HF does with `ids[mask.bool()]`.
  order = jnp.argsort(1 - mask, axis=1, stable=True)
  real = jnp.take_along_axis(mask, order, axis=1).astype(bool)
  n_real = mask.sum(axis=1)
  r = jnp.arange(t, dtype=jnp.int32)[None, :]
  if image_grid_thw is None:
    pos = jnp.broadcast_to(r, (b, t))
    pos3 = jnp.stack([pos, pos, pos])
  else:
    gt, gh, gw = image_grid_thw
    lh, lw = gh // spatial_merge_size, gw // spatial_merge_size
    per_image = gt * lh * lw
    advance = max(gh, gw) // spatial_merge_size  # HF's advance, even for odd grids
    is_img = (jnp.take_along_axis(ids, order, axis=1) == image_token_id) & real
    prev = jnp.pad(is_img[:, :-1], ((0, 0), (1, 0)))
    starts = is_img & ~prev
    n_started = jnp.cumsum(starts, axis=1)  # images begun at or before each token
    run_start = jax.lax.cummax(jnp.where(starts, r, -1), axis=1)
    # Every earlier image consumed `per_image` slots but only `advance` positions.
    text_pos = r - n_started * (per_image - advance)
    j = r - run_start  # index inside the current image
    img_start = run_start - (n_started - 1) * (per_image - advance)
    img_t = img_start + j // (lh * lw)
    img_h = img_start + (j // lw) % lh
    img_w = img_start + j % lw
    pos3 = jnp.stack([jnp.where(is_img, img_t, text_pos),
                      jnp.where(is_img, img_h, text_pos),
                      jnp.where(is_img, img_w, text_pos)])
  pos3 = jnp.where(real[None], pos3, 0).astype(jnp.int32)
  deltas = (pos3.max(axis=(0, 2)) + 1 - n_real).astype(jnp.int32)
  # Scatter back from the compressed order to the original token order.
  inverse = jnp.argsort(order, axis=1)
  pos3 = jnp.take_along_axis(pos3, jnp.broadcast_to(inverse[None], pos3.shape), axis=2)
  return pos3, deltas[:, None]
