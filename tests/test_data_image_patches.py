"""Qwen2-VL patch layout: parity with transformers' own (PIL backend) image processor."""
import numpy as np
import pytest

from afmrl_jax.data import image_patches

transformers_qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


@pytest.mark.parametrize("shape", [(56, 56), (64, 64), (90, 130), (112, 84)])
def test_patchify_matches_hf(shape):
  rng = np.random.default_rng(sum(shape))
  image = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
  hf = transformers_qwen.Qwen2VLImageProcessorPil()
  out = hf(images=[image], return_tensors="np")
  ref = np.asarray(out["pixel_values"])
  thw = tuple(int(v) for v in np.asarray(out["image_grid_thw"])[0])
  ours = image_patches.patchify(image)
  assert thw == image_patches.grid_thw(*shape)
  assert ours.shape == ref.shape == (thw[0] * thw[1] * thw[2], 1176)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  assert image_patches.num_image_tokens(*shape) == ref.shape[0] // 4


def test_patch_rows_are_pixels_of_one_patch():
  # Hand-made check of the layout: an image whose pixel value encodes its 14x14 patch index.
  cfg = image_patches.PatchConfig(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
  gh, gw = 4, 6
  idx = np.arange(gh * gw).reshape(gh, gw)
  image = np.repeat(np.repeat(idx, 14, 0), 14, 1)[..., None].repeat(3, -1).astype(np.uint8)
  rows = image_patches.patchify(image, cfg)
  # Expected row order: merged 2x2 blocks in raster order, patches raster order inside each block.
  expected = [idx[bi * 2 + i, bj * 2 + j] for bi in range(gh // 2) for bj in range(gw // 2)
              for i in range(2) for j in range(2)]
  np.testing.assert_allclose(rows.min(1), expected, atol=1e-3)
  np.testing.assert_allclose(rows.max(1), expected, atol=1e-3)
