"""GradCache gives the same loss and parameter gradients as direct autodiff, on a small MLP encoder."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from afmrl_jax.losses import AGCLConfig, agcl_loss, grad_cache


def _mlp_params(key, sizes=(6, 16, 8)):
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    key, k_w, k_b = jax.random.split(key, 3)
    params.append({"w": jax.random.normal(k_w, (fan_in, fan_out)) / np.sqrt(fan_in),
                   "b": 0.1 * jax.random.normal(k_b, (fan_out,))})
  return params


def _encode(params, batch):
  x = batch["x"]
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      x = jnp.tanh(x)
  return x


def test_gradcache_equals_direct_autodiff():
  rng = np.random.default_rng(0)
  n = 24
  queries = {"x": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32)}
  candidates = {"x": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32)}
  terms = jnp.asarray(rng.integers(0, 7, size=(2, n, 4)), jnp.int32)
  idf = jnp.asarray(rng.uniform(0.1, 2, size=7), jnp.float32).at[0].set(0.0)
  config = AGCLConfig(mask="margin", delta=0.0, symmetric=True)
  params = _mlp_params(jax.random.key(0))

  def loss_fn(q, c, q_terms, c_terms):
    return agcl_loss(q, c, q_terms, c_terms, idf, 3.0, config)

  def direct(params):
    return loss_fn(_encode(params, queries), _encode(params, candidates), terms[0], terms[1])

  (ref_loss, ref_metrics), ref_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)
  step = jax.jit(grad_cache(_encode, loss_fn, chunk_size=8))
  (loss, metrics), grads = step(params, (queries, candidates), terms[0], terms[1])
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["accuracy"]), float(ref_metrics["accuracy"]))
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_gradcache_sharded_batch_with_ring_loss():
  """Explicit mesh over 8 devices, batch sharded over 'data', the ring loss: same as direct autodiff."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(1)
  n = 64
  qx, cx = (rng.normal(size=(n, 6)).astype(np.float32) for _ in range(2))
  qt, ct = (rng.integers(0, 9, size=(n, 4)).astype(np.int32) for _ in range(2))
  idf = np.linspace(0.0, 1.5, 9).astype(np.float32)
  params = _mlp_params(jax.random.key(2))
  config = AGCLConfig(symmetric=True)

  def direct(params):
    return agcl_loss(_encode(params, {"x": qx}), _encode(params, {"x": cx}), qt, ct, idf, 3.0, config)

  (ref_loss, _), ref_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)

  def ring_loss(q, c, q_terms, c_terms):
    return agcl_loss(q, c, q_terms, c_terms, idf, 3.0, config, strategy="ring", axis_names=("data",))

  with jax.set_mesh(mesh):
    batch = NamedSharding(mesh, P("data"))
    sharded_params = jax.device_put(params, NamedSharding(mesh, P()))
    q_in, c_in = ({"x": jax.device_put(x, batch)} for x in (qx, cx))
    (loss, _), grads = jax.jit(grad_cache(_encode, ring_loss, chunk_size=16))(
        sharded_params, (q_in, c_in), jax.device_put(qt, batch), jax.device_put(ct, batch))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)


def test_gradcache_rejects_ragged_batch():
  params = _mlp_params(jax.random.key(1))
  step = grad_cache(_encode, lambda q, c: (jnp.sum(q * c), None), chunk_size=5)
  x = {"x": jnp.ones((12, 6))}
  try:
    step(params, (x, x))
  except ValueError as error:
    assert "chunk_size 5" in str(error)
  else:
    raise AssertionError("expected a ValueError for 12 rows in chunks of 5")
