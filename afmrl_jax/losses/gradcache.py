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

encode_fn(params, chunk) -> [chunk, D]; every input is a pytree of arrays with one leading size per
input (a multiple of chunk_size); loss_fn(emb_1, ..., emb_n, *loss_args) -> (loss, aux). Inputs may
differ in size: mined hard negatives, h per query, go in flattened as a third input [B * h, ...]
  step(params, (query_batch, candidate_batch, mined_batch), q_terms, c_terms, mined_terms)
with loss_fn(q, c, mined, ...) -> agcl_loss(..., mined=mined, mined_terms=...); they are encoded in
chunks of chunk_size rows like the others, so activation memory does not grow with h.
With a batch sharded over Explicit mesh axes (params on the same mesh, inside `jax.set_mesh`), every
chunk takes chunk_size / S rows from each of the S batch shards, sliced in place (no input is moved or
copied), so chunk_size must be a multiple of S.
Encoders with randomness (dropout) must derive their keys from the chunk contents so that the second
pass sees the same masks as the first.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


class _Layout:
  """How a batch [B, ...] is cut into chunks: every chunk takes chunk_size / S rows from each of the
  S shards of the batch dimension (S = 1 unless it is sharded over Explicit mesh axes), so chunks are
  sliced in place on every device, without moving or copying the batch."""

  def __init__(self, x, chunk_size: int):
    self.batch = x.shape[0]
    self.mesh, self.axes, self.shards = None, None, 1
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is not None and len(spec) and spec[0] is not None:
      self.mesh, self.axes = sharding.mesh, spec[0]
      for axis in (self.axes if isinstance(self.axes, tuple) else (self.axes,)):
        self.shards *= self.mesh.shape[axis]
    if chunk_size % self.shards or self.batch % chunk_size:
      raise ValueError(f"grad_cache: batch size {self.batch} must be a multiple of chunk_size {chunk_size}, "
                       f"itself a multiple of the {self.shards} batch shards")
    self.per_shard = chunk_size // self.shards  # rows a chunk takes from each shard
    self.num_chunks = self.batch // chunk_size

  def _reshape(self, x, shape):
    """Reshape keeping dim 0 sharded like the batch (Explicit axes need the output sharding named)."""
    if self.mesh is None:
      return x.reshape(shape)
    spec = P(self.axes, *([None] * (len(shape) - 1)))
    return jax.lax.reshape(x, shape, out_sharding=NamedSharding(self.mesh, spec))

  def view(self, x):
    """[B, ...] -> [S, num_chunks, per_shard, ...] (dim 0 the shards)."""
    return self._reshape(x, (self.shards, self.num_chunks, self.per_shard) + x.shape[1:])

  def chunk(self, view, index):
    """Chunk `index` of a view: [chunk_size, ...], sharded like the batch."""
    part = jax.lax.dynamic_index_in_dim(view, index, axis=1, keepdims=False)  # [S, per_shard, ...]
    return self._reshape(part, (part.shape[0] * part.shape[1],) + part.shape[2:])

  def unchunk(self, stacked):
    """Per-chunk outputs [num_chunks, chunk_size, ...] -> [B, ...] in the batch's row order."""
    rest = stacked.shape[2:]
    shape = (self.num_chunks, self.shards, self.per_shard) + rest
    if self.mesh is None:
      parts = stacked.reshape(shape)
    else:
      parts = jax.lax.reshape(stacked, shape, out_sharding=NamedSharding(self.mesh, P(None, self.axes)))
    parts = jnp.swapaxes(parts, 0, 1)  # [S, num_chunks, per_shard, ...]; a copy of [B, D] only
    return self._reshape(parts, (self.batch,) + rest)


def grad_cache(encode_fn: Callable, loss_fn: Callable, chunk_size: int) -> Callable:
  """Returns step(params, inputs: tuple of batch pytrees, *loss_args) -> ((loss, aux), grads)."""
  if chunk_size <= 0:
    raise ValueError(f"grad_cache: chunk_size must be positive, got {chunk_size}")

  def embed(params, batch):
    layout = _Layout(jax.tree.leaves(batch)[0], chunk_size)
    views = jax.tree.map(layout.view, batch)

    def body(_, index):
      chunk = jax.tree.map(lambda v: layout.chunk(v, index), views)
      return None, jax.lax.stop_gradient(encode_fn(params, chunk))
    _, emb = jax.lax.scan(body, None, jnp.arange(layout.num_chunks))
    return layout.unchunk(emb)

  def backprop(params, batch, emb_grad, grads):
    layout = _Layout(jax.tree.leaves(batch)[0], chunk_size)
    views, grad_view = jax.tree.map(layout.view, batch), layout.view(emb_grad)

    def body(acc, index):
      chunk = jax.tree.map(lambda v: layout.chunk(v, index), views)
      _, pull = jax.vjp(lambda p: encode_fn(p, chunk), params)
      (chunk_grads,) = pull(layout.chunk(grad_view, index))
      return jax.tree.map(jnp.add, acc, chunk_grads), None
    grads, _ = jax.lax.scan(body, grads, jnp.arange(layout.num_chunks))
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
