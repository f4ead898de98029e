"""The whole model: vision tower + text decoder + LM head (HF `Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`, and text-only `LlamaForCausalLM` / `Qwen2ForCausalLM` when
`config.vision is None`).

Image features replace the embeddings at `<|image_pad|>` positions, in order: row b's k-th image
token gets the k-th merged token of row b's image. Each row must hold exactly
`t*h*w / merge^2` image tokens when `pixel_values` is given (one image per row, as HF requires).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from afmrl_jax.models import rope
from afmrl_jax.models.config import VLConfig
from afmrl_jax.models.decoder import KVCache, TextDecoder, init_cache
from afmrl_jax.models.layers import dense
from afmrl_jax.models.vision import VisionTower


class VLModel(nnx.Module):
  """See module docstring; `__call__` returns final-normed hidden states, `logits` the LM head."""

  def __init__(self, config: VLConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.visual = VisionTower(config.vision, remat=config.remat, **kw) if config.vision else None
    self.language_model = TextDecoder(config.text, remat=config.remat, **kw)
    t = config.text
    self.lm_head = None if t.tie_word_embeddings else dense(
        t.hidden_size, t.vocab_size, ('embed', 'vocab'), bias=False, **kw)

  # ------------------------------------------------------------------ helpers
  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """Empty KV cache with `max_len` slots (prompt incl. padding + new tokens)."""
    return init_cache(self.config.text, batch, max_len, dtype or jnp.dtype(self.config.dtype))

  def rope_index(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 image_grid_thw: tuple[int, int, int] | None = None) -> tuple[jax.Array, jax.Array]:
    """(`[3, B, T]` position ids, `[B, 1]` rope_deltas) as HF `get_rope_index`."""
    merge = self.config.vision.spatial_merge_size if self.config.vision is not None else 1
    return rope.get_rope_index(input_ids, attention_mask, image_grid_thw,
                               image_token_id=self.config.image_token_id, spatial_merge_size=merge)

  def image_features(self, pixel_values: jax.Array, image_grid_thw) -> jax.Array:
    """`[B, P, Dp]` patches -> `[B, N, E]` merged image tokens."""
    if self.visual is None:
      raise ValueError('VLModel: pixel_values given but config.vision is None (text-only model)')
    return self.visual(pixel_values, tuple(int(g) for g in image_grid_thw))

  def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                   image_grid_thw=None) -> jax.Array:
    """Token embeddings `[B, T, E]` with image features spliced in at image-token positions."""
    x = self.language_model.embed(input_ids)
    if pixel_values is None:
      return x
    if image_grid_thw is None:
      raise ValueError('VLModel: pixel_values given without image_grid_thw')
    feats = self.image_features(pixel_values, image_grid_thw).astype(x.dtype)
    is_img = input_ids == self.config.image_token_id
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, feats.shape[1] - 1)
    gathered = jnp.take_along_axis(feats, idx[..., None], axis=1)
    return jnp.where(is_img[..., None], gathered, x)

  # ------------------------------------------------------------------ forward
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None, image_grid_thw=None, *,
               position_ids: jax.Array | None = None, cache: KVCache | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """Forward pass.

    Args:
      input_ids: `[B, T]` int32.
      attention_mask: `[B, T]` 1 = real, 0 = padding (left or right); None = all real.
      pixel_values: `[B, P, Dp]` one image per row, or None.
      image_grid_thw: static `(t, h, w)` patch grid shared by all images (Python ints).
      position_ids: override the rotary positions, `[3, B, T]` or `[B, T]` absolute positions.
        Default: HF's `get_rope_index` on these tokens (padding ignored, image grid applied),
        offset by `cache.next_position` when a cache is given, so prefill and decode need no
        position bookkeeping by the caller (the M-RoPE `rope_deltas` live in the cache).
      cache: None, or a KVCache from `init_cache` (prefill: fresh cache with the whole prompt;
        decode: the returned cache with the next token(s)).
    Returns:
      (hidden `[B, T, E]` after the final norm, updated cache or None).
    """
    x = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
    if position_ids is None:
      grid = image_grid_thw if pixel_values is not None else None
      position_ids, _ = self.rope_index(input_ids, attention_mask, grid)
      if cache is not None:
        position_ids = position_ids + cache.next_position[None, :, None]
      if self.config.text.mrope_section is None:
        position_ids = position_ids[0]
    return self.language_model(x, attention_mask, position_ids, cache)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[..., E]` hidden -> `[..., vocab]` float32 logits (tied: embedding transpose)."""
    if self.lm_head is None:
      w = self.language_model.embed_tokens[...].astype(hidden.dtype)
      out = jnp.einsum('...e,ve->...v', hidden, w)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)
