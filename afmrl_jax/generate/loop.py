"""The decode loop: one compiled step inside `jax.lax.while_loop`, static shapes, EOS per row.

Model-agnostic: it sees the model only through `decode_fn(state, tokens [B]) -> (logits [B,V], state)`,
so the same loop drives our VLModel (see `generate.sampling`) and anything else with a KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from afmrl_jax.generate.filters import SamplingConfig, choose_tokens, draw_uniforms


class GenerationOutput(NamedTuple):
  """tokens [B, N] int32 (pad_id after a row's EOS), logprobs [B, N] float32 (0 after EOS),
  lengths [B] int32: generated tokens per row including the EOS token (N if none was produced)."""
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array


def decode_loop(decode_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]], state: Any,
                first_logits: jax.Array, rng: jax.Array, config: SamplingConfig,
                constrain: Callable[[jax.Array], jax.Array] = lambda x: x) -> GenerationOutput:
  """Samples `config.max_new_tokens` tokens per row, stopping rows at EOS (and the loop once all stopped).

  Args:
    decode_fn: (state, tokens [B] int32) -> (next logits [B, V], new state); the model step with
      its KV cache in `state`. Called max_new_tokens - 1 times at most, always with the same shapes.
    state: initial decode state (after prefill).
    first_logits: [B, V] logits of the last prompt position (from prefill).
    rng: PRNG key.
    config: SamplingConfig (static).
    constrain: applied to the [B, N] buffers (a sharding constraint putting batch on the data axes).
  Returns:
    GenerationOutput.
  """
  batch = first_logits.shape[0]
  n = config.max_new_tokens
  eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)

  # Every step's random numbers are drawn up front: no PRNG work inside the compiled step.
  uniforms = None if config.greedy else draw_uniforms(rng, (n, batch, 1))

  def pick(step, logits, done, tokens, logprobs, lengths):
    u = None if uniforms is None else jax.lax.dynamic_index_in_dim(uniforms, step, keepdims=False)
    tok, lp = choose_tokens(None, logits, config, u)
    tok = jnp.where(done, config.pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    tokens = tokens.at[:, step].set(tok)
    logprobs = logprobs.at[:, step].set(lp)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos)
    return tok, done, tokens, logprobs, lengths

  tokens = constrain(jnp.full((batch, n), config.pad_id, jnp.int32))
  logprobs = constrain(jnp.zeros((batch, n), jnp.float32))
  lengths = jnp.zeros((batch,), jnp.int32)
  done = jnp.zeros((batch,), bool)
  tok, done, tokens, logprobs, lengths = pick(0, first_logits, done, tokens, logprobs, lengths)

  def cond(carry):
    step, _, done, *_ = carry
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, tok, done, state, tokens, logprobs, lengths = carry
    logits, state = decode_fn(state, tok)
    tok, done, tokens, logprobs, lengths = pick(step, logits, done, tokens, logprobs, lengths)
    return step + 1, tok, done, state, tokens, logprobs, lengths

  carry = (jnp.asarray(1, jnp.int32), tok, done, state, tokens, logprobs, lengths)
  _, _, _, _, tokens, logprobs, lengths = jax.lax.while_loop(cond, body, carry)
  return GenerationOutput(tokens, logprobs, lengths)
