"""An independent NumPy (float64) implementation of the AGCL loss and BM25, and its own sanity tests.

Written from METHOD.md's formulas with plain loops and sets, sharing no code with afmrl_jax.losses;
the other tests/test_losses_*.py files compare the JAX strategies against it.
"""
from collections import Counter

import numpy as np
import pytest


def np_bm25(query_terms, doc_terms, idf, avg_doc_len, k1=1.2, b=0.75):
  """B [Bq, Bd]: sum over the query's (non-padding) term list of idf * tf (k1 + 1) / (tf + k1 (...))."""
  out = np.zeros((len(query_terms), len(doc_terms)))
  for j, doc in enumerate(doc_terms):
    words = [int(t) for t in doc if t != 0]
    counts, length = Counter(words), len(words)
    for i, query in enumerate(query_terms):
      for t in query:
        tf = counts.get(int(t), 0) if t != 0 else 0
        if tf:
          out[i, j] += idf[t] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avg_doc_len))
  return out


def _term_set(row):
  return frozenset(int(t) for t in row if t != 0)


def np_agcl_direction(q, c, q_terms, c_terms, idf, avg_doc_len, cfg, mined=None, mined_terms=None):
  """Per-row losses [N] and metrics of one direction; cfg is an AGCLConfig (read as plain fields).

  mined [M, D], mined_terms [M, K']: extra candidate columns after the N in-batch ones (never a
  positive), so the matrix is [N, N + M].
  """
  q = np.asarray(q, np.float64)
  c = np.asarray(c, np.float64)
  n = len(q)
  if mined is not None:
    c = np.concatenate([c, np.asarray(mined, np.float64)])
    c_terms = list(c_terms) + list(mined_terms)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  cn = c / np.linalg.norm(c, axis=1, keepdims=True)
  eye = np.eye(n, len(c), dtype=bool)
  s = qn @ cn.T
  needs_bm25 = (cfg.uniform_margin is None and cfg.bias_scale != 0) or cfg.mask == "attribute"
  raw = np_bm25(q_terms, c_terms, idf, avg_doc_len, cfg.k1, cfg.b) if needs_bm25 else None
  ratio = None
  if raw is not None:
    diag = np.diag(raw[:, :n])
    ratio = np.zeros_like(raw)
    for i in range(n):
      if diag[i] > 0:
        ratio[i] = raw[i] / diag[i]
  if cfg.uniform_margin is not None:
    bias = np.where(eye, 0.0, cfg.uniform_margin)
  elif cfg.bias_scale == 0:
    bias = np.zeros(s.shape)
  else:
    normed = raw if cfg.bm25_norm == "none" else 2 * np.clip(ratio, 0, 1)
    bias = cfg.bias_scale * np.tanh(normed)
    if cfg.bias_on == "negatives":
      bias[eye] = 0.0
  mask = np.zeros(s.shape, bool)
  for i in range(n):
    for j in range(len(c)):
      if i == j:
        continue
      if cfg.mask == "margin":
        mask[i, j] = s[i, j] > s[i, i] + cfg.delta
      elif cfg.mask == "positive":
        mask[i, j] = cn[j] @ cn[i] > cfg.delta
      elif cfg.mask == "attribute":
        a, bset = _term_set(q_terms[i]), _term_set(c_terms[j])
        mask[i, j] = bool(a) and a == bset
        if cfg.mask_threshold is not None:
          mask[i, j] |= ratio[i, j] > cfg.mask_threshold
  logits = s / cfg.tau + bias
  losses = np.zeros(n)
  correct = 0
  for i in range(n):
    keep = ~mask[i]
    row = logits[i, keep]
    top = row.max()
    losses[i] = top + np.log(np.exp(row - top).sum()) - logits[i, i]
    candidates = np.flatnonzero(keep)
    correct += candidates[np.argmax(s[i, keep])] == i
  neg = ~eye
  metrics = {"accuracy": correct / n, "masked_fraction": mask[neg].mean()}
  if raw is not None:
    shared = (raw > 0) & neg
    unshared = (raw <= 0) & neg
    metrics.update(shared_fraction=shared.sum() / neg.sum(),
                   bias_shared=bias[shared].mean() if shared.any() else 0.0,
                   bias_unshared=bias[unshared].mean() if unshared.any() else 0.0,
                   weight_shared=np.exp(bias[shared]).mean() if shared.any() else 0.0,
                   weight_unshared=np.exp(bias[unshared]).mean() if unshared.any() else 0.0)
  return losses, metrics


def np_agcl_loss(q, c, q_terms, c_terms, idf, avg_doc_len, cfg, mined=None, mined_terms=None):
  """Mean loss (both directions averaged when symmetric) and the query->candidate metrics.

  mined columns (see np_agcl_direction) enter the query->candidate direction only.
  """
  losses, metrics = np_agcl_direction(q, c, q_terms, c_terms, idf, avg_doc_len, cfg, mined, mined_terms)
  if cfg.symmetric:
    back, _ = np_agcl_direction(c, q, c_terms, q_terms, idf, avg_doc_len, cfg)
    losses = 0.5 * (losses + back)
  return losses.mean(), metrics


def np_numeric_grad(fn, x, eps=1e-6):
  """Central finite differences of a scalar float64 function."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[index] += eps
    down[index] -= eps
    grad[index] = (fn(up) - fn(down)) / (2 * eps)
  return grad


def test_np_bm25_hand_computed():
  # query [1, 2]; doc [1, 1, 3] (len 3), avg len 3 -> norm = k1; term 1: tf 2, term 2 absent.
  idf = np.array([0.0, 0.5, 2.0, 1.0])
  got = np_bm25([[1, 2, 0]], [[1, 1, 3]], idf, 3.0, k1=1.2, b=0.75)
  assert got[0, 0] == pytest.approx(0.5 * 2 * 2.2 / (2 + 1.2))


def test_np_reference_infonce_is_cross_entropy():
  from afmrl_jax.losses import AGCLConfig
  rng = np.random.default_rng(0)
  q, c = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  loss, _ = np_agcl_loss(q, c, None, None, None, 1.0, AGCLConfig.infonce(tau=0.1))
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  cn = c / np.linalg.norm(c, axis=1, keepdims=True)
  logits = qn @ cn.T / 0.1
  expected = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
  assert loss == pytest.approx(expected, rel=1e-12)
