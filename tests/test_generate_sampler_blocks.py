"""The two-level (blocked) inverse-CDF sampler of `generate.filters` against a flat NumPy inverse CDF,
on vocabularies spanning several blocks, a ragged last block and whole blocks of -inf."""

import jax
import jax.numpy as jnp
import numpy as np

from afmrl_jax.generate import filters
from afmrl_jax.generate.filters import SamplingConfig

N = 3 * filters.SAMPLE_BLOCK - 40  # three blocks, the last one padded


def _row(seed, dead=()):
  x = np.random.default_rng(seed).normal(size=N).astype(np.float32)
  for lo, hi in dead:
    x[lo:hi] = -np.inf
  return x


def _probs(x):
  p = np.exp(x.astype(np.float64) - x.max())
  return p / p.sum()


def test_midpoints_of_every_cdf_interval_map_to_their_token():
  x = _row(0, dead=[(filters.SAMPLE_BLOCK, 2 * filters.SAMPLE_BLOCK), (5, 9)])
  p = _probs(x)
  live = np.flatnonzero(p > 0)
  cdf = np.cumsum(p)
  u = (cdf[live] - p[live] / 2).astype(np.float32)  # middle of token i's interval
  got = jax.jit(filters.sample_categorical)(jnp.asarray(u[:, None]), jnp.asarray(np.tile(x, (live.size, 1))))
  np.testing.assert_array_equal(np.asarray(got), live)


def test_extreme_uniforms_stay_on_live_tokens():
  x = _row(1, dead=[(0, 3), (2 * filters.SAMPLE_BLOCK, N)])  # last block entirely -inf
  u = np.array([[np.finfo(np.float32).tiny], [1 - 2.0 ** -24]], np.float32)
  got = np.asarray(filters.sample_categorical(jnp.asarray(u), jnp.asarray(np.tile(x, (2, 1)))))
  live = np.flatnonzero(np.isfinite(x))
  np.testing.assert_array_equal(got, [live[0], live[-1]])


def test_frequencies_and_logprobs_over_several_blocks():
  x = _row(2, dead=[(filters.SAMPLE_BLOCK + 10, filters.SAMPLE_BLOCK + 60)]) * 2.5
  draws = 40000
  cfg = SamplingConfig(temperature=1.0)
  tokens, logprobs = jax.jit(filters.choose_tokens, static_argnums=2)(
      jax.random.key(0), jnp.asarray(np.tile(x, (draws, 1))), cfg)
  tokens = np.asarray(tokens)
  p = _probs(x)
  freq = np.bincount(tokens, minlength=N) / draws
  assert np.all(freq[p == 0] == 0)
  # 6 standard deviations of a frequency at the largest probability
  np.testing.assert_allclose(freq, p, atol=6 * np.sqrt(p.max() / draws))
  np.testing.assert_allclose(np.asarray(logprobs), np.log(p[tokens]), rtol=1e-5, atol=1e-6)
