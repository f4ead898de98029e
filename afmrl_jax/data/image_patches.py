"""Qwen2-VL image preprocessing in NumPy: resize, normalise, flatten into patches.

Matches HF `Qwen2VLImageProcessorPil` (transformers 5) exactly: bicubic PIL resize to `smart_resize`'s
multiple of `patch_size * merge_size` (28), rescale to [0, 1], normalise with the OpenAI CLIP mean/std,
repeat the single frame `temporal_patch_size` (2) times, and order the patches so that each 2x2 block
of neighbouring patches (one merged LLM token) is contiguous. Output rows are
`[grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size * patch_size]` = `[P, 1176]`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class PatchConfig:
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """Qwen2-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels]."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"image aspect ratio must be below 200, got {height}x{width}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def grid_thw(height: int, width: int, cfg: PatchConfig = PatchConfig()) -> tuple[int, int, int]:
  """(grid_t, grid_h, grid_w) in patches for an input image of `height` x `width`."""
  h, w = smart_resize(height, width, cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
  return 1, h // cfg.patch_size, w // cfg.patch_size


def num_image_tokens(height: int, width: int, cfg: PatchConfig = PatchConfig()) -> int:
  """Number of `<|image_pad|>` tokens (merged patches) the image takes in the prompt."""
  t, h, w = grid_thw(height, width, cfg)
  return t * h * w // (cfg.merge_size ** 2)


def patchify(image: np.ndarray, cfg: PatchConfig = PatchConfig()) -> np.ndarray:
  """uint8 [H, W, 3] image -> float32 [grid_t * grid_h * grid_w, 3 * tps * ps * ps] (HF's order)."""
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"patchify expects an RGB image [H, W, 3], got shape {image.shape}")
  ps, tps, ms = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
  h, w = smart_resize(image.shape[0], image.shape[1], ps * ms, cfg.min_pixels, cfg.max_pixels)
  if (h, w) != image.shape[:2]:
    image = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((w, h), Image.BICUBIC))
  x = image.astype(np.float32) * np.float32(1 / 255)
  x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
  x = x.transpose(2, 0, 1)  # [C, H, W]
  gh, gw = h // ps, w // ps
  x = x.reshape(3, gh // ms, ms, ps, gw // ms, ms, ps)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, ps, ps]
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (tps,) + x.shape[5:])  # the repeated frame
  return np.ascontiguousarray(x.reshape(gh * gw, 3 * tps * ps * ps), dtype=np.float32)
