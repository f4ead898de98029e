"""Dense AGCL and on-device BM25 against the independent NumPy reference (loss, metrics, gradients)."""
import itertools
import zlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from afmrl_jax.losses import AGCLConfig, agcl_loss, bm25_scores, term_set_fingerprint
from tests.test_losses_numpy_reference import np_agcl_loss, np_bm25, np_numeric_grad

VOCAB = 9


def _inputs(seed, n=8, d=5, k=4, vocab=VOCAB):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, d)).astype(np.float32)
  c = (q + 0.7 * rng.normal(size=(n, d))).astype(np.float32)  # positives close enough to matter
  # Small vocabulary: repeats inside rows, shared terms across rows, identical sets, empty rows.
  q_terms = rng.integers(0, vocab, size=(n, k)).astype(np.int32)
  c_terms = rng.integers(0, vocab, size=(n, k)).astype(np.int32)
  c_terms[1] = q_terms[0][::-1]  # row 0's query has the same set as candidate 1
  q_terms[2] = 0  # a row without attributes
  idf = rng.uniform(0.2, 2.0, size=vocab).astype(np.float32)
  idf[0] = 0.0
  return q, c, q_terms, c_terms, idf, 2.5


@pytest.mark.parametrize("impl", ["auto", "matmul", "gather", "compare"])
def test_bm25_matches_numpy_random(impl):
  _, _, qt, ct, idf, avg = _inputs(0, n=12, k=6)
  got = bm25_scores(qt, ct, idf, avg, k1=1.5, b=0.6, impl=impl)
  np.testing.assert_allclose(np.asarray(got), np_bm25(qt, ct, idf, avg, 1.5, 0.6), rtol=1e-5, atol=1e-6)


def test_bm25_hand_made():
  idf = np.array([0.0, 0.5, 2.0, 1.0], np.float32)
  # doc 0 = [1, 1, 3]: len 3 = avg -> term 1 with tf 2 scores 0.5 * 2 * 2.2 / (2 + 1.2).
  # doc 1 = [2] (len 1): term 2 tf 1, norm = 1.2 * (0.25 + 0.75 / 3).
  got = np.asarray(bm25_scores(np.array([[1, 2, 0]]), np.array([[1, 1, 3], [2, 0, 0]]), idf, 3.0))
  np.testing.assert_allclose(got[0], [0.5 * 2 * 2.2 / 3.2, 2.0 * 2.2 / (1 + 1.2 * (0.25 + 0.25))], rtol=1e-6)


def test_term_set_fingerprint_is_set_equality():
  rng = np.random.default_rng(3)
  terms = rng.integers(0, 5, size=(60, 4)).astype(np.int32)
  fp = np.asarray(term_set_fingerprint(terms))
  for i, j in itertools.combinations(range(60), 2):
    same = set(terms[i]) - {0} == set(terms[j]) - {0}
    assert same == bool(np.all(fp[i] == fp[j])), (terms[i], terms[j])


CONFIGS = [
    AGCLConfig(mask=mask, bm25_norm=norm, symmetric=sym,
               delta={"margin": -0.3, "positive": 0.2}.get(mask, 0.1),
               mask_threshold=0.6 if mask == "attribute" and norm == "self" else None)
    for mask, norm, sym in itertools.product(("none", "margin", "positive", "attribute"), ("self", "none"),
                                             (False, True))
] + [
    AGCLConfig.published(),
    AGCLConfig(bias_on="all", bias_scale=2.0),
    AGCLConfig(uniform_margin=1.5, symmetric=True),
    AGCLConfig.infonce(tau=0.1, symmetric=True),
]


def _jax_loss(config):
  def fn(q, c, qt, ct, idf, avg):
    return agcl_loss(q, c, qt, ct, idf, avg, config, strategy="dense")
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mask}-{c.bm25_norm}-{c.bias_on}-sym{int(c.symmetric)}-a{c.bias_scale}-u{c.uniform_margin}")
def test_dense_matches_numpy(config):
  q, c, qt, ct, idf, avg = _inputs(zlib.crc32(repr(config).encode()) % 1000)
  (loss, metrics), (gq, gc) = _jax_loss(config)(q, c, qt, ct, idf, avg)
  ref_loss, ref_metrics = np_agcl_loss(q, c, qt, ct, idf, avg, config)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=2e-6)  # float32 lse - l_ii
  for key, value in ref_metrics.items():
    np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)
  ref_gq = np_numeric_grad(lambda x: np_agcl_loss(x, c, qt, ct, idf, avg, config)[0], q)
  ref_gc = np_numeric_grad(lambda x: np_agcl_loss(q, x, qt, ct, idf, avg, config)[0], c)
  for got, ref in ((gq, ref_gq), (gc, ref_gc)):
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=1e-4)


def test_masks_actually_mask():
  """The parametrised configs exercise every mask with a non-trivial masked fraction."""
  for config in CONFIGS:
    if config.mask != "none":
      q, c, qt, ct, idf, avg = _inputs(zlib.crc32(repr(config).encode()) % 1000)
      fraction = np_agcl_loss(q, c, qt, ct, idf, avg, config)[1]["masked_fraction"]
      assert 0 < fraction < 1, (config, fraction)


def test_infonce_equals_optax_cross_entropy():
  q, c, _, _, _, _ = _inputs(5, n=16)
  loss, metrics = agcl_loss(q, c, None, None, None, None, AGCLConfig.infonce(tau=0.07))
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  cn = c / np.linalg.norm(c, axis=1, keepdims=True)
  logits = jnp.asarray(qn @ cn.T / 0.07)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(16)).mean()
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["accuracy"]), float(jnp.mean(jnp.argmax(logits, 1) == jnp.arange(16))))
  # No attributes: the attribute diagnostics are unknown, so absent (not 0, and no NaN for metrics.json).
  assert not {"shared_fraction", "bias_shared", "bias_unshared", "weight_shared", "weight_unshared"} & set(metrics)


def test_default_is_measured_best_form():
  config = AGCLConfig()
  assert (config.bm25_norm, config.bias_on, config.bias_scale, config.tau, config.mask) == ("self", "negatives", 4.0, 0.05, "none")
  published = AGCLConfig.published()
  assert (published.bm25_norm, published.bias_on, published.bias_scale) == ("none", "all", 1.0)


@pytest.mark.parametrize("field,value", [("tau", 0.0), ("bm25_norm", "bad"), ("bias_on", "x"), ("mask", "y"), ("b", 2.0)])
def test_config_errors_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"AGCLConfig.{field}"):
    AGCLConfig(**{field: value})


def test_missing_terms_is_a_clear_error():
  q, c, *_ = _inputs(0)
  with pytest.raises(ValueError, match="q_terms is None"):
    agcl_loss(q, c, None, None, None, None, AGCLConfig())


def test_import_is_light():
  code = ("import sys, afmrl_jax.losses; bad = [m for m in ('tensorflow', 'transformers', 'torch', 'scann', "
          "'grain', 'tensorflow_datasets', 'flax') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
