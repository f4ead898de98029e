"""dense == all_gather == ring on 8 simulated CPU devices (forward, metrics, gradients), and memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from afmrl_jax.losses import AGCLConfig, agcl_loss, agcl_loss_local, finalize_metrics

EXPLICIT = jax.sharding.AxisType.Explicit


def _inputs(seed, n=32, d=8, k=5, vocab=11):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, d)).astype(np.float32)
  c = (q + 0.8 * rng.normal(size=(n, d))).astype(np.float32)
  qt = rng.integers(0, vocab, size=(n, k)).astype(np.int32)
  ct = rng.integers(0, vocab, size=(n, k)).astype(np.int32)
  ct[5] = qt[n // 2 + 1]  # identical sets across devices
  qt[3] = 0
  idf = rng.uniform(0.2, 2.0, size=vocab).astype(np.float32)
  idf[0] = 0.0
  return q, c, qt, ct, idf, 3.0


def _step(config, strategy, axis_names, mesh, tile_size=None):
  def fn(q, c, qt, ct, idf, avg):
    return agcl_loss(q, c, qt, ct, idf, avg, config, strategy=strategy, axis_names=axis_names, mesh=mesh,
                     tile_size=tile_size)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


CONFIGS = [
    AGCLConfig(),
    AGCLConfig(mask="margin", delta=-0.2, symmetric=True),
    AGCLConfig(mask="positive", delta=0.1, bm25_norm="none", bias_on="all"),
    AGCLConfig(mask="attribute", mask_threshold=0.7, symmetric=True, bm25_impl="compare"),
    AGCLConfig.published(mask="attribute", bm25_impl="gather"),
    AGCLConfig(uniform_margin=2.0, mask="positive", delta=0.3, symmetric=True),
    AGCLConfig.infonce(),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mask}-{c.bm25_norm}-{c.bias_on}-sym{int(c.symmetric)}-a{c.bias_scale}")
def test_strategies_agree(config):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(EXPLICIT, EXPLICIT))
  inputs = _inputs(CONFIGS.index(config))
  (ref_loss, ref_metrics), ref_grads = _step(config, "dense", (), None)(*inputs)
  # ring with whole [4, 4] blocks or (every other config) [4, 2] tiles, two per block.
  for strategy, tile in (("all_gather", None), ("ring", 2 if CONFIGS.index(config) % 2 else None)):
    (loss, metrics), grads = _step(config, strategy, ("data", "fsdp"), mesh, tile)(*inputs)
    assert _rel(loss, ref_loss) < 1e-5, strategy
    for key, value in ref_metrics.items():
      np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-5, atol=1e-6, err_msg=f"{strategy} {key}")
    for got, ref in zip(grads, ref_grads):
      assert _rel(got, ref) < 1e-5, (strategy, _rel(got, ref))
