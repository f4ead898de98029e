"""rl.algo against NumPy and hand-computed values: advantages, clipping, KL, masks, aggregation, loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmrl_jax.rl import algo
from afmrl_jax.rl.algo import (
    AGGREGATIONS,
    GRPOConfig,
    aggregate_loss,
    clipped_policy_loss,
    compute_advantages,
    eos_mask,
    group_advantages,
    grpo_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    mean_only_advantages,
    token_mask,
)


# ----------------------------------------------------------------------------------------------------
# NumPy reference


def np_advantages(r, eps=1e-6):
  r = np.asarray(r, np.float64)
  centred = r - r.mean(axis=-1, keepdims=True)
  std = r.std(axis=-1, keepdims=True)  # ddof 0
  return np.where(std > 0, centred / (std + eps), 0.0)


def np_aggregate(x, mask, mode):
  x = np.where(mask, x, 0.0)
  if mode == "token_mean":
    return x.sum() / max(mask.sum(), 1)
  rows = [x[b][mask[b]].mean() for b in range(x.shape[0]) if mask[b].any()]
  return float(np.mean(rows)) if rows else 0.0


def np_grpo(logp, old, ref, adv, mask, clip_lo, clip_hi, beta, estimator, aggregation):
  """Loss and metrics, computed only where mask is True."""
  logp, old = np.where(mask, logp, 0.0), np.where(mask, old, 0.0)
  rho = np.exp(logp - old)
  a = np.broadcast_to(np.asarray(adv, np.float64)[:, None], logp.shape)
  a = np.where(mask, a, 0.0)
  unclipped, clipped_term = rho * a, np.clip(rho, 1 - clip_lo, 1 + clip_hi) * a
  policy = -np.minimum(unclipped, clipped_term)
  kl = np.zeros_like(policy)
  if ref is not None:
    d = np.where(mask, ref, 0.0) - logp
    kl = {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - d - 1}[estimator]
  per_token = policy + beta * kl if ref is not None else policy
  n = max(mask.sum(), 1)
  metrics = {
      "policy_loss": np.where(mask, policy, 0).sum() / n,
      "kl": np.where(mask, kl, 0).sum() / n,
      "clip_fraction": (mask & (clipped_term < unclipped)).sum() / n,
      "ratio_mean": np.where(mask, rho, 0).sum() / n,
      "tokens": mask.sum(),
  }
  return np_aggregate(per_token, mask, aggregation), metrics


# ----------------------------------------------------------------------------------------------------
# Advantages

REWARDS = np.array([[1.0, 0.0, 0.0, 0.0],   # one winner
                    [0.5, 0.5, 0.1, 0.9],   # a tie
                    [0.1, 0.1, 0.1, 0.1]],  # all equal
                   np.float32)


def test_group_advantages_hand_made():
  a = np.asarray(group_advantages(REWARDS))
  assert a.dtype == np.float32 and a.shape == (3, 4)
  s3, s2 = np.sqrt(3.0), np.sqrt(2.0)
  want = np.array([[s3, -1 / s3, -1 / s3, -1 / s3], [0.0, 0.0, -s2, s2], [0.0] * 4])
  np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a, np_advantages(REWARDS), rtol=1e-5, atol=1e-6)
  assert a[1, 0] == a[1, 1]  # equal rewards, equal advantages
  assert np.all(a[2] == 0.0)  # exactly, not tiny
  assert not np.isnan(a).any()


def test_group_advantages_random_and_eps():
  r = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
  np.testing.assert_allclose(group_advantages(r), np_advantages(r), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(group_advantages(r, eps=0.5), np_advantages(r, 0.5), rtol=1e-5, atol=1e-6)
  # Values whose float mean is not exactly one of them still give an exact 0 row.
  const = np.full((2, 7), 0.3, np.float32)
  assert np.all(np.asarray(group_advantages(const, eps=0.0)) == 0.0)


def test_mean_only_advantages():
  a = np.asarray(mean_only_advantages(REWARDS))
  want = REWARDS - REWARDS.mean(axis=1, keepdims=True)
  np.testing.assert_allclose(a, want, atol=1e-6)
  assert np.all(a[2] == 0.0)
  np.testing.assert_allclose(a[0], [0.75, -0.25, -0.25, -0.25], atol=1e-6)
  np.testing.assert_allclose(compute_advantages(REWARDS, GRPOConfig(advantage="mean_only")), a)
  np.testing.assert_allclose(compute_advantages(REWARDS), group_advantages(REWARDS))


# ----------------------------------------------------------------------------------------------------
# Clipped policy loss

# (advantage, ratio, loss, clipped, d loss / d logp) at eps_low = eps_high = 0.2.
CLIP_CASES = [
    (2.0, 1.5, -2.4, True, 0.0),    # A > 0, ratio above the band: clipped
    (-1.0, 0.5, 0.8, True, 0.0),    # A < 0, ratio below the band: clipped
    (2.0, 1.1, -2.2, False, -2.2),  # inside the band: -A * rho
    (-1.0, 1.1, 1.1, False, 1.1),
    (2.0, 0.5, -1.0, False, -1.0),  # A > 0 below the band: the unclipped term is the smaller
    (-1.0, 1.5, 1.5, False, 1.5),   # A < 0 above the band: likewise
]


def test_clipped_policy_loss_hand_made():
  adv = np.array([c[0] for c in CLIP_CASES], np.float32)
  old = np.full((len(CLIP_CASES), 1), -1.0, np.float32)
  logp = old + np.log(np.array([[c[1]] for c in CLIP_CASES], np.float32))
  loss, clipped = clipped_policy_loss(logp, old, adv)
  np.testing.assert_allclose(loss[:, 0], [c[2] for c in CLIP_CASES], rtol=1e-5)
  assert list(np.asarray(clipped[:, 0])) == [c[3] for c in CLIP_CASES]
  grad = jax.grad(lambda lp: jnp.sum(clipped_policy_loss(lp, old, adv)[0]))(jnp.asarray(logp))
  np.testing.assert_allclose(grad[:, 0], [c[4] for c in CLIP_CASES], rtol=1e-5, atol=1e-7)
  # old_logp and the advantages carry no gradient.
  g_old = jax.grad(lambda o: jnp.sum(clipped_policy_loss(logp, o, adv)[0]))(jnp.asarray(old))
  assert np.all(np.asarray(g_old) == 0.0)
  # [B, N] advantages give the same as [B] broadcast.
  loss2, _ = clipped_policy_loss(logp, old, adv[:, None])
  np.testing.assert_array_equal(loss, loss2)


def test_clip_asymmetric():
  """eps_high > eps_low (clip-higher): ratio 1.25 with A > 0 is inside [0.8, 1.28], outside [0.8, 1.2]."""
  logp, old, adv = np.log([[1.25]]).astype(np.float32), np.zeros((1, 1), np.float32), np.ones(1, np.float32)
  loss, clipped = clipped_policy_loss(logp, old, adv, 0.2, 0.28)
  np.testing.assert_allclose(loss, [[-1.25]], rtol=1e-6)
  assert not bool(clipped[0, 0])
  loss, clipped = clipped_policy_loss(logp, old, adv, 0.2, 0.2)
  np.testing.assert_allclose(loss, [[-1.2]], rtol=1e-6)
  assert bool(clipped[0, 0])


# ----------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators():
  rng = np.random.default_rng(1)
  logp = -np.abs(rng.normal(size=(4, 6))).astype(np.float32) * 2
  ref = (logp + rng.normal(size=(4, 6)) * 0.5).astype(np.float32)
  d = ref.astype(np.float64) - logp
  k3 = np.asarray(kl_k3(logp, ref))
  assert np.all(k3 >= 0)
  np.testing.assert_allclose(k3, np.exp(d) - d - 1, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(kl_k3(logp, logp)) == 0.0)
  np.testing.assert_allclose(kl_k1(logp, ref), -d, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kl_k2(logp, ref), 0.5 * d * d, rtol=1e-5, atol=1e-7)
  # Small differences: k3 ~ d^2 / 2 survives float32 (exp(d) - d - 1 would round to ~1e-7 or 0).
  np.testing.assert_allclose(kl_k3(jnp.float32(0.0), jnp.float32(1e-4)), 0.5e-8, rtol=1e-2)
  assert set(algo.KL_ESTIMATORS) == {"k1", "k2", "k3"}


# ----------------------------------------------------------------------------------------------------
# Masks


def test_masks_agree():
  eos = (2, 9)
  tokens = np.array([[5, 3, 2, 7, 0],   # EOS at 2, then padding
                     [2, 1, 6, 3, 4],   # EOS first
                     [1, 5, 3, 4, 5],   # no EOS: all True
                     [1, 9, 2, 4, 5],   # the second EOS id
                     [4, 2, 2, 2, 2]],  # repeated EOS after the first
                    np.int32)
  lengths = np.array([3, 1, 5, 2, 2])
  want = np.arange(5)[None, :] < lengths[:, None]
  m_eos, m_len = np.asarray(eos_mask(tokens, eos)), np.asarray(token_mask(lengths, 5))
  assert m_eos.dtype == bool and m_len.dtype == bool
  np.testing.assert_array_equal(m_eos, want)
  np.testing.assert_array_equal(m_len, want)
  assert m_eos[2].all()
  assert not m_eos[0, 3:].any()
  assert np.asarray(eos_mask(tokens, ())).all()
  np.testing.assert_array_equal(jax.jit(eos_mask, static_argnums=1)(tokens, eos), want)


# ----------------------------------------------------------------------------------------------------
# Aggregation


def test_aggregation_ragged():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  mask = token_mask(np.array([5, 2, 0, 3]), 5)  # row 2 has no tokens
  m = np.asarray(mask)
  for mode in ("sequence_mean", "token_mean"):
    np.testing.assert_allclose(aggregate_loss(x, mask, mode), np_aggregate(x, m, mode), rtol=1e-5)
  want_seq = (x[0].mean() + x[1, :2].mean() + x[3, :3].mean()) / 3
  np.testing.assert_allclose(aggregate_loss(x, mask, "sequence_mean"), want_seq, rtol=1e-5)
  np.testing.assert_allclose(aggregate_loss(x, mask, "token_mean"), x[m].sum() / 10, rtol=1e-5)


def test_aggregation_weights():
  """Four tokens of 1 and one token of 3: sequences weigh equally (2.0), or tokens do (1.4)."""
  x = np.array([[1, 1, 1, 1], [3, 0, 0, 0]], np.float32)
  mask = token_mask(np.array([4, 1]), 4)
  np.testing.assert_allclose(aggregate_loss(x, mask, "sequence_mean"), 2.0)
  np.testing.assert_allclose(aggregate_loss(x, mask, "token_mean"), 1.4)
  empty = np.zeros((2, 4), bool)
  assert float(aggregate_loss(x, empty, "sequence_mean")) == 0.0
  assert float(aggregate_loss(x, empty, "token_mean")) == 0.0
  with pytest.raises(ValueError, match="mode='foo'"):
    aggregate_loss(x, mask, "foo")


# ----------------------------------------------------------------------------------------------------
# grpo_loss


def _batch(seed=3, b=6, n=7):
  rng = np.random.default_rng(seed)
  logp = (-np.abs(rng.normal(size=(b, n))) * 2).astype(np.float32)
  old = (logp + 0.3 * rng.normal(size=(b, n))).astype(np.float32)  # enough spread to clip some tokens
  ref = (logp + 0.2 * rng.normal(size=(b, n))).astype(np.float32)
  adv = rng.normal(size=b).astype(np.float32)
  mask = np.asarray(token_mask(np.array([7, 3, 0, 5, 1, 6])[:b], n))
  return logp, old, ref, adv, mask


CONFIGS = [
    GRPOConfig(),
    GRPOConfig(aggregation="token_mean"),
    GRPOConfig(clip_eps_high=0.28, kl_estimator="k2", aggregation="token_mean"),
    GRPOConfig(kl_beta=0.0, kl_estimator="k1"),
    GRPOConfig(kl_beta=0.5, kl_estimator="k1"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.aggregation}-{c.kl_estimator}-{c.kl_beta}")
def test_grpo_loss_matches_numpy(config):
  logp, old, ref, adv, mask = _batch()
  loss, metrics = grpo_loss(logp, old, ref, adv, mask, config)
  want, want_metrics = np_grpo(logp, old, ref, adv, mask, config.clip_eps, config.clip_upper, config.kl_beta,
                               config.kl_estimator, config.aggregation)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  assert set(metrics) == set(want_metrics)
  for k, v in want_metrics.items():
    assert np.shape(metrics[k]) == ()
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  assert 0.0 < float(metrics["clip_fraction"]) < 1.0  # both branches are exercised
  assert float(metrics["tokens"]) == 22


def test_grpo_loss_without_reference_and_jit():
  logp, old, ref, adv, mask = _batch()
  no_ref, metrics = grpo_loss(logp, old, None, adv, mask)
  beta0, _ = grpo_loss(logp, old, ref, adv, mask, GRPOConfig(kl_beta=0.0))
  np.testing.assert_allclose(no_ref, beta0, rtol=1e-6)
  assert float(metrics["kl"]) == 0.0
  eager, m_eager = grpo_loss(logp, old, ref, adv, mask, CONFIGS[2])
  jitted, m_jit = jax.jit(grpo_loss, static_argnames="config")(logp, old, ref, adv, mask, config=CONFIGS[2])
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  np.testing.assert_allclose(m_jit["kl"], m_eager["kl"], rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_grpo_loss_ignores_masked_garbage(aggregation):
  config = GRPOConfig(aggregation=aggregation)
  logp, old, ref, adv, mask = _batch()
  clean, clean_metrics = grpo_loss(logp, old, ref, adv, mask, config)
  rng = np.random.default_rng(4)
  garbage = np.where(rng.random(mask.shape) < 0.5, np.inf, np.nan).astype(np.float32)
  garbage[0, -1] = -np.inf
  g_logp, g_old, g_ref = (np.where(mask, x, garbage * s) for x, s in ((logp, 1), (old, -1), (ref, 1)))
  g_logp[1, 5] = np.inf
  g_adv = adv.copy()
  g_adv[2] = np.nan  # the row without tokens
  fn = lambda lp: grpo_loss(lp, g_old, g_ref, g_adv, mask, config)
  loss, metrics = fn(g_logp)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(loss, clean, rtol=1e-6)
  for k in clean_metrics:
    np.testing.assert_allclose(metrics[k], clean_metrics[k], rtol=1e-6, err_msg=k)
  grad = np.asarray(jax.grad(lambda lp: fn(lp)[0])(jnp.asarray(g_logp)))
  clean_grad = np.asarray(jax.grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, config)[0])(jnp.asarray(logp)))
  assert np.isfinite(grad).all()
  assert np.all(grad[~mask] == 0.0)
  np.testing.assert_allclose(grad, clean_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_gradient_step_raises_preferred_sequence(aggregation):
  """One group of 4: row 1 has the best reward; a descent step on the loss makes it more likely."""
  b, n, v = 4, 3, 5
  rng = np.random.default_rng(5)
  theta0 = jnp.asarray(0.1 * rng.normal(size=(b, n, v)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, size=(b, n)))
  mask = token_mask(np.array([3, 2, 3, 1]), n)
  adv = group_advantages(np.array([[0.0, 1.0, 0.2, 0.0]], np.float32))[0]
  config = GRPOConfig(aggregation=aggregation)

  def logp_of(theta):
    return jnp.take_along_axis(jax.nn.log_softmax(theta, axis=-1), tokens[..., None], axis=-1)[..., 0]

  def seq_logp(theta):
    return np.asarray(jnp.sum(jnp.where(mask, logp_of(theta), 0.0), axis=-1))

  def step(a):
    ref = logp_of(theta0)
    loss_fn = lambda th: grpo_loss(logp_of(th), ref, ref, a, mask, config)[0]
    return theta0 - 0.5 * jax.grad(loss_fn)(theta0)

  before = seq_logp(theta0)
  after = seq_logp(step(adv))
  assert after[1] > before[1]  # the preferred sequence
  assert after[0] < before[0] and after[3] < before[3]  # the worst ones
  flipped = seq_logp(step(-adv))
  assert flipped[1] < before[1]  # a flipped sign would fail the first assertion


# ----------------------------------------------------------------------------------------------------
# Config and registry


@pytest.mark.parametrize("kwargs", [dict(aggregation="foo"), dict(clip_eps=-1), dict(clip_eps=1.0),
                                    dict(kl_estimator="k4"), dict(advantage="ppo"), dict(kl_beta=-0.1),
                                    dict(clip_eps_high=-0.2), dict(advantage_eps=-1e-6)])
def test_config_refuses_bad_values(kwargs):
  with pytest.raises(ValueError) as info:
    GRPOConfig(**kwargs)
  message = str(info.value)
  assert "\n" not in message
  name = next(iter(kwargs))
  assert message.startswith(f"GRPOConfig.{name}=")


def test_config_defaults_and_registry():
  c = GRPOConfig()
  assert (c.clip_eps, c.clip_upper, c.kl_beta, c.kl_estimator, c.advantage, c.aggregation) == (
      0.2, 0.2, 0.04, "k3", "grpo", "sequence_mean")
  assert GRPOConfig(clip_eps_high=0.28).clip_upper == 0.28
  hash(c)  # usable as a static jit argument
  with pytest.raises(ValueError, match="already registered"):
    algo.register(AGGREGATIONS, "token_mean")(lambda x, m: x)
  try:
    algo.register(AGGREGATIONS, "first_token")(lambda x, m: jnp.mean(x[:, 0]))
    assert GRPOConfig(aggregation="first_token").aggregation == "first_token"
  finally:
    AGGREGATIONS.pop("first_token", None)
