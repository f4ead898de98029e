"""The sharded AGCL from a user's point of view: meshes, jax.set_mesh, own shard_map, memory."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from afmrl_jax.losses import AGCLConfig, agcl_loss, agcl_loss_local, finalize_metrics
from tests.test_losses_sharded import EXPLICIT, _inputs, _rel, _step


def test_single_axis_and_auto_mesh_under_set_mesh():
  """One named axis of a 2-axis mesh (the other replicated), Auto axis types, mesh from jax.set_mesh."""
  mesh = jax.make_mesh((2, 4), ("model", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  config = AGCLConfig(mask="margin", delta=-0.1, symmetric=True)
  inputs = _inputs(11, n=16)
  (ref_loss, _), ref_grads = _step(config, "dense", (), None)(*inputs)
  with jax.set_mesh(mesh):
    (loss, _), grads = _step(config, "ring", ("data",), None, tile_size=1)(*inputs)
  assert _rel(loss, ref_loss) < 1e-5
  for got, ref in zip(grads, ref_grads):
    assert _rel(got, ref) < 1e-5


def test_local_inside_user_shard_map():
  """A user's own shard_map step calling agcl_loss_local on its shards (the train-step pattern)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(EXPLICIT,))
  config = AGCLConfig(mask="attribute")
  q, c, qt, ct, idf, avg = _inputs(2)

  def local_loss(q, c, qt, ct):
    per_row, _, sums = agcl_loss_local(q, c, qt, ct, idf, avg, config, strategy="ring", axis_names=("data",))
    return jax.lax.psum(jnp.sum(per_row), "data") / q.shape[0] / 8, sums

  spec = P("data")
  fn = jax.shard_map(local_loss, mesh=mesh, in_specs=(spec,) * 4, out_specs=(P(), P()))
  args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, c, qt, ct)]
  loss, sums = jax.jit(fn)(*args)
  ref_loss, ref_metrics = agcl_loss(q, c, qt, ct, idf, avg, config)
  assert _rel(loss, ref_loss) < 1e-5
  metrics = finalize_metrics(sums, 32, True)
  np.testing.assert_allclose(float(metrics["masked_fraction"]), float(ref_metrics["masked_fraction"]), rtol=1e-6)


def _temp_bytes(strategy, n, tile_size=None, d=32, k=8):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(EXPLICIT,))
  sharding = NamedSharding(mesh, P("data"))
  f32 = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sharding)
  i32 = jax.ShapeDtypeStruct((n, k), jnp.int32, sharding=sharding)
  idf = jax.ShapeDtypeStruct((64,), jnp.float32)
  step = _step(AGCLConfig(mask="positive"), strategy, ("data",), mesh, tile_size)
  return step.lower(f32, f32, i32, i32, idf, 3.0).compile().memory_analysis().temp_size_in_bytes


def test_ring_memory_is_linear_and_small():
  """Compile-only, N = 4096 (512 rows per device): all_gather holds [512, 4096] arrays; ring with
  128-column tiles holds [512, 128] ones, and doubling N at most doubles it (no [L, N], no [L, L, K, K])."""
  gathered = _temp_bytes("all_gather", 4096)
  ring = _temp_bytes("ring", 4096, tile_size=128)
  ring_2x = _temp_bytes("ring", 8192, tile_size=128)
  assert ring < gathered / 8, (ring, gathered)
  assert ring_2x < 2.2 * ring, (ring, ring_2x)
  assert ring < 24 * 512 * 128 * 4, ring  # a handful of [L, tile] float32 buffers
