"""KV-cache forward (prefill, then one token at a time) == full forward, for M-RoPE with an image
and padding, and for the plain-RoPE Llama variant."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from afmrl_jax.models.config import TextConfig, VisionConfig, VLConfig
from afmrl_jax.models.vl_model import VLModel

IMAGE = 100
TEXT = TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 1, 1),
                  rope_theta=10000.0)
VISION = VisionConfig(arch='qwen2_5_vl', depth=2, width=16, num_heads=2, intermediate_size=24,
                      out_hidden_size=32, hidden_act='silu', window_size=56, fullatt_block_indexes=(1,))
CONFIGS = {
    'qwen25vl': VLConfig(model_type='qwen2_5_vl', text=TEXT, vision=VISION, image_token_id=IMAGE),
    'llama': VLConfig(model_type='llama', vision=None, image_token_id=IMAGE,
                      text=dataclasses.replace(TEXT, mrope_section=None, qkv_bias=False,
                                               tie_word_embeddings=True)),
}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_prefill_then_decode_matches_full_forward(name):
  config = CONFIGS[name]
  model = VLModel(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  grid = (1, 4, 4) if config.vision else None
  n_img = 4 if config.vision else 0
  batch, prompt_len, new = 3, 12, 5
  ids = np.zeros((batch, prompt_len), np.int32)
  mask = np.zeros((batch, prompt_len), np.int32)
  for b, (a, pad) in enumerate([(6, 'none'), (1, 'left'), (3, 'right')]):
    body = list(rng.integers(3, 99, size=a)) + [IMAGE] * n_img + list(rng.integers(3, 99, size=2))
    if pad == 'none':
      body = list(rng.integers(3, 99, size=prompt_len - len(body))) + body
    sl = slice(prompt_len - len(body), None) if pad != 'right' else slice(0, len(body))
    ids[b, sl], mask[b, sl] = body, 1
  pixels = jnp.asarray(rng.standard_normal((batch, 16, 1176)).astype(np.float32)) if grid else None
  new_ids = rng.integers(3, 99, size=(batch, new)).astype(np.int32)

  @nnx.jit
  def prefill(model, ids, mask, pixels):
    hidden, cache = model(ids, mask, pixels, grid, cache=model.init_cache(batch, prompt_len + new))
    return model.logits(hidden), cache

  @nnx.jit
  def step(model, tok, cache):
    hidden, cache = model(tok, None, cache=cache)
    return model.logits(hidden)[:, -1], cache

  @nnx.jit
  def full(model, ids, mask, pixels):
    return model.logits(model(ids, mask, pixels, grid)[0])

  prefill_logits, cache = prefill(model, jnp.asarray(ids), jnp.asarray(mask), pixels)
  stepped = []
  for i in range(new):
    logit, cache = step(model, jnp.asarray(new_ids[:, i:i + 1]), cache)
    stepped.append(np.asarray(logit))
  # Reference: one full forward over prompt + new tokens (right-padded row 2 has a hole of
  # padding before its new tokens; both paths must skip it).
  all_ids = np.concatenate([ids, new_ids], axis=1)
  all_mask = np.concatenate([mask, np.ones_like(new_ids)], axis=1)
  want = np.asarray(full(model, jnp.asarray(all_ids), jnp.asarray(all_mask), pixels))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(prefill_logits)[real], want[:, :prompt_len][real], atol=1e-5)
  np.testing.assert_allclose(np.stack(stepped, 1), want[:, prompt_len:], atol=1e-5)
  assert int(cache.index) == prompt_len + new
  # next position = real tokens + rope_deltas (an image advances fewer positions than its tokens)
  _, deltas = model.rope_index(jnp.asarray(all_ids), jnp.asarray(all_mask), grid)
  np.testing.assert_array_equal(np.asarray(cache.next_position),
                                all_mask.sum(1) + np.asarray(deltas)[:, 0])
  if config.vision:
    assert (np.asarray(deltas) < 0).all()
