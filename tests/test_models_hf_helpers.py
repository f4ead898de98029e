"""Shared fixtures for the model tests: tiny random HF reference models and matching inputs.

(No tests here; imported by tests/test_models_*.py.)
"""
from __future__ import annotations

import dataclasses

import numpy as np

IMAGE, VIDEO, V_START, V_END = 100, 101, 102, 103


@dataclasses.dataclass(frozen=True)
class Shape:
  """One tiny architecture to compare (all fields are HF config values)."""
  name: str
  kind: str  # qwen2_vl | qwen2_5_vl | llama | qwen2
  hidden: int = 32
  heads: int = 4
  kv_heads: int = 2
  mrope: tuple[int, ...] = (2, 1, 1)
  tie: bool = False
  v_width: int = 16
  v_heads: int = 2
  v_inter: int = 32
  merge: int = 2
  window: int = 56
  fullatt: tuple[int, ...] = (1,)
  grid: tuple[int, int, int] = (1, 4, 4)
  head_dim: int | None = None  # llama only; None = hidden // heads


SHAPES = [
    Shape('qwen2vl_gqa', 'qwen2_vl'),
    Shape('qwen2vl_mqa_merge1_t2', 'qwen2_vl', hidden=48, heads=6, kv_heads=1, v_width=32, v_heads=4,
          v_inter=64, merge=1, grid=(2, 2, 4)),
    Shape('qwen25vl_windows_tied', 'qwen2_5_vl', hidden=64, heads=4, kv_heads=2, mrope=(2, 3, 3),
          tie=True, v_width=32, v_heads=2, v_inter=48, window=56, fullatt=(1,), grid=(1, 8, 8)),
    Shape('qwen25vl_uneven_windows', 'qwen2_5_vl', hidden=32, heads=4, kv_heads=4, v_width=16,
          v_heads=2, v_inter=24, window=56, fullatt=(0,), grid=(1, 6, 4)),
    Shape('qwen25vl_win1_merge3', 'qwen2_5_vl', hidden=32, heads=2, kv_heads=1, mrope=(4, 2, 2),
          v_width=16, v_heads=2, v_inter=24, merge=3, window=42, fullatt=(), grid=(1, 6, 6)),
]
TEXT_SHAPES = [
    Shape('llama_tied', 'llama', hidden=32, heads=4, kv_heads=2, tie=True),
    Shape('llama_head_dim16', 'llama', hidden=32, heads=4, kv_heads=1, head_dim=16),
    Shape('qwen2_untied', 'qwen2', hidden=48, heads=6, kv_heads=2),
]


def hf_model(shape: Shape, seed: int = 0):
  """A random float32 HF model of `shape` (every weight perturbed, so norms/biases matter)."""
  import torch
  import transformers as tf

  text = dict(vocab_size=128, hidden_size=shape.hidden, intermediate_size=2 * shape.hidden + 8,
              num_hidden_layers=2, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=shape.tie)
  if shape.kind in ('llama', 'qwen2'):
    rope = {'rope_type': 'default', 'rope_theta': 10000.0}
    if shape.kind == 'llama':
      config = tf.LlamaConfig(**text, rope_parameters=rope,
                              head_dim=shape.head_dim or shape.hidden // shape.heads)
      cls = tf.LlamaForCausalLM
    else:
      config = tf.Qwen2Config(**text, rope_parameters=rope)
      cls = tf.Qwen2ForCausalLM
  else:
    text['rope_parameters'] = {'rope_type': 'default', 'mrope_section': list(shape.mrope),
                               'rope_theta': 10000.0}
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START,
               vision_end_token_id=V_END, tie_word_embeddings=shape.tie)
    if shape.kind == 'qwen2_vl':
      vision = dict(depth=2, embed_dim=shape.v_width, hidden_size=shape.hidden, num_heads=shape.v_heads,
                    mlp_ratio=shape.v_inter // shape.v_width, spatial_merge_size=shape.merge)
      config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
      cls = tf.Qwen2VLForConditionalGeneration
    else:
      vision = dict(depth=2, hidden_size=shape.v_width, intermediate_size=shape.v_inter,
                    out_hidden_size=shape.hidden, num_heads=shape.v_heads,
                    spatial_merge_size=shape.merge, window_size=shape.window,
                    fullatt_block_indexes=list(shape.fullatt))
      config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
      cls = tf.Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def image_tokens(shape: Shape) -> int:
  t, h, w = shape.grid
  return t * h * w // shape.merge ** 2


def inputs(shape: Shape, batch: int = 3, seed: int = 0):
  """(ids [B,T], mask [B,T], pixels [B,P,Dp] | None) with no / left / right padding rows.

  Each row: text, <vision_start>, image tokens, <vision_end>, text (VL shapes), padded to T.
  """
  rng = np.random.default_rng(seed)
  n_img = image_tokens(shape) if shape.kind in ('qwen2_vl', 'qwen2_5_vl') else 0
  lengths = [(4, 3), (2, 2), (3, 1)]
  rows = []
  for a, b in lengths[:batch]:
    body = list(rng.integers(3, 99, size=a))
    if n_img:
      body += [V_START] + [IMAGE] * n_img + [V_END]
    body += list(rng.integers(3, 99, size=b))
    rows.append(body)
  t = max(len(r) for r in rows) + 2
  ids = np.zeros((batch, t), np.int32)
  mask = np.zeros((batch, t), np.int32)
  for i, r in enumerate(rows):
    if i % 3 == 1:  # left padding
      ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    else:  # no padding (row 0 is the longest... padded by 2) / right padding
      ids[i, :len(r)], mask[i, :len(r)] = r, 1
  pixels = None
  if n_img:
    p = int(np.prod(shape.grid))
    pixels = rng.standard_normal((batch, p, 3 * 2 * 14 * 14)).astype(np.float32)
  return ids, mask, pixels


def hf_forward(model, shape: Shape, ids, mask, pixels, position_ids=None):
  """(logits [B,T,V], last hidden [B,T,E]) from the HF reference (float32, no grad)."""
  import torch

  kw = dict(input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long))
  if pixels is not None:
    kw.update(pixel_values=torch.tensor(pixels.reshape(-1, pixels.shape[-1])),
              image_grid_thw=torch.tensor([shape.grid] * ids.shape[0]),
              mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))
  if position_ids is not None:
    kw['position_ids'] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
  with torch.no_grad():
    logits = model(**kw).logits
    if hasattr(model.model, 'rope_deltas'):
      model.model.rope_deltas = None  # HF caches deltas between calls; start the second one fresh
    hidden = model.model(**kw).last_hidden_state
  return logits.numpy(), hidden.numpy()
