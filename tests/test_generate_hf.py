"""Generation with the KV cache vs HF `generate(do_sample=False)` on tiny random models, and
sampled logprobs vs teacher-forced logprobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from afmrl_jax.generate import logprobs as lp_lib
from afmrl_jax.generate import sampling
from afmrl_jax.generate.filters import SamplingConfig
from afmrl_jax.models import hf_checkpoint
from tests import test_models_hf_helpers as H

SHAPES = {s.name: s for s in H.SHAPES + H.TEXT_SHAPES}
N_NEW = 10
EOS = 2


def _left_pad(ids, mask):
  """Moves each row's real tokens to the right end (HF generate needs left padding)."""
  out_ids, out_mask = np.zeros_like(ids), np.zeros_like(mask)
  for i in range(ids.shape[0]):
    real = ids[i][mask[i] > 0]
    out_ids[i, ids.shape[1] - real.size:] = real
    out_mask[i, ids.shape[1] - real.size:] = 1
  return out_ids, out_mask


@pytest.fixture(scope="module", params=[
    "qwen25vl_win1_merge3", "qwen2_untied", pytest.param("qwen2vl_gqa", marks=pytest.mark.slow)])
def pair(request, tmp_path_factory):
  shape = SHAPES[request.param]
  hf = H.hf_model(shape, seed=1)
  directory = str(tmp_path_factory.mktemp(shape.name))
  hf.save_pretrained(directory)
  ours, _ = hf_checkpoint.load_hf_checkpoint(directory)
  return shape, hf, ours


def _hf_greedy(hf, shape, ids, mask, pixels, eos):
  kw = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
  if pixels is not None:
    kw.update(pixel_values=torch.tensor(pixels.reshape(-1, pixels.shape[-1])),
              image_grid_thw=torch.tensor([shape.grid] * ids.shape[0]),
              mm_token_type_ids=torch.tensor((ids == H.IMAGE).astype(np.int64)))
  with torch.no_grad():
    out = hf.generate(**kw, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
  return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_hf_generate(pair):
  shape, hf, ours = pair
  ids, mask, pixels = H.inputs(shape, batch=3, seed=5)
  ids, mask = _left_pad(ids, mask)
  # EOS: the token HF's greedy decode emits 5th in row 0, so that rows stop at different steps.
  eos = int(_hf_greedy(hf, shape, ids, mask, pixels, EOS)[0, 4])
  want = _hf_greedy(hf, shape, ids, mask, pixels, eos)
  grid = shape.grid if pixels is not None else None
  cfg = SamplingConfig(temperature=0.0, max_new_tokens=N_NEW, eos_ids=(eos,), pad_id=0)
  out = sampling.generate(ours, jnp.asarray(ids), jnp.asarray(mask),
                          None if pixels is None else jnp.asarray(pixels), grid, config=cfg)
  got = np.asarray(out.tokens)
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  assert np.all(got[:, want.shape[1]:] == 0)
  # lengths: up to and including the first EOS, else N_NEW
  assert np.asarray(out.lengths).min() < N_NEW  # at least one row stopped at its EOS
  for row, n in zip(got, np.asarray(out.lengths)):
    hits = np.flatnonzero(row == eos)
    assert n == (hits[0] + 1 if hits.size else N_NEW)

  # Right-padded prompts decode to the same tokens (positions come from the mask, not the slot).
  rids, rmask = H.inputs(shape, batch=3, seed=5)[:2]
  if (rmask[:, -1] == 0).any():
    out_r = sampling.generate(ours, jnp.asarray(rids), jnp.asarray(rmask),
                              None if pixels is None else jnp.asarray(pixels), grid, config=cfg)
    np.testing.assert_array_equal(np.asarray(out_r.tokens), got)


def test_sampled_logprobs_equal_teacher_forced(pair):
  shape, _, ours = pair
  ids, mask, pixels = H.inputs(shape, batch=3, seed=6)
  ids, mask = _left_pad(ids, mask)
  grid = shape.grid if pixels is not None else None
  pix = None if pixels is None else jnp.asarray(pixels)
  cfg = SamplingConfig(temperature=0.8, top_k=40, top_p=0.95, max_new_tokens=N_NEW, eos_ids=(EOS,))
  out = sampling.generate(ours, jnp.asarray(ids), jnp.asarray(mask), pix, grid,
                          rng=jax.random.key(3), config=cfg)
  tf = nnx.jit(lambda m, *a: lp_lib.completion_logprobs(m, *a, image_grid_thw=grid, temperature=0.8, chunk=5))(
      ours, jnp.asarray(ids), jnp.asarray(mask), out.tokens, out.lengths, pix)
  np.testing.assert_allclose(np.asarray(tf), np.asarray(out.logprobs), atol=2e-4)
  assert np.all(np.asarray(out.logprobs) <= 0)
  assert np.any(np.asarray(out.logprobs) < -1e-3)  # really sampled, not all argmax-certain
