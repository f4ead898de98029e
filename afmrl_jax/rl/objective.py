"""The GRPO objective of RAR over a rollout batch (`train.rar_rollout`): the policy's teacher-forced
log-probabilities of the sampled strings, then `rl.algo.grpo_loss` (clipped ratio to the rollout policy,
k3 KL to the frozen SFT reference, masked past each string's EOS).

With one update per rollout the rollout policy *is* the current one, so its log-probabilities are the
current ones with the gradient stopped (ratio 1, no extra forward pass); with several, the rollout
computes them once (`old_logp`) before the first update.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from afmrl_jax.generate.logprobs import completion_logprobs
from afmrl_jax.rl import algo


def make_loss_fn(image_grid_thw: tuple[int, int, int], config: algo.GRPOConfig, temperature: float = 1.0
                 ) -> Callable:
  """loss_fn(model, batch) -> (loss, metrics) for `train.loop.make_train_step`."""

  def loss_fn(model, batch):
    completion, lengths = batch["completion"], batch["completion_length"]
    logp = completion_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], completion, lengths,
                               batch["pixel_values"], image_grid_thw, temperature=temperature)
    mask = algo.token_mask(lengths, completion.shape[1])
    old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    loss, metrics = algo.grpo_loss(logp, old, batch.get("ref_logp"), batch["advantages"], mask, config)
    metrics = dict(metrics)
    # Entropy estimate: the mean negative log-probability of the sampled tokens.
    tokens = jnp.maximum(jnp.sum(mask), 1)
    metrics["entropy"] = -jnp.sum(jnp.where(mask, logp, 0.0)) / tokens
    return loss, metrics

  return loss_fn
