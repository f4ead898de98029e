"""The SFT objective of the attribute generator: next-token cross-entropy on the answer tokens only.

Batch keys (`data.generator_data`): `prompt_ids`, `prompt_mask` [B, Tp] (left-padded), `pixel_values`
[B, P, Dp], `answer_ids` [B, Ta] (right-padded), `answer_length` [B]. The sequence is
`[prompt | answer]`; prompt and padding positions carry no loss, and the loss is the mean over all real
answer tokens of the global batch (EOS included): -sum(log p(answer token)) / sum(answer_length).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from afmrl_jax.generate.logprobs import completion_logprobs


def answer_logprobs(model, batch, image_grid_thw) -> jnp.ndarray:
  """[B, Ta] float32 log-probabilities of the answer tokens given the prompt (0 past `answer_length`)."""
  return completion_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                             batch["answer_length"], batch["pixel_values"], image_grid_thw)


def make_loss_fn(image_grid_thw: tuple[int, int, int]) -> Callable:
  """loss_fn(model, batch) -> (loss, metrics) for `train.loop` (token-mean answer cross-entropy)."""

  def loss_fn(model, batch):
    logp = answer_logprobs(model, batch, image_grid_thw)
    tokens = jnp.sum(batch["answer_length"]).astype(jnp.float32)
    loss = -jnp.sum(logp) / jnp.maximum(tokens, 1.0)
    return loss, {"answer_tokens": tokens}

  return loss_fn
