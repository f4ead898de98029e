"""VLConfig reads the published (transformers 4.x, flat) config.json layout and the transformers-5
layout the same way HF does, and writes a layout HF reads back to the same fields."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from afmrl_jax.models.config import VLConfig
from afmrl_jax.models.vl_model import VLModel

transformers = pytest.importorskip('transformers')

# config.json of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct as published (abridged
# to the fields that matter; note `in_chans`, top-level text fields and `rope_scaling`).
QWEN2_VL_2B = {
    'architectures': ['Qwen2VLForConditionalGeneration'], 'model_type': 'qwen2_vl',
    'bos_token_id': 151643, 'eos_token_id': 151645, 'vision_start_token_id': 151652,
    'vision_end_token_id': 151653, 'image_token_id': 151655, 'video_token_id': 151656,
    'hidden_act': 'silu', 'hidden_size': 1536, 'intermediate_size': 8960,
    'max_position_embeddings': 32768, 'max_window_layers': 28, 'num_attention_heads': 12,
    'num_hidden_layers': 28, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-06,
    'rope_theta': 1000000.0, 'sliding_window': 32768, 'tie_word_embeddings': True,
    'use_sliding_window': False, 'vocab_size': 151936,
    'vision_config': {'depth': 32, 'embed_dim': 1280, 'mlp_ratio': 4, 'num_heads': 16, 'in_chans': 3,
                      'hidden_size': 1536, 'patch_size': 14, 'spatial_merge_size': 2,
                      'temporal_patch_size': 2},
    'rope_scaling': {'type': 'mrope', 'mrope_section': [16, 24, 24]},
}
QWEN25_VL_3B = {
    'architectures': ['Qwen2_5_VLForConditionalGeneration'], 'model_type': 'qwen2_5_vl',
    'bos_token_id': 151643, 'eos_token_id': 151645, 'vision_start_token_id': 151652,
    'vision_end_token_id': 151653, 'image_token_id': 151655, 'video_token_id': 151656,
    'hidden_act': 'silu', 'hidden_size': 2048, 'intermediate_size': 11008,
    'max_position_embeddings': 128000, 'num_attention_heads': 16, 'num_hidden_layers': 36,
    'num_key_value_heads': 2, 'rms_norm_eps': 1e-06, 'rope_theta': 1000000.0,
    'tie_word_embeddings': True, 'use_sliding_window': False, 'vocab_size': 151936,
    'vision_config': {'depth': 32, 'hidden_act': 'silu', 'hidden_size': 1280,
                      'intermediate_size': 3420, 'num_heads': 16, 'in_chans': 3,
                      'out_hidden_size': 2048, 'patch_size': 14, 'spatial_merge_size': 2,
                      'window_size': 112, 'fullatt_block_indexes': [7, 15, 23, 31],
                      'tokens_per_second': 2, 'temporal_patch_size': 2},
    'rope_scaling': {'type': 'mrope', 'mrope_section': [16, 24, 24]},
}


@pytest.mark.parametrize('published,cls', [(QWEN2_VL_2B, 'Qwen2VLConfig'),
                                           (QWEN25_VL_3B, 'Qwen2_5_VLConfig')])
def test_published_layout_parses_like_hf(published, cls):
  ours = VLConfig.from_hf_dict(published)
  via_hf = VLConfig.from_hf_dict(getattr(transformers, cls)(**published).to_dict())
  assert ours == via_hf
  t, v = ours.text, ours.vision
  assert (t.hidden_size, t.num_hidden_layers, t.dim_per_head, t.mrope_section, t.rope_theta) == (
      published['hidden_size'], published['num_hidden_layers'],
      published['hidden_size'] // published['num_attention_heads'], (16, 24, 24), 1e6)
  assert t.tie_word_embeddings and t.qkv_bias and not t.o_bias
  assert v.out_hidden_size == published['hidden_size'] and v.patch_dim == 3 * 2 * 14 * 14
  # our export is read by HF into the same fields
  back = getattr(transformers, cls)(**ours.to_hf_dict())
  assert VLConfig.from_hf_dict(back.to_dict()) == ours


def test_unsupported_settings_are_rejected_by_name():
  with pytest.raises(ValueError, match='use_sliding_window'):
    VLConfig.from_hf_dict({**QWEN2_VL_2B, 'use_sliding_window': True})
  with pytest.raises(ValueError, match='model_type'):
    VLConfig.from_hf_dict({**QWEN2_VL_2B, 'model_type': 'mistral'})
  with pytest.raises(ValueError, match='rope type'):
    VLConfig.from_hf_dict({**QWEN2_VL_2B, 'model_type': 'llama', 'rope_scaling': {
        'rope_type': 'llama3', 'factor': 8.0}})


def test_remat_gives_the_same_gradients():
  config = VLConfig.from_hf_dict({
      'model_type': 'qwen2_5_vl', 'image_token_id': 100,
      'text_config': dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          rope_parameters={'rope_type': 'default', 'mrope_section': [2, 1, 1]}),
      'vision_config': dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=24,
                            out_hidden_size=32, window_size=56, fullatt_block_indexes=[1])})
  rng = np.random.default_rng(0)
  ids = np.concatenate([rng.integers(3, 99, (2, 3)), np.full((2, 4), 100), rng.integers(3, 99, (2, 3))], 1)
  ids, pixels = jnp.asarray(ids, jnp.int32), jnp.asarray(rng.standard_normal((2, 16, 1176)), jnp.float32)

  def loss(model):
    return jnp.mean(model.logits(model(ids, None, pixels, (1, 4, 4))[0]) ** 2)

  grads = [nnx.jit(nnx.grad(loss))(VLModel(dataclasses.replace(config, remat=r), rngs=nnx.Rngs(0)))
           for r in (False, True)]
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), *grads))
  assert max(float(d) for d in diffs) < 1e-6
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 1e-4
