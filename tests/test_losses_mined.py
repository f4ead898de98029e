"""Mined hard-negative columns: dense, all_gather and ring (8 simulated CPU devices) against the NumPy
reference on the extended [B, B(1+h)] matrix (loss, metrics, gradients w.r.t. q, c and mined); h = 0 is
the plain loss bit for bit; GradCache with mined inputs equals direct autodiff."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from afmrl_jax.losses import AGCLConfig, agcl_loss, grad_cache
from tests.test_losses_gradcache import _encode, _mlp_params
from tests.test_losses_numpy_reference import np_agcl_loss, np_numeric_grad
from tests.test_losses_sharded import EXPLICIT, _inputs, _rel

AXES = ("data", "fsdp")
N, D, H, K_MINED = 16, 4, 2, 6  # 2 rows per device; mined terms wider than the candidates' (5)


def _mined(seed, q, qt, h=H, k=K_MINED, vocab=11):
  """Hard negatives near their own query, [n, h, D], with terms [n, h, k] (one identical to query 1's)."""
  rng = np.random.default_rng(seed + 100)
  mined = (q[:, None, :] + 0.6 * rng.normal(size=(len(q), h, q.shape[1]))).astype(np.float32)
  terms = rng.integers(0, vocab, size=(len(q), h, k)).astype(np.int32)
  terms[1, 0] = np.pad(qt[1][::-1], (0, k - qt.shape[1]))  # same term set as query 1: attribute mask
  terms[4, 1] = 0  # a mined column without attributes
  return mined, terms


CONFIGS = [
    AGCLConfig.infonce(symmetric=True),  # the candidate->query direction leaves mined columns out
    AGCLConfig(uniform_margin=2.0, mask="positive", delta=0.5),
    AGCLConfig(),
    AGCLConfig(mask="attribute", mask_threshold=0.7),
    AGCLConfig.published(mask="margin", delta=-0.1),
]
STRATEGIES = ("dense", "all_gather", "ring")


def _case(index):
  q, c, qt, ct, idf, avg = _inputs(index, n=N, d=D)
  return (q, c, qt, ct, idf, avg) + _mined(index, q, qt)


@functools.lru_cache(maxsize=None)
def _reference(index):
  """NumPy loss, metrics and finite-difference gradients (q, c, mined) of config `index`."""
  q, c, qt, ct, idf, avg, mined, mt = _case(index)
  config = CONFIGS[index]
  flat = lambda x: x.reshape(-1, x.shape[-1])

  def loss(q, c, mined):
    return np_agcl_loss(q, c, qt, ct, idf, avg, config, flat(mined), flat(mt))

  value, metrics = loss(q, c, mined)
  grads = (np_numeric_grad(lambda x: loss(x, c, mined)[0], q),
           np_numeric_grad(lambda x: loss(q, x, mined)[0], c),
           np_numeric_grad(lambda x: loss(q, c, x)[0], mined))
  return value, metrics, grads


def _mesh():
  return jax.make_mesh((4, 2), AXES, axis_types=(EXPLICIT, EXPLICIT))


def _step(config, strategy, tile_size=None, with_mined=True):
  """jit(value_and_grad) of agcl_loss in (q, c[, mined]) for one strategy (sharded ones on _mesh())."""
  sharded = strategy != "dense"
  kwargs = dict(strategy=strategy, axis_names=AXES if sharded else (), mesh=_mesh() if sharded else None,
                tile_size=tile_size)

  def fn(q, c, mined, qt, ct, mt, idf, avg):
    return agcl_loss(q, c, qt, ct, idf, avg, config, mined=mined, mined_terms=mt, **kwargs)

  argnums = (0, 1, 2) if with_mined else (0, 1)
  return jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=lambda i: f"{CONFIGS[i].mask}-a{CONFIGS[i].bias_scale}-u{CONFIGS[i].uniform_margin}-sym{int(CONFIGS[i].symmetric)}")
def test_mined_matches_numpy_reference(index, strategy):
  assert jax.device_count() == 8
  config = CONFIGS[index]
  q, c, qt, ct, idf, avg, mined, mt = _case(index)
  # Ring: whole [2, 6] blocks, or [2, 3] tiles that mix in-batch and mined columns.
  tile = 4 if strategy == "ring" and index % 2 == 0 else None
  mt = mt if config.needs_bm25 else None  # not needed: filled in
  (loss, metrics), grads = _step(config, strategy, tile)(q, c, mined, qt, ct, mt, idf, avg)
  ref_loss, ref_metrics, ref_grads = _reference(index)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=2e-6)
  for key, value in ref_metrics.items():
    np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)
  for name, got, ref in zip(("q", "c", "mined"), grads, ref_grads):
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=1e-4,
                               err_msg=name)


def test_mined_columns_change_the_loss_and_are_masked():
  """The cases are not vacuous: mined columns raise the loss, and the masks reach them."""
  q, c, qt, ct, idf, avg, mined, mt = _case(3)
  plain, _ = np_agcl_loss(q, c, qt, ct, idf, avg, CONFIGS[2])
  assert _reference(2)[0] > plain + 0.1
  for index in (1, 3, 4):
    assert 0 < _reference(index)[1]["masked_fraction"] < 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_mined_columns_is_the_plain_loss_bitwise(strategy):
  config = AGCLConfig.infonce(symmetric=True)  # which code runs is decided before tracing, for any config
  q, c, qt, ct, idf, avg = _inputs(7, n=N, d=D)
  tile = 1 if strategy == "ring" else None
  (loss, metrics), grads = _step(config, strategy, tile, with_mined=False)(q, c, None, qt, ct, None, idf, avg)
  empty, empty_terms = np.zeros((N, 0, D), np.float32), np.zeros((N, 0, 3), np.int32)
  (loss0, metrics0), grads0 = _step(config, strategy, tile, with_mined=False)(
      q, c, empty, qt, ct, empty_terms, idf, avg)
  assert np.array_equal(np.asarray(loss), np.asarray(loss0))
  assert metrics.keys() == metrics0.keys()
  for key in metrics:
    assert np.array_equal(np.asarray(metrics[key]), np.asarray(metrics0[key])), key
  for got, ref in zip(grads, grads0):
    assert np.array_equal(np.asarray(got), np.asarray(ref))


def test_flat_mined_equals_per_query_layout():
  """mined [B*h, D] (what an encoder gives for flattened inputs) is the same as [B, h, D]."""
  config = AGCLConfig()
  q, c, qt, ct, idf, avg, mined, mt = _case(1)
  step = _step(config, "ring")
  (loss, metrics), grads = step(q, c, mined, qt, ct, mt, idf, avg)
  (loss_f, metrics_f), grads_f = step(q, c, mined.reshape(-1, D), qt, ct, mt.reshape(-1, K_MINED), idf, avg)
  assert _rel(loss_f, loss) < 1e-6
  for key in metrics:
    np.testing.assert_allclose(float(metrics_f[key]), float(metrics[key]), rtol=1e-6, err_msg=key)
  for got, ref in zip(grads_f, grads):
    assert _rel(np.reshape(got, np.shape(ref)), ref) < 1e-6


def test_mined_terms_required_with_attributes():
  q, c, qt, ct, idf, avg, mined, _ = _case(0)
  with pytest.raises(ValueError, match="mined_terms is None"):
    agcl_loss(q, c, qt, ct, idf, avg, AGCLConfig(), mined=mined)
  with pytest.raises(ValueError, match=r"\[B, h, D\]"):
    agcl_loss(q, c, qt, ct, idf, avg, AGCLConfig.infonce(), mined=mined[:4])


def _gradcache_case(seed, n, h, k=4, vocab=9):
  rng = np.random.default_rng(seed)
  x = {side: rng.normal(size=(rows, 6)).astype(np.float32) for side, rows in (("q", n), ("c", n), ("m", n * h))}
  terms = {side: rng.integers(0, vocab, size=(rows, k)).astype(np.int32)
           for side, rows in (("q", n), ("c", n), ("m", n * h))}
  idf = np.linspace(0.0, 1.5, vocab).astype(np.float32)
  return x, terms, idf


def _check_gradcache(params, x, terms, loss_fn, chunk, put=lambda a: a):
  """grad_cache over (queries, candidates, mined inputs [B*h, ...]) equals direct autodiff."""
  def direct(params):
    q, c, m = (_encode(params, {"x": x[s]}) for s in ("q", "c", "m"))
    return loss_fn(q, c, m, terms["q"], terms["c"], terms["m"])

  (ref_loss, ref_metrics), ref_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)
  step = jax.jit(grad_cache(_encode, loss_fn, chunk_size=chunk))
  inputs = tuple({"x": put(x[s])} for s in ("q", "c", "m"))
  (loss, metrics), grads = step(params, inputs, *(put(terms[s]) for s in ("q", "c", "m")))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), float(ref_metrics["accuracy"]))
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)


def test_gradcache_with_mined_inputs():
  x, terms, idf = _gradcache_case(0, n=24, h=2)
  config = AGCLConfig()

  def loss_fn(q, c, m, qt, ct, mt):
    return agcl_loss(q, c, qt, ct, idf, 3.0, config, mined=m, mined_terms=mt)

  _check_gradcache(_mlp_params(jax.random.key(0)), x, terms, loss_fn, chunk=8)


def test_gradcache_with_mined_inputs_sharded_ring():
  """Batch and mined inputs sharded over 8 devices (Explicit), ring loss: same as direct autodiff."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(EXPLICIT,))
  x, terms, idf = _gradcache_case(1, n=16, h=3)

  def loss_fn(q, c, m, qt, ct, mt):
    return agcl_loss(q, c, qt, ct, idf, 3.0, AGCLConfig(uniform_margin=1.0, mask="margin", delta=0.0),
                     mined=m, mined_terms=mt, strategy="ring", axis_names=("data",))

  with jax.set_mesh(mesh):
    params = jax.device_put(_mlp_params(jax.random.key(2)), NamedSharding(mesh, P()))
    _check_gradcache(params, x, terms, loss_fn, chunk=8,
                     put=lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))))
