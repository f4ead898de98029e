"""The stage-1 objective on a tiny Qwen2-VL model: GradCache equals autodiff, strategies agree,
sharded step equals a single-device step, parity of the loss with a NumPy InfoNCE reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from afmrl_jax import parallel
from afmrl_jax.losses import AGCLConfig
from afmrl_jax.models.config import VLConfig
from afmrl_jax.models.vl_model import VLModel
from afmrl_jax.stages.stage1 import objective as stage1_step
from afmrl_jax.train import state as state_lib
from afmrl_jax.eval import embed as embed_lib

import configs.stage1 as stage1_configs

GRID = (1, 4, 4)  # 56x56 images: 16 patches, 4 merged image tokens
B, T, K = 8, 10, 6


def tiny_vl():
  arch = stage1_configs.get_config("ci").model.arch.to_dict()
  arch.update(vocab_size=64, image_token_id=60, vision_start_token_id=61, vision_end_token_id=62)
  return VLConfig.from_hf_dict(arch)


def make_batch(seed=0, h=0):
  """A batch of B query / candidate pairs; with `h`, also h mined negatives per query (`mined_*` [B, h, ...])."""
  rng = np.random.default_rng(seed)
  batch = {}
  for s in ("query", "candidate") + (("mined",) if h else ()):
    ids = rng.integers(1, 59, size=(B, T)).astype(np.int32)
    ids[:, 1] = 61
    ids[:, 2:6] = 60
    ids[:, 6] = 62
    mask = np.ones((B, T), np.int32)
    pad = rng.integers(0, 4, size=B)
    for i, p in enumerate(pad):  # left padding
      if p:
        mask[i, :p] = 0
        ids[i, :p] = 0
    # keep the image tokens real: shift them right of the padding (pad <= 3 < 1st image slot would break)
    ids[:, :1] = np.where(mask[:, :1] == 1, ids[:, :1], 0)
    batch[f"{s}_input_ids"] = ids
    batch[f"{s}_attention_mask"] = np.maximum(mask, (ids >= 60).astype(np.int32))
    batch[f"{s}_pixel_values"] = rng.normal(size=(B, 16, 1176)).astype(np.float32)
    batch[f"{s}_terms"] = rng.integers(0, 20, size=(B, K)).astype(np.int32)
  if h:  # h rows per query: the mined side drawn for B * h rows
    more = make_batch(seed + 1, 0) if h > 1 else None
    for key in [k for k in batch if k.startswith("mined_")]:
      rows = batch[key] if h == 1 else np.concatenate([batch[key], more[key.replace("mined", "query")]])
      batch[key] = rows.reshape((h, B) + rows.shape[1:]).swapaxes(0, 1)
  return batch


def mesh_of(shape):
  n = int(np.prod(list(shape.values())))
  return parallel.make_mesh(shape, devices=jax.devices()[:n])


def build():
  return VLModel(tiny_vl(), rngs=nnx.Rngs(0))


IDF = np.linspace(0.0, 2.0, 20).astype(np.float32)


def grads_of(mesh_shape, strategy, gradcache_chunk=0, config=AGCLConfig(), h=0):
  mesh = mesh_of(mesh_shape)
  model = state_lib.create_sharded(build, mesh, nnx.Param)
  agcl = stage1_step.make_agcl(config, strategy, IDF, 3.0)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if gradcache_chunk:
    grad_fn = stage1_step.make_gradcache_grad_fn(model.graphdef, agcl, GRID, gradcache_chunk, shards)
  else:
    loss_fn = stage1_step.make_loss_fn(agcl, GRID)

    def grad_fn(params, rest, batch):
      return jax.value_and_grad(lambda p: loss_fn(nnx.merge(model.graphdef, p, rest), batch),
                                has_aux=True)(params)
  with jax.set_mesh(mesh), parallel.logical_rules():
    batch = parallel.global_batch(make_batch(h=h), mesh)
    (loss, metrics), grads = jax.jit(grad_fn)(model.params, model.rest, batch)
  return float(loss), jax.tree.map(np.asarray, grads)


def assert_trees_close(a, b, rtol, atol):
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    # float32 sums in another order (sharded / chunked): tolerance relative to the leaf's scale
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * max(1.0, float(np.abs(y).max())) + 1e-5 * float(np.abs(y).max()))


@pytest.fixture(scope="module")
def reference():
  return grads_of({"data": 1, "fsdp": 1, "tensor": 1}, "dense")


def test_infonce_matches_numpy(reference):
  """alpha=0: the loss is the mean cross-entropy of cos/tau logits with the diagonal as labels."""
  mesh = mesh_of({"data": 1, "fsdp": 1, "tensor": 1})
  model = state_lib.create_sharded(build, mesh, nnx.Param).merge()
  batch = make_batch()
  from afmrl_jax.models import heads
  loss_fn = stage1_step.make_loss_fn(stage1_step.make_agcl(AGCLConfig.infonce(), "dense", None, 1.0), GRID)

  @nnx.jit
  def run(model, batch):
    q = heads.embed(model, embed_lib.side(batch, "query"), GRID)
    c = heads.embed(model, embed_lib.side(batch, "candidate"), GRID)
    return q, c, loss_fn(model, batch)[0]

  q, c, loss = run(model, batch)
  q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
  logits = q @ c.T / 0.05
  logits -= logits.max(axis=1, keepdims=True)
  expected = np.mean(-np.diag(logits) + np.log(np.exp(logits).sum(axis=1)))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_sharded_all_gather_equals_dense(reference):
  loss, grads = grads_of({"data": 2, "fsdp": 2, "tensor": 2}, "all_gather")
  np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
  assert_trees_close(grads, reference[1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ring_equals_dense(reference):
  loss, grads = grads_of({"data": 4, "fsdp": 2, "tensor": 1}, "ring")
  np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
  assert_trees_close(grads, reference[1], rtol=1e-4, atol=1e-6)


def test_gradcache_equals_autodiff(reference):
  loss, grads = grads_of({"data": 4, "fsdp": 1, "tensor": 1}, "all_gather", gradcache_chunk=1)
  np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
  assert_trees_close(grads, reference[1], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def mined_reference():
  return grads_of({"data": 1, "fsdp": 1, "tensor": 1}, "dense", h=2)


def test_mined_negatives_change_the_loss_and_gradcache_and_sharding_agree(reference, mined_reference):
  """Two mined negatives per query as extra columns: the loss rises (more negatives); GradCache (the mined
  rows encoded in chunks) and the sharded ring equal plain autodiff on one device."""
  assert mined_reference[0] > reference[0]
  for shape, strategy, chunk in (({"data": 4, "fsdp": 1, "tensor": 1}, "all_gather", 1),
                                 ({"data": 2, "fsdp": 2, "tensor": 1}, "ring", 0)):
    loss, grads = grads_of(shape, strategy, gradcache_chunk=chunk, h=2)
    np.testing.assert_allclose(loss, mined_reference[0], rtol=1e-5)
    assert_trees_close(grads, mined_reference[1], rtol=1e-4, atol=1e-6)


def test_interleave_shards_takes_rows_from_every_shard():
  x = jnp.arange(12)
  # 3 shards of 4 rows, chunks of 2 rows per shard: [0,1 | 4,5 | 8,9], [2,3 | 6,7 | 10,11]
  np.testing.assert_array_equal(stage1_step.interleave_shards(x, 3, 2),
                                [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11])
