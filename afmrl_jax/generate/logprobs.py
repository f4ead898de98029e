"""Teacher-forced per-token log-probabilities of given completions (GRPO's pi_theta, pi_old, pi_ref).

The sequence fed to the model is `[prompt (left-padded) | completion (right-padded)]`, the same
layout `generate.sampling.generate` decodes into, so positions (from the attention mask) and
therefore log-probabilities agree with what sampling reported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log_softmax(logits / temperature)[targets]: logits [..., V], targets [...] -> [...] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def completion_mask(lengths: jax.Array, n: int) -> jax.Array:
  """[B, n] bool: True at the first `lengths[b]` completion positions."""
  return jnp.arange(n)[None, :] < lengths[:, None]


def completion_logprobs(model, prompt_ids: jax.Array, prompt_mask: jax.Array, completion: jax.Array,
                        lengths: jax.Array, pixel_values: jax.Array | None = None,
                        image_grid_thw=None, *, temperature: float = 1.0,
                        chunk: int | None = None) -> jax.Array:
  """Log-probabilities of `completion` tokens given the prompt, teacher-forced in one forward pass.

  Args:
    model: a `models.vl_model.VLModel` (`model(ids, mask, pixels, grid) -> (hidden, cache)`,
      `model.logits(hidden)`).
    prompt_ids: [B, Tp] int32, left-padded; prompt_mask: [B, Tp] (1 = real token).
    completion: [B, N] int32 generated tokens (anything after `lengths`).
    lengths: [B] int32 real completion tokens per row (including EOS).
    pixel_values / image_grid_thw: the prompt's images, as for the model.
    temperature: logprobs under log_softmax(logits / temperature) (match the sampler's).
    chunk: if set (dividing N), the LM head runs over `chunk` positions at a time, so the
      [B, N, vocab] logits never exist at once.
  Returns:
    [B, N] float32, 0 at positions >= lengths.
  """
  tp = prompt_ids.shape[1]
  n = completion.shape[1]
  valid = completion_mask(lengths, n)
  ids = jnp.concatenate([prompt_ids, jnp.where(valid, completion, 0).astype(prompt_ids.dtype)], axis=1)
  mask = jnp.concatenate([prompt_mask.astype(jnp.int32), valid.astype(jnp.int32)], axis=1)
  hidden, _ = model(ids, mask, pixel_values, image_grid_thw)
  # Position tp - 1 + i predicts completion token i.
  h = hidden[:, tp - 1:tp - 1 + n]
  if chunk is None or chunk >= n:
    lp = gather_logprobs(model.logits(h), completion, temperature)
  else:
    if n % chunk:
      raise ValueError(f"completion_logprobs: chunk={chunk} must divide the completion length {n}.")
    b, _, e = h.shape
    hs = h.reshape(b, n // chunk, chunk, e).swapaxes(0, 1)
    ts = completion.reshape(b, n // chunk, chunk).swapaxes(0, 1)
    lp = jax.lax.map(lambda xs: gather_logprobs(model.logits(xs[0]), xs[1], temperature), (hs, ts))
    lp = lp.swapaxes(0, 1).reshape(b, n)
  return jnp.where(valid, lp, 0.0)
