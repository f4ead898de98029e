"""Batched generation with a KV cache for `models.vl_model.VLModel`: prefill, then one compiled
decode step repeated inside `jax.lax.while_loop` (static shapes: the cache has
`prompt_len + max_new_tokens` slots from the start).

Prompts may be left- or right-padded: the first new token is predicted from each row's last real
token, and new tokens are written after the whole (padded) prompt, where the cache mask and the
per-row rotary positions (`KVCache.next_position`, M-RoPE deltas included) keep them correct.

Sharding: under `jax.set_mesh(mesh)` with the batch sharded over (`data`, `fsdp`) and the model's
parameters on their logical shardings, the cache and the output buffers are constrained to
batch-major sharding, so every device decodes its own rows (tensor-parallel layers communicate
inside the step as in the forward pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afmrl_jax.generate.filters import SamplingConfig
from afmrl_jax.generate.loop import GenerationOutput, decode_loop
from afmrl_jax.models.decoder import KVCache
from afmrl_jax.models.heads import last_token_pool
from afmrl_jax.models.sharding import constrain


def _constrain_cache(cache: KVCache) -> KVCache:
  kv = lambda xs: tuple(constrain(x, "batch", "seq", "kv_heads", None) for x in xs)
  return KVCache(k=kv(cache.k), v=kv(cache.v), mask=constrain(cache.mask, "batch", None),
                 index=cache.index, next_position=constrain(cache.next_position, "batch"))


def prefill(model, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array | None,
            image_grid_thw, max_len: int) -> tuple[jax.Array, KVCache]:
  """Runs the prompt through the model into a fresh cache of `max_len` slots.

  Returns (next-token logits [B, V] at each row's last real token, cache).
  """
  b = input_ids.shape[0]
  cache = _constrain_cache(model.init_cache(b, max_len))
  hidden, cache = model(input_ids, attention_mask, pixel_values, image_grid_thw, cache=cache)
  return model.logits(last_token_pool(hidden, attention_mask)), cache


def decode_step(model, cache: KVCache, tokens: jax.Array) -> tuple[jax.Array, KVCache]:
  """One token per row: tokens [B] -> (next logits [B, V], cache). Positions come from the cache."""
  # [B, 1]: a text token has the same position on M-RoPE's t, h, w axes (the decoder takes [B, T]
  # ids as exactly that, without building the per-axis tables).
  pos = cache.next_position[:, None]
  hidden, cache = model(tokens[:, None], None, position_ids=pos, cache=cache)
  return model.logits(hidden[:, 0]), _constrain_cache(cache)


def _generate(model, input_ids, attention_mask, pixel_values, rng, *, image_grid_thw,
              config: SamplingConfig) -> GenerationOutput:
  max_len = input_ids.shape[1] + config.max_new_tokens
  logits, cache = prefill(model, input_ids, attention_mask, pixel_values, image_grid_thw, max_len)
  return decode_loop(functools.partial(decode_step, model), cache, logits, rng, config,
                     constrain=lambda x: constrain(x, "batch", None))


_generate_jit = nnx.jit(_generate, static_argnames=("image_grid_thw", "config"))


def generate(model, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             pixel_values: jax.Array | None = None, image_grid_thw=None, *, rng: jax.Array | None = None,
             config: SamplingConfig = SamplingConfig()) -> GenerationOutput:
  """Samples up to `config.max_new_tokens` tokens per row.

  Args:
    model: VLModel (or any model with its `__call__(..., position_ids=, cache=)`, `logits`,
      `init_cache`, `config.text.mrope_section`).
    input_ids: [B, T] int32 prompts, padded (left or right) with `attention_mask` [B, T] 0s.
    pixel_values: [B, P, Dp] one image per row, or None; image_grid_thw: static (t, h, w).
    rng: PRNG key (default key 0; unused for greedy).
    config: SamplingConfig (static: changing it recompiles).
  Returns:
    GenerationOutput(tokens [B, N], logprobs [B, N], lengths [B]); see `generate.loop`.
  """
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  if rng is None:
    rng = jax.random.key(0)
  grid = None if image_grid_thw is None else tuple(int(g) for g in image_grid_thw)
  return _generate_jit(model, input_ids, attention_mask, pixel_values, rng, image_grid_thw=grid,
                       config=config)


def eos_ids_of(model_config) -> tuple[int, ...]:
  """The EOS ids of a VLConfig (`text.eos_token_id`, int or tuple) as a tuple."""
  eos = model_config.text.eos_token_id
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)


def sampling_for(model_config, *, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 32) -> SamplingConfig:
  """The SamplingConfig of a VLConfig: rows stop at its EOS ids and are padded with its pad token (the one
  builder: SFT's greedy evaluation, the generate stage and stage 2's rollouts all decode through it)."""
  return SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        eos_ids=eos_ids_of(model_config), pad_id=model_config.text.pad_token_id or 0)


def decode_text(tokenizer, tokens: np.ndarray, length: int, eos_ids: tuple[int, ...]) -> tuple[str, bool]:
  """(text of the first `length` tokens without EOS, whether it ended with one of `eos_ids`)."""
  row = [int(t) for t in tokens[:length]]
  ended = bool(row) and row[-1] in eos_ids
  if ended:
    row = row[:-1]
  return tokenizer.decode(row, skip_special_tokens=True).strip(), ended
