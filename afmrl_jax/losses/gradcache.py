"""GradCache: contrastive training with a global batch limited by the loss, not by activations.

Gao et al. 2021 ("Scaling deep contrastive learning batch size under memory limited setup"):
  1. embed the whole batch in chunks with no activations kept (lax.scan, no gradient);
  2. take the loss and its gradient w.r.t. the embeddings (the only [B, D] tensors kept);
  3. re-run each chunk's forward pass under `jax.vjp` and pull the embedding gradient back into the
     parameters, one chunk at a time (lax.scan), summing.
Peak activation memory is that of one chunk; the result equals direct autodiff of
loss_fn(encode(params, batch_1), encode(params, batch_2), ...).

  step = grad_cache(encode_fn, loss_fn, chunk_size=64)
  (loss, aux), grads = step(params, (query_batch, candidate_batch), *loss_args)

encode_fn(params, chunk) -> [chunk, D]; every input is a pytree of arrays with leading batch size B
(a multiple of chunk_size); loss_fn(emb_1, ..., emb_n, *loss_args) -> (loss, aux).
With a batch sharded over Explicit mesh axes (params on the same mesh, inside `jax.set_mesh`), each
chunk is resharded over those axes (an all-to-all of the inputs), so every device encodes its share of
every chunk; chunk_size must then be a multiple of the number of batch shards.
Encoders with randomness (dropout) must derive their keys from the chunk contents so that the second
pass sees the same masks as the first.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def _batch_axes(x):
  """(mesh, spec) when dim 0 of x is sharded over Explicit mesh axes, else None."""
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # noqa: BLE001 - typeof/sharding not available: treat as unsharded
    return None
  spec = getattr(sharding, "spec", None)
  if spec is None or len(spec) == 0 or spec[0] is None:
    return None
  return sharding.mesh, tuple(spec) + (None,) * (x.ndim - len(spec))


def _split(x, chunk_size: int):
  """[B, ...] -> [B // chunk_size, chunk_size, ...]; an Explicit batch sharding moves to dim 1, so
  every chunk is spread over the devices."""
  if x.shape[0] % chunk_size:
    raise ValueError(f"grad_cache: batch size {x.shape[0]} is not a multiple of chunk_size {chunk_size}")
  shape = (x.shape[0] // chunk_size, chunk_size) + x.shape[1:]
  sharded = _batch_axes(x)
  if sharded is None:
    return x.reshape(shape)
  mesh, spec = sharded
  return jax.lax.reshape(x, shape, out_sharding=NamedSharding(mesh, P(None, *spec)))


def _merge(x, like):
  """[n, chunk, ...] -> [n * chunk, ...], sharded like `like` (the batch it came from)."""
  shape = (x.shape[0] * x.shape[1],) + x.shape[2:]
  sharded = _batch_axes(like)
  if sharded is None:
    return x.reshape(shape)
  mesh, spec = sharded
  return jax.lax.reshape(x, shape, out_sharding=NamedSharding(mesh, P(spec[0], *([None] * (len(shape) - 1)))))


def _chunked(tree, chunk_size: int):
  return jax.tree.map(lambda x: _split(x, chunk_size), tree)


def grad_cache(encode_fn: Callable, loss_fn: Callable, chunk_size: int) -> Callable:
  """Returns step(params, inputs: tuple of batch pytrees, *loss_args) -> ((loss, aux), grads)."""
  if chunk_size <= 0:
    raise ValueError(f"grad_cache: chunk_size must be positive, got {chunk_size}")

  def embed(params, batch):
    def body(_, chunk):
      return None, jax.lax.stop_gradient(encode_fn(params, chunk))
    _, emb = jax.lax.scan(body, None, _chunked(batch, chunk_size))
    return _merge(emb, jax.tree.leaves(batch)[0])

  def backprop(params, batch, emb_grad, grads):
    def body(acc, xs):
      chunk, g = xs
      _, pull = jax.vjp(lambda p: encode_fn(p, chunk), params)
      (chunk_grads,) = pull(g.astype(jnp.result_type(g)))
      return jax.tree.map(jnp.add, acc, chunk_grads), None
    grads, _ = jax.lax.scan(body, grads, (_chunked(batch, chunk_size), _chunked(emb_grad, chunk_size)))
    return grads

  def step(params, inputs, *loss_args):
    inputs = tuple(inputs)
    embs = tuple(embed(params, batch) for batch in inputs)
    argnums = tuple(range(len(embs)))
    (loss, aux), emb_grads = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)(*embs, *loss_args)
    grads = jax.tree.map(jnp.zeros_like, params)
    for batch, emb_grad in zip(inputs, emb_grads):
      grads = backprop(params, batch, emb_grad, grads)
    return (loss, aux), grads

  return step
