"""Position ids, rotary tables, window permutation and pooling checked against HF / hand values."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp  # noqa: E402
from transformers import vision_utils  # noqa: E402

from afmrl_jax import vectors  # noqa: E402
from afmrl_jax.models import heads, rope, vision  # noqa: E402
from tests.test_models_hf_helpers import IMAGE, SHAPES, V_END, V_START, hf_model  # noqa: E402


def _random_batch(rng, grid, merge, images_per_row, batch=4):
  """Rows with 0..images_per_row images, random text, random left/right padding."""
  n_img = int(np.prod(grid)) // merge ** 2
  rows, counts = [], []
  for _ in range(batch):
    k = int(rng.integers(0, images_per_row + 1))
    row = list(rng.integers(3, 99, size=int(rng.integers(1, 4))))
    for _ in range(k):
      row += [V_START] + [IMAGE] * n_img + [V_END] + list(rng.integers(3, 99, size=int(rng.integers(0, 3))))
    rows.append(row)
    counts.append(k)
  t = max(map(len, rows)) + 3
  ids = np.zeros((batch, t), np.int64)
  mask = np.zeros((batch, t), np.int64)
  for i, row in enumerate(rows):
    start = int(rng.integers(0, t - len(row) + 1))  # left, right or both-sided padding
    ids[i, start:start + len(row)] = row
    mask[i, start:start + len(row)] = 1
  return ids, mask, counts


@pytest.mark.parametrize('shape', [SHAPES[0], SHAPES[1], SHAPES[4]], ids=lambda s: s.name)
def test_get_rope_index_matches_hf(shape):
  ref = hf_model(shape).model
  rng = np.random.default_rng(1)
  for trial in range(3):
    ids, mask, counts = _random_batch(rng, shape.grid, shape.merge, images_per_row=2)
    grids = torch.tensor([shape.grid] * sum(counts)) if sum(counts) else None
    want_pos, want_delta = ref.get_rope_index(
        torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
        image_grid_thw=grids, attention_mask=torch.tensor(mask))
    pos, delta = rope.get_rope_index(jnp.asarray(ids), jnp.asarray(mask), shape.grid,
                                     image_token_id=IMAGE, spatial_merge_size=shape.merge)
    np.testing.assert_array_equal(np.asarray(pos), want_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), want_delta.numpy())


def test_text_only_positions_skip_padding():
  ids = np.array([[0, 0, 5, 6, 7], [5, 6, 7, 8, 0]])
  mask = (ids > 0).astype(np.int32)
  pos, delta = rope.get_rope_index(jnp.asarray(ids), jnp.asarray(mask), None, image_token_id=IMAGE,
                                   spatial_merge_size=2)
  np.testing.assert_array_equal(np.asarray(pos)[0], [[0, 0, 0, 1, 2], [0, 1, 2, 3, 0]])
  np.testing.assert_array_equal(np.asarray(delta)[:, 0], [0, 0])


@pytest.mark.parametrize('grid,merge,window', [((1, 8, 8), 2, 56), ((1, 6, 4), 2, 56),
                                               ((2, 10, 6), 2, 112), ((1, 6, 6), 3, 42)])
def test_window_index_and_vision_positions_match_hf(grid, merge, window):
  g = torch.tensor([grid])
  want_idx, want_cu = vision_utils.get_vision_window_index(g, merge, window, 14)
  idx, cu = vision.window_index(grid, merge, window, 14)
  np.testing.assert_array_equal(idx, want_idx.numpy())
  np.testing.assert_array_equal(cu, want_cu.numpy())
  np.testing.assert_array_equal(rope.vision_positions(grid, merge),
                                vision_utils.get_vision_position_ids(g, merge).numpy())


def test_mrope_tables_match_hf_rotary():
  from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

  shape = SHAPES[2]  # head_dim 16, mrope (2, 3, 3)
  config = hf_model(shape).config.text_config
  rng = np.random.default_rng(0)
  pos = rng.integers(0, 50, size=(3, 2, 7))
  want_cos, want_sin = Qwen2VLRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32),
                                                       torch.tensor(pos))
  cos, sin = rope.text_cos_sin(jnp.asarray(pos), 16, 10000.0, shape.mrope)
  np.testing.assert_allclose(np.asarray(cos), want_cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(sin), want_sin.numpy(), atol=1e-6)


def test_last_token_pool_left_right_and_no_padding():
  hidden = jnp.arange(3 * 4 * 2, dtype=jnp.float32).reshape(3, 4, 2)
  mask = jnp.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(heads.last_token_index(mask)), [1, 3, 3])
  pooled = np.asarray(heads.last_token_pool(hidden, mask))
  np.testing.assert_array_equal(pooled, [[2, 3], [14, 15], [22, 23]])
  unit = np.asarray(vectors.l2_normalize(jnp.array([[3.0, 4.0]])))
  np.testing.assert_allclose(unit, [[0.6, 0.8]])


def test_segment_layout_blocks_equal_windows_and_masks_uneven_ones():
  assert vision.segment_layout(np.zeros(6, int)) is None
  assert vision.segment_layout(np.array([0, 0, 1, 1, 2, 2])) == 2
  mask = vision.segment_layout(np.array([0, 0, 0, 1]))
  np.testing.assert_array_equal(mask, np.array([[1, 1, 1, 0]] * 3 + [[0, 0, 0, 1]], bool))
