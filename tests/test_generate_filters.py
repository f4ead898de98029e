"""Sampling filters vs NumPy / HF references; the decode loop's EOS stopping, lengths and logprobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from afmrl_jax.generate import filters
from afmrl_jax.generate.filters import SamplingConfig
from afmrl_jax.generate.loop import decode_loop


def np_top_k(logits, k):
  out = logits.copy()
  for row in out:
    kth = np.sort(row)[::-1][k - 1]
    row[row < kth] = -np.inf
  return out


def np_top_p(logits, p):
  out = np.full_like(logits, -np.inf)
  for r, row in enumerate(logits):
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    mass = 0.0
    for i in np.argsort(-row):
      out[r, i] = row[i]
      mass += probs[i]
      if mass >= p:
        break
  return out


def _logits(shape=(5, 40), seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2.0


@pytest.mark.parametrize("k", [1, 3, 17])
def test_top_k_matches_numpy_and_hf(k):
  x = _logits()
  got = np.asarray(filters.top_k_filter(jnp.asarray(x), k))
  np.testing.assert_array_equal(got, np_top_k(x, k))
  hf = TopKLogitsWarper(k)(None, torch.from_numpy(x)).numpy()
  np.testing.assert_array_equal(np.isinf(got), np.isinf(hf))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_top_p_matches_numpy_and_hf(p):
  x = _logits(seed=1)
  got = np.asarray(filters.top_p_filter(jnp.asarray(x), p))
  np.testing.assert_array_equal(got, np_top_p(x, p))
  hf = TopPLogitsWarper(p)(None, torch.from_numpy(x)).numpy()
  np.testing.assert_array_equal(np.isinf(got), np.isinf(hf))


def test_filter_logits_temperature_then_k_then_p():
  x = _logits(seed=2)
  cfg = SamplingConfig(temperature=0.7, top_k=10, top_p=0.8)
  got = np.asarray(filters.filter_logits(jnp.asarray(x), cfg))
  np.testing.assert_allclose(got, np_top_p(np_top_k(x / 0.7, 10), 0.8), rtol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.7), (5, 0.6)])
def test_sampling_frequencies_follow_filtered_distribution(top_k, top_p):
  row = np.array([2.0, 1.5, 1.0, 0.2, -0.3, -1.0, -2.0, 0.8], np.float32)
  draws = 20000
  cfg = SamplingConfig(temperature=1.3, top_k=top_k, top_p=top_p)
  logits = jnp.asarray(np.tile(row, (draws, 1)))
  tokens, logprobs = jax.jit(filters.choose_tokens, static_argnums=2)(jax.random.key(0), logits, cfg)
  tokens = np.asarray(tokens)
  ref = row[None] / 1.3
  if top_k:
    ref = np_top_k(ref, top_k)
  if top_p < 1:
    ref = np_top_p(ref, top_p)
  probs = np.exp(ref[0] - ref[0].max())
  probs /= probs.sum()
  freq = np.bincount(tokens, minlength=row.size) / draws
  assert np.all(freq[probs == 0] == 0)
  np.testing.assert_allclose(freq, probs, atol=0.015)
  # logprobs are under the unfiltered tempered distribution
  full = row / 1.3 - np.log(np.sum(np.exp(row / 1.3)))
  np.testing.assert_allclose(np.asarray(logprobs), full[tokens], rtol=1e-5)


def test_greedy_choice_and_logprob():
  x = _logits(seed=3)
  tokens, lp = filters.choose_tokens(jax.random.key(0), jnp.asarray(x), SamplingConfig(temperature=0.0))
  np.testing.assert_array_equal(np.asarray(tokens), x.argmax(-1))
  ref = x - np.log(np.exp(x).sum(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(lp), ref[np.arange(5), x.argmax(-1)], rtol=1e-5)


def test_config_validation():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=-1.0)


def test_decode_loop_greedy_eos_and_lengths():
  """A bigram 'model' (next logits = table[token]) against a NumPy greedy loop with EOS."""
  vocab, eos, pad, n = 12, 2, 0, 7
  rng = np.random.default_rng(4)
  table = rng.normal(size=(vocab, vocab)).astype(np.float32)
  table[5, 2] = 10.0   # 5 -> EOS
  table[3, 5] = 10.0   # 3 -> 5
  table[7, :] = -5.0
  table[7, 8] = 5.0    # 7 -> 8 -> ... (whatever argmax says), may never stop
  first = np.stack([np.eye(vocab)[3] * 9, np.eye(vocab)[7] * 9, np.eye(vocab)[eos] * 9])

  def decode_fn(state, tok):
    return jnp.asarray(table)[tok], state + 1

  cfg = SamplingConfig(temperature=0.0, max_new_tokens=n, eos_ids=(eos, 11), pad_id=pad)
  out = jax.jit(lambda f: decode_loop(decode_fn, jnp.int32(0), f, jax.random.key(0), cfg))(jnp.asarray(first))

  exp_tokens = np.full((3, n), pad)
  exp_lp = np.zeros((3, n), np.float32)
  exp_len = np.zeros(3, int)
  for r in range(3):
    logits = first[r]
    for i in range(n):
      tok = int(np.argmax(logits))
      exp_tokens[r, i] = tok
      exp_lp[r, i] = logits[tok] - np.log(np.exp(logits).sum())
      exp_len[r] += 1
      if tok in (eos, 11):
        break
      logits = table[tok]
  np.testing.assert_array_equal(np.asarray(out.tokens), exp_tokens)
  np.testing.assert_array_equal(np.asarray(out.lengths), exp_len)
  np.testing.assert_allclose(np.asarray(out.logprobs), exp_lp, rtol=1e-5, atol=1e-6)
  assert exp_len[0] == 3 and exp_len[2] == 1  # 3 -> 5 -> EOS; immediate EOS


def test_decode_loop_pads_after_eos_in_every_row():
  cfg = SamplingConfig(temperature=0.0, max_new_tokens=50, eos_ids=(1,), pad_id=3)
  eye = jnp.asarray(np.eye(4, dtype=np.float32) * 5)

  def decode_fn(state, tok):  # token 0 -> EOS (1) next
    return eye[tok + 1], state + 1

  out = jax.jit(lambda f: decode_loop(decode_fn, jnp.int32(0), f, jax.random.key(0), cfg))(eye[jnp.array([0, 0])])
  np.testing.assert_array_equal(np.asarray(out.lengths), [2, 2])
  np.testing.assert_array_equal(np.asarray(out.tokens), np.array([[0, 1] + [3] * 48] * 2))
  assert np.all(np.asarray(out.logprobs)[:, 2:] == 0)
