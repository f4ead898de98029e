"""Model configuration mirroring HF `Qwen2VLConfig` / `Qwen2_5_VLConfig` (and Llama / Qwen2 text).

`VLConfig.from_hf_dict` reads a `config.json` dict in either the transformers-5 layout (nested
`text_config`, `rope_parameters`) or the older flat layout of the published checkpoints
(`rope_scaling: {type: mrope, mrope_section: [...]}` at the top level); `to_hf_dict` writes the
transformers-5 layout back. All three dataclasses are frozen and hashable so they can be static
arguments of jitted functions.
"""
from __future__ import annotations

import dataclasses
from typing import Any

VL_TYPES = ('qwen2_vl', 'qwen2_5_vl')
TEXT_TYPES = ('llama', 'qwen2')


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Decoder fields (HF text_config)."""
  vocab_size: int = 151936
  hidden_size: int = 1536
  intermediate_size: int = 8960
  num_hidden_layers: int = 28
  num_attention_heads: int = 12
  num_key_value_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, ...] | None = (16, 24, 24)  # None: plain 1-D RoPE (Llama / Qwen2)
  qkv_bias: bool = True  # Qwen: q/k/v have a bias, o_proj none
  o_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = 'silu'
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Vision tower fields (HF vision_config); `arch` picks the Qwen2-VL or Qwen2.5-VL block."""
  arch: str = 'qwen2_vl'  # 'qwen2_vl': LayerNorm + quick-GELU MLP; 'qwen2_5_vl': RMSNorm + SwiGLU + windows
  depth: int = 32
  width: int = 1280  # HF qwen2_vl `embed_dim`, qwen2_5_vl `hidden_size`
  num_heads: int = 16
  intermediate_size: int = 5120  # qwen2_vl: embed_dim * mlp_ratio
  out_hidden_size: int = 1536  # merger output = text hidden size
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  hidden_act: str = 'quick_gelu'
  window_size: int = 112  # qwen2_5_vl only (in pixels)
  fullatt_block_indexes: tuple[int, ...] = ()  # qwen2_5_vl only
  tokens_per_second: int = 4
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  @property
  def patch_dim(self) -> int:
    """Features per flattened patch: C * temporal_patch * patch * patch."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class VLConfig:
  """A whole model: text decoder, optional vision tower and the special token ids."""
  model_type: str = 'qwen2_vl'
  text: TextConfig = TextConfig()
  vision: VisionConfig | None = VisionConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  dtype: str = 'float32'  # activation / compute dtype
  param_dtype: str = 'float32'
  remat: bool = False  # recompute each block's activations in the backward pass (training memory)

  def replace(self, **kw) -> VLConfig:
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- HF import
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], **overrides) -> VLConfig:
    """Builds a config from an HF `config.json` dict (qwen2_vl, qwen2_5_vl, llama, qwen2)."""
    model_type = d.get('model_type')
    if model_type not in VL_TYPES + TEXT_TYPES:
      raise ValueError(f'config.json: model_type {model_type!r} is not supported; '
                       f'expected one of {VL_TYPES + TEXT_TYPES}')
    text = _text_from_hf(d, model_type)
    vision = _vision_from_hf(d.get('vision_config') or {}, model_type, text) if model_type in VL_TYPES else None
    ids = {k: d[k] for k in ('image_token_id', 'video_token_id', 'vision_start_token_id',
                             'vision_end_token_id') if d.get(k) is not None}
    return cls(model_type=model_type, text=text, vision=vision, **ids, **overrides)

  # ---------------------------------------------------------------- HF export
  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers-5 `config.json` dict for this model."""
    t = self.text
    if self.model_type in TEXT_TYPES:
      out = dict(
          model_type=self.model_type,
          architectures=['LlamaForCausalLM' if self.model_type == 'llama' else 'Qwen2ForCausalLM'],
          vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
          num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
          num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
          hidden_act=t.hidden_act, max_position_embeddings=t.max_position_embeddings,
          rope_parameters={'rope_type': 'default', 'rope_theta': t.rope_theta},
          tie_word_embeddings=t.tie_word_embeddings, bos_token_id=t.bos_token_id,
          eos_token_id=list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
          pad_token_id=t.pad_token_id, dtype=self.param_dtype)
      out['head_dim'] = t.dim_per_head
      if self.model_type == 'llama':
        out.update(attention_bias=t.qkv_bias, mlp_bias=t.mlp_bias)
      elif (t.qkv_bias, t.o_bias, t.mlp_bias) != (True, False, False):
        raise ValueError('VLConfig: qwen2 checkpoints have q/k/v bias only; set model_type=llama '
                         'for other bias layouts')
      return out
    rope = {'rope_type': 'default', 'rope_theta': t.rope_theta}
    if t.mrope_section is not None:
      rope['mrope_section'] = list(t.mrope_section)
    text = dict(
        model_type=f'{self.model_type}_text', vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        rms_norm_eps=t.rms_norm_eps, hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings, rope_parameters=rope,
        bos_token_id=t.bos_token_id,
        eos_token_id=list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
        pad_token_id=t.pad_token_id, tie_word_embeddings=t.tie_word_embeddings)
    v = self.vision
    vision = None
    if v is not None:
      common = dict(depth=v.depth, num_heads=v.num_heads, in_channels=v.in_channels,
                    patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                    spatial_merge_size=v.spatial_merge_size, hidden_act=v.hidden_act,
                    rope_parameters={'rope_type': 'axial', 'rope_theta': v.rope_theta})
      if v.arch == 'qwen2_vl':
        if v.intermediate_size % v.width:
          raise ValueError('VisionConfig: qwen2_vl needs intermediate_size = width * integer mlp_ratio')
        vision = dict(model_type='qwen2_vl_vision', embed_dim=v.width, hidden_size=v.out_hidden_size,
                      mlp_ratio=v.intermediate_size // v.width, **common)
      else:
        vision = dict(model_type='qwen2_5_vl_vision', hidden_size=v.width,
                      intermediate_size=v.intermediate_size, out_hidden_size=v.out_hidden_size,
                      window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                      tokens_per_second=v.tokens_per_second, **common)
    arch = 'Qwen2VLForConditionalGeneration' if self.model_type == 'qwen2_vl' else \
        'Qwen2_5_VLForConditionalGeneration'
    return dict(model_type=self.model_type, architectures=[arch], text_config=text,
                vision_config=vision, image_token_id=self.image_token_id,
                video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
                vision_end_token_id=self.vision_end_token_id,
                tie_word_embeddings=t.tie_word_embeddings, dtype=self.param_dtype)


def _text_from_hf(d: dict[str, Any], model_type: str) -> TextConfig:
  """The decoder's config from an HF config.json dict (flat, or transformers-5 nested `text_config`)."""
  if model_type in VL_TYPES:
    # transformers 5 nests text fields; the published checkpoints keep them at the top level.
    t = {**{k: v for k, v in d.items() if k not in ('vision_config', 'text_config')},
         **(d.get('text_config') or {})}
  else:
    t = dict(d)
  if t.get('use_sliding_window'):
    raise ValueError('config.json: use_sliding_window=true is not supported (no released '
                     'Qwen2-VL / Qwen2.5-VL checkpoint uses it)')
  if t.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f"config.json: hidden_act {t['hidden_act']!r} unsupported (only silu)")
  rope = t.get('rope_parameters') or t.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type not in ('default', 'mrope', None):
    raise ValueError(f'config.json: rope type {rope_type!r} is not supported (only default / mrope)')
  mrope = rope.get('mrope_section')
  if model_type in VL_TYPES and mrope is None:
    mrope = [16, 24, 24]
  default_theta = 1_000_000.0 if model_type in VL_TYPES else 10000.0
  eos = t.get('eos_token_id')
  is_llama = model_type == 'llama'
  num_heads = t['num_attention_heads']
  return TextConfig(
      vocab_size=t['vocab_size'],
      hidden_size=t['hidden_size'],
      intermediate_size=t['intermediate_size'],
      num_hidden_layers=t['num_hidden_layers'],
      num_attention_heads=num_heads,
      num_key_value_heads=t.get('num_key_value_heads') or num_heads,
      # Qwen2-VL's attention ignores head_dim (always hidden // heads); Llama / Qwen2 honour it.
      # (stored as None when it equals the default, so configs compare equal after a round trip)
      head_dim=(t.get('head_dim') if model_type in TEXT_TYPES
                and t.get('head_dim') not in (None, t['hidden_size'] // num_heads) else None),
      rms_norm_eps=t.get('rms_norm_eps', 1e-6),
      rope_theta=float(rope.get('rope_theta', t.get('rope_theta', default_theta))),
      mrope_section=tuple(mrope) if mrope is not None else None,
      qkv_bias=bool(t.get('attention_bias', False)) if is_llama else True,
      o_bias=bool(t.get('attention_bias', False)) if is_llama else False,
      mlp_bias=bool(t.get('mlp_bias', False)) if is_llama else False,
      hidden_act=t.get('hidden_act', 'silu'),
      max_position_embeddings=t.get('max_position_embeddings', 32768),
      tie_word_embeddings=bool(d.get('tie_word_embeddings', t.get('tie_word_embeddings', False))),
      bos_token_id=t.get('bos_token_id'),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=t.get('pad_token_id'),
  )


def _vision_from_hf(v: dict[str, Any], model_type: str, text: TextConfig) -> VisionConfig:
  """The vision tower's config from an HF `vision_config` dict (Qwen2-VL or Qwen2.5-VL layout)."""
  vrope = v.get('rope_parameters') or {}
  common = dict(
      depth=v.get('depth', 32), num_heads=v.get('num_heads', 16),
      in_channels=v.get('in_channels', v.get('in_chans', 3)), patch_size=v.get('patch_size', 14),
      temporal_patch_size=v.get('temporal_patch_size', 2),
      spatial_merge_size=v.get('spatial_merge_size', 2),
      rope_theta=float(vrope.get('rope_theta', 10000.0)))
  if model_type == 'qwen2_vl':
    width = v.get('embed_dim', 1280)
    return VisionConfig(arch='qwen2_vl', width=width, intermediate_size=int(width * v.get('mlp_ratio', 4)),
                        out_hidden_size=v.get('hidden_size', text.hidden_size),
                        hidden_act=v.get('hidden_act', 'quick_gelu'), **common)
  return VisionConfig(arch='qwen2_5_vl', width=v.get('hidden_size', 3584),
                      intermediate_size=v.get('intermediate_size', 3420),
                      out_hidden_size=v.get('out_hidden_size', text.hidden_size),
                      hidden_act=v.get('hidden_act', 'silu'),
                      window_size=v.get('window_size', 112),
                      fullatt_block_indexes=tuple(v.get('fullatt_block_indexes', (7, 15, 23, 31))),
                      tokens_per_second=v.get('tokens_per_second', 4), **common)
