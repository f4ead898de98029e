"""Text decoder of Qwen2-VL / Qwen2.5-VL (M-RoPE) and of Llama / Qwen2 (1-D RoPE), with a KV cache.

One pre-norm block: `x + attn(rms(x))`, then `x + swiglu(rms(x))`; GQA attention with optional
q/k/v bias. The same call serves training (no cache), prefill (fresh cache) and decoding (cache
holding earlier tokens); see `KVCache` for the cache layout and positions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from afmrl_jax.models import rope
from afmrl_jax.models.config import TextConfig
from afmrl_jax.models.layers import (INIT_STD, GatedMLP, RMSNorm, as_rows, attention, decode_attention, dense,
                                     project)
from afmrl_jax.models.sharding import constrain, param, spec_for


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Static-shape key/value cache for all layers.

  Attributes:
    k, v: per layer `[B, S, KVH, D]` (S = max_len slots).
    mask: `[B, S]` int32, 1 where a slot holds a real (non-padding) token.
    index: `[]` int32, the next slot to write; the same for every row (a prompt's left padding
      occupies slots too, masked out).
    next_position: `[B]` int32, the rotary position the next real token of each row gets
      (largest position so far + 1). With M-RoPE it already contains HF's `rope_deltas`.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array
  next_position: jax.Array

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]


def init_cache(config: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """An empty cache with `max_len` slots per row."""
  shape = (batch, max_len, config.num_key_value_heads, config.dim_per_head)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
                 mask=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32),
                 next_position=jnp.zeros((batch,), jnp.int32))


def cache_shardings(cache: KVCache, mesh: jax.sharding.Mesh) -> KVCache:
  """NamedShardings for a cache: batch over (`data`, `fsdp`), kv heads over `tensor` where they divide."""
  def named(x, *names):
    return jax.sharding.NamedSharding(mesh, spec_for(names, x.shape, mesh))
  kv = lambda x: named(x, 'batch', None, 'kv_heads', None)
  return KVCache(k=tuple(kv(x) for x in cache.k), v=tuple(kv(x) for x in cache.v),
                 mask=named(cache.mask, 'batch', None), index=named(cache.index),
                 next_position=named(cache.next_position, 'batch'))


class Attention(nnx.Module):
  """GQA self-attention with rotary positions; q/k/v bias per config."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    e, h, kvh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
    if h % kvh:
      raise ValueError(f'TextConfig: num_attention_heads {h} not divisible by num_key_value_heads {kvh}')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = dense(e, h * d, ('embed', 'q_heads_x_dim'), bias=cfg.qkv_bias, **kw)
    self.k_proj = dense(e, kvh * d, ('embed', 'kv_heads_x_dim'), bias=cfg.qkv_bias, **kw)
    self.v_proj = dense(e, kvh * d, ('embed', 'kv_heads_x_dim'), bias=cfg.qkv_bias, **kw)
    self.o_proj = dense(h * d, e, ('q_heads_x_dim', 'embed'), bias=cfg.o_bias, **kw)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d

  def __call__(self, x, cos, sin, allowed, layer_cache):
    """x `[B, T, E]`; cos/sin `[B, T, D]`; allowed `[B, T, L]` bool; layer_cache (k, v, index) or None.

    Returns (`[B, T, E]`, (k, v) with the new keys/values written, or None).
    """
    b, t, _ = x.shape
    q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), fused=layer_cache is not None)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    q = constrain(rope.apply_rope(q, cos, sin), 'batch', 'seq', 'heads', None)
    k = rope.apply_rope(k, cos, sin)
    new = None
    if layer_cache is not None:
      ck, cv, index = layer_cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      new = (k, v)
      if t == 1:  # decoding: attend over the cache where it lies
        out = decode_attention(q, k, v, allowed, self.head_dim ** -0.5)
        return as_rows(self.o_proj, out.reshape(b, t, -1)), new
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    k = constrain(k, 'batch', 'seq', 'kv_heads', None)
    v = constrain(v, 'batch', 'seq', 'kv_heads', None)
    out = attention(q, k, v, allowed, self.head_dim ** -0.5)
    return as_rows(self.o_proj, out.reshape(b, t, -1)), new


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=cfg.mlp_bias,
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, allowed, layer_cache):
    h, new = self.self_attn(self.input_layernorm(x), cos, sin, allowed, layer_cache)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x), fused=layer_cache is not None)
    return constrain(x, 'batch', 'seq', None), new


class TextDecoder(nnx.Module):
  """Token embedding, decoder layers and the final norm (HF `model.language_model`)."""

  def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: bool = False, rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    self.remat = remat
    self.embed_tokens = param(
        INIT_STD * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype),
        'vocab', 'embed')
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """`[B, T]` ids -> `[B, T, E]` embeddings."""
    return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

  def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None,
               position_ids: jax.Array, cache: KVCache | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """Runs the layers.

    Args:
      inputs_embeds: `[B, T, E]`.
      attention_mask: `[B, T]` 1 = real token, 0 = padding; None = all real.
      position_ids: absolute rotary positions, `[B, T]` or `[3, B, T]` (M-RoPE).
      cache: None (plain causal forward over these T tokens) or a KVCache: the tokens are written
        at slots `[index, index + T)` and attend to every real slot at or before their own.
        The caller must size the cache so `index + T <= max_len` (writes past the end are clamped).
    Returns:
      (`[B, T, E]` final-normed hidden states, updated cache or None).
    """
    cfg = self.config
    b, t, _ = inputs_embeds.shape
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    # `[B, T]` positions mean the same position on all M-RoPE axes, where M-RoPE equals plain RoPE
    # exactly: skip the per-axis frequency selection (decoding passes such positions every step).
    mrope_section = cfg.mrope_section if position_ids.ndim == 3 else None
    cos, sin = rope.text_cos_sin(position_ids, cfg.dim_per_head, cfg.rope_theta, mrope_section)
    if cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      allowed = causal[None] & mask.astype(bool)[:, None, :]
      slot_mask = None
    else:
      slot_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
      slots = jnp.arange(cache.max_len)
      query_slot = cache.index + jnp.arange(t)
      allowed = (slots[None, :] <= query_slot[:, None])[None] & slot_mask.astype(bool)[:, None, :]
    x = constrain(inputs_embeds, 'batch', 'seq', None)
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.index)
      if self.remat:
        x, new = nnx.remat(lambda lyr, *a: lyr(*a))(layer, x, cos, sin, allowed, layer_cache)
      else:
        x, new = layer(x, cos, sin, allowed, layer_cache)
      if new is not None:
        new_k.append(new[0])
        new_v.append(new[1])
    x = self.norm(x)
    if cache is None:
      return x, None
    pos = position_ids if position_ids.ndim == 2 else position_ids.max(axis=0)
    chunk_next = jnp.where(mask > 0, pos + 1, 0).max(axis=1)
    cache = KVCache(k=tuple(new_k), v=tuple(new_v), mask=slot_mask, index=cache.index + t,
                    next_position=jnp.maximum(cache.next_position, chunk_next).astype(jnp.int32))
    return x, cache
