"""Output heads of `VLModel`: the retrieval embedding (VLM2Vec style) and LM logits."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from afmrl_jax.models.vl_model import VLModel
from afmrl_jax.vectors import l2_normalize


def last_token_index(attention_mask: jax.Array) -> jax.Array:
  """`[B]` index of each row's last real token (right padding: `len - 1`; left padding: `T - 1`)."""
  mask = attention_mask.astype(bool)
  t = mask.shape[1]
  return (t - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


def last_token_pool(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
  """`[B, T, E]` -> `[B, E]` hidden state at the last real token."""
  if attention_mask is None:
    return hidden[:, -1]
  idx = last_token_index(attention_mask)
  return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def embed(model: VLModel, batch_side: Mapping[str, jax.Array], image_grid_thw=None) -> jax.Array:
  """L2-normalised last-real-token hidden state `[B, E]` (float32).

  Args:
    batch_side: `input_ids [B,T]`, `attention_mask [B,T]` (left or right padding), optional
      `pixel_values [B,P,Dp]`; the grid comes from `image_grid_thw` or `batch_side['image_grid_thw']`.
  """
  grid = image_grid_thw if image_grid_thw is not None else batch_side.get('image_grid_thw')
  mask = batch_side.get('attention_mask')
  hidden, _ = model(batch_side['input_ids'], mask, batch_side.get('pixel_values'), grid)
  return l2_normalize(last_token_pool(hidden, mask))


def logits(model: VLModel, hidden: jax.Array) -> jax.Array:
  """`[..., E]` -> `[..., vocab]` float32 next-token logits."""
  return model.logits(hidden)
