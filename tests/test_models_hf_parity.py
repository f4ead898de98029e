"""Parity with HF transformers (PyTorch, float32) on tiny random Qwen2-VL / Qwen2.5-VL / Llama / Qwen2.

For each shape: the HF model is saved with `save_pretrained`, imported with our loader, and must give
the same logits (image + text, left/right padding) and the same last-token embeddings; our export
must reload in HF bit-exactly.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from afmrl_jax.models import heads, hf_checkpoint  # noqa: E402
from afmrl_jax.models.config import VLConfig  # noqa: E402
from tests.test_models_hf_helpers import SHAPES, TEXT_SHAPES, hf_forward, hf_model, inputs  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope='module', params=SHAPES + TEXT_SHAPES, ids=lambda s: s.name)
def case(request, tmp_path_factory):
  shape = request.param
  ref = hf_model(shape)
  directory = str(tmp_path_factory.mktemp(shape.name))
  ref.save_pretrained(directory)
  model, config = hf_checkpoint.load_hf_checkpoint(directory)
  return shape, ref, model, config, directory


@nnx.jit(static_argnums=4)
def _run(model, ids, mask, pixels, grid):
  hidden, _ = model(ids, mask, pixels, grid)
  batch = dict(input_ids=ids, attention_mask=mask)
  if pixels is not None:
    batch['pixel_values'] = pixels
  return model.logits(hidden), heads.embed(model, batch, grid)


def _forward(model, shape, ids, mask, pixels):
  """(logits [B,T,V], embeddings [B,E]) from our model, jitted (cached across calls)."""
  grid = shape.grid if pixels is not None else None
  return _run(model, jnp.asarray(ids), jnp.asarray(mask),
              None if pixels is None else jnp.asarray(pixels), grid)


def test_logits_and_embeddings_match_hf(case):
  shape, ref, model, config, _ = case
  ids, mask, pixels = inputs(shape)
  position_ids = None
  if pixels is None:
    # HF's plain forward numbers left-padded text 0..T-1 including pads; give it the
    # padding-aware positions our model (and HF generate) uses.
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ref_logits, ref_hidden = hf_forward(ref, shape, ids, mask, pixels, position_ids)
  logits, emb = _forward(model, shape, ids, mask, pixels)
  real = mask.astype(bool)
  diff = np.abs(np.asarray(logits) - ref_logits)[real]
  assert diff.max() <= TOL, f'{shape.name}: max |logits - HF| = {diff.max():.2e}'
  last = np.array([np.nonzero(m)[0][-1] for m in mask])
  ref_emb = ref_hidden[np.arange(len(ids)), last]
  ref_emb /= np.linalg.norm(ref_emb, axis=-1, keepdims=True)
  # rows: unpadded, left-padded, right-padded
  assert np.abs(np.asarray(emb) - ref_emb).max() <= TOL
  if pixels is not None:
    # the image really drives the logits (a wrong splice / vision tower could not hide under TOL)
    swapped, _ = _forward(model, shape, ids, mask, pixels[::-1].copy())
    assert np.abs(np.asarray(swapped) - np.asarray(logits))[real].max() > 0.1


def test_export_reloads_in_hf_exactly(case, tmp_path):
  shape, ref, model, config, _ = case
  out = str(tmp_path / 'export')
  # Qwen2.5-VL shapes go through the multi-shard path (index json), the others one file.
  hf_checkpoint.save_hf_checkpoint(
      model, out, max_shard_bytes=(64 << 10) if shape.kind == 'qwen2_5_vl' else (4 << 30))
  assert os.path.exists(os.path.join(out, 'model.safetensors.index.json')) == (shape.kind == 'qwen2_5_vl')
  cls = type(ref)
  reloaded = cls.from_pretrained(out).eval()
  want = ref.state_dict()
  got = reloaded.state_dict()
  assert set(got) == set(want)
  for k, v in want.items():
    assert torch.equal(got[k], v), k
  with open(os.path.join(out, 'config.json')) as f:
    assert VLConfig.from_hf_dict(json.load(f)) == config


def test_config_matches_hf_fields(case):
  shape, ref, _, config, _ = case
  t = ref.config.get_text_config()
  assert (config.text.hidden_size, config.text.num_attention_heads, config.text.num_key_value_heads,
          config.text.vocab_size) == (t.hidden_size, t.num_attention_heads, t.num_key_value_heads,
                                      t.vocab_size)
  assert config.text.tie_word_embeddings == shape.tie
  if config.vision is not None:
    assert config.text.mrope_section == tuple(t.rope_parameters['mrope_section'])
    assert config.vision.spatial_merge_size == ref.config.vision_config.spatial_merge_size


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  from safetensors.torch import load_file, save_file

  shape = SHAPES[0]
  ref = hf_model(shape)
  ref.save_pretrained(tmp_path)
  path = tmp_path / 'model.safetensors'
  tensors = load_file(path)
  missing = dict(tensors)
  del missing['model.layers.1.mlp.up_proj.weight']
  save_file(missing, path, metadata={'format': 'pt'})
  with pytest.raises(KeyError, match=r'model\.layers\.1\.mlp\.up_proj\.weight'):
    hf_checkpoint.load_hf_checkpoint(str(tmp_path))
  bad = dict(tensors)
  bad['visual.blocks.0.attn.qkv.bias'] = torch.zeros(5)
  save_file(bad, path, metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r'visual\.blocks\.0\.attn\.qkv\.bias.*\(5,\)'):
    hf_checkpoint.load_hf_checkpoint(str(tmp_path))


def test_in_memory_transformers_names_are_accepted(tmp_path):
  """transformers' in-memory names (`model.language_model.*`, `model.visual.*`) load the same."""
  from safetensors.torch import load_file, save_file

  shape = SHAPES[3]
  ref = hf_model(shape)
  ref.save_pretrained(tmp_path)
  want, _ = hf_checkpoint.load_hf_checkpoint(str(tmp_path))
  path = tmp_path / 'model.safetensors'
  renamed = {}
  for k, v in load_file(path).items():
    k = 'model.' + k if k.startswith('visual.') else k.replace('model.', 'model.language_model.', 1)
    renamed[k] = v
  save_file(renamed, path, metadata={'format': 'pt'})
  got, _ = hf_checkpoint.load_hf_checkpoint(str(tmp_path))
  a, b = nnx.to_flat_state(nnx.state(want)), nnx.to_flat_state(nnx.state(got))
  assert len(a) == len(b)
  for (pa, va), (pb, vb) in zip(a, b):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))


def test_bfloat16_export_matches_torch_rounding(tmp_path):
  """Export in bfloat16 == HF's own float32 -> bfloat16 cast, bit for bit; and it re-imports."""
  shape = SHAPES[2]
  ref = hf_model(shape)
  ref.save_pretrained(tmp_path / 'f32')
  model, _ = hf_checkpoint.load_hf_checkpoint(str(tmp_path / 'f32'))
  hf_checkpoint.save_hf_checkpoint(model, str(tmp_path / 'bf16'), dtype='bfloat16')
  reloaded = type(ref).from_pretrained(str(tmp_path / 'bf16'), dtype=torch.bfloat16)
  want = ref.to(torch.bfloat16).state_dict()
  for k, v in reloaded.state_dict().items():
    assert v.dtype == torch.bfloat16 and torch.equal(v, want[k]), k
  again, config = hf_checkpoint.load_hf_checkpoint(str(tmp_path / 'bf16'), param_dtype='bfloat16')
  kernel = again.language_model.layers[0].mlp.up_proj.kernel.get_value()
  assert kernel.dtype == jnp.bfloat16 and config.param_dtype == 'bfloat16'
