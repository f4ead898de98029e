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
    model: a `models.vl_model.VLModel` (uses `rope_index`, `embed_inputs`, `language_model`,
      `logits`).
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
  completion = jnp.where(valid, completion, 0).astype(prompt_ids.dtype)
  prompt_mask = prompt_mask.astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, valid.astype(jnp.int32)], axis=1)
  # Generated tokens are text even when they happen to be the image-pad id (as in decoding, which
  # never splices image features nor gives them image positions): embed and position them here
  # rather than letting the model treat the whole sequence as one prompt.
  grid = image_grid_thw if pixel_values is not None else None
  prompt_pos, _ = model.rope_index(prompt_ids, prompt_mask, grid)  # [3, B, Tp]
  start = jnp.max(jnp.where(prompt_mask[None] > 0, prompt_pos, -1), axis=(0, 2)) + 1  # [B]
  comp_pos = start[:, None] + jnp.arange(n)[None]
  position_ids = jnp.concatenate([prompt_pos, jnp.broadcast_to(comp_pos[None], (3,) + comp_pos.shape)], -1)
  if model.config.text.mrope_section is None:
    position_ids = position_ids[0]
  x = jnp.concatenate([model.embed_inputs(prompt_ids, pixel_values, grid),
                       model.language_model.embed(completion)], axis=1)
  hidden, _ = model.language_model(x, mask, position_ids, None)
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
