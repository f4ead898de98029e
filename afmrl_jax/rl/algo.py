"""GRPO as small pure functions: group advantages, masks, KL estimators, clipped loss, aggregation.

Every function takes arrays and returns arrays, works eagerly and under `jax.jit`, and has no state.
Shapes: Q prompts (query listings), G samples per prompt, B = Q * G sequences (a group's G samples
are consecutive rows), N token positions per sequence.

Advantages (per sequence, from the rewards r [Q, G] of each group):
  'grpo'       A = (r - mean_G r) / (std_G r + eps), std the population std (ddof 0); a group whose
               rewards are all equal gets A = 0 exactly: it carries no preference.
  'mean_only'  A = r - mean_G r (no division by the std, as Dr. GRPO): a group's spread of rewards
               then scales its gradient.

Per-token loss, with rho = exp(logp - old_logp) the ratio of the current policy to the sampling one
and A the sequence's advantage broadcast over its tokens:
  policy = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
  token  = policy + beta KL(logp, ref_logp)
The clip stops the gradient of a token whose ratio has already moved past the band in the direction
the advantage favours (rho > 1 + eps_high with A > 0, rho < 1 - eps_low with A < 0).

KL estimators of KL(pi || pi_ref) from the sampled token's logprobs, d = ref_logp - logp:
  'k1'  -d                      unbiased, can be negative per token;
  'k2'  d^2 / 2                 biased, >= 0;
  'k3'  exp(d) - d - 1          unbiased, >= 0 (the GRPO default).

Aggregation of the per-token loss over the real tokens (mask): 'sequence_mean' averages each
sequence's tokens, then the sequences, so every sequence weighs the same and a long sequence's tokens
each count less (the original GRPO); 'token_mean' averages all real tokens of the batch together, so
every token weighs the same and long sequences weigh more (DAPO).

Masks: `token_mask` marks the first lengths[b] positions, `eos_mask` the positions up to and including
a row's first EOS token. Values at masked positions never reach the loss, its metrics or its
gradient, even when they are inf or NaN.

The tables ADVANTAGES, KL_ESTIMATORS and AGGREGATIONS map names (GRPOConfig's fields) to functions;
`register(table, name)` adds one.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from afmrl_jax.fields import bounded, check, non_negative

ADVANTAGES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
AGGREGATIONS: dict[str, Callable] = {}


def register(table: dict[str, Callable], name: str) -> Callable[[Callable], Callable]:
  """Decorator: `@register(KL_ESTIMATORS, "k3")` puts the function in the table under `name`."""

  def add(fn: Callable) -> Callable:
    if name in table:
      raise ValueError(f"register: {name!r} is already registered ({table[name].__name__})")
    table[name] = fn
    return fn

  return add


def _lookup(table: dict[str, Callable], name: str, what: str) -> Callable:
  if name not in table:
    raise ValueError(f"{what}={name!r} is not one of {sorted(table)}")
  return table[name]


# ----------------------------------------------------------------------------------------------------
# Advantages


def _centred(rewards: jax.Array):
  """(r - mean over the last axis, constant row [..., 1] bool) of rewards in float32."""
  r = jnp.asarray(rewards, jnp.float32)
  centred = r - jnp.mean(r, axis=-1, keepdims=True)
  # Exact test: the float mean of equal values need not equal them to the last bit.
  constant = jnp.all(r == r[..., :1], axis=-1, keepdims=True)
  return jnp.where(constant, 0.0, centred), constant


@register(ADVANTAGES, "grpo")
def group_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
  """A [Q, G] float32 = (r - mean_G) / (std_G + eps) of rewards r [Q, G] (any [..., G]).

  std is the population std (ddof 0). A group whose rewards are all equal gets exactly 0; equal
  rewards inside a group get equal advantages.
  """
  centred, constant = _centred(rewards)
  std = jnp.sqrt(jnp.mean(centred * centred, axis=-1, keepdims=True))
  ok = (std > 0) & ~constant
  return jnp.where(ok, centred / jnp.where(ok, std + eps, 1.0), 0.0)


@register(ADVANTAGES, "mean_only")
def mean_only_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
  """A [Q, G] float32 = r - mean_G of rewards r [Q, G] (any [..., G]); eps is unused.

  Dr. GRPO's form: no division by the group std. An all-equal group gets exactly 0.
  """
  del eps
  return _centred(rewards)[0]


# ----------------------------------------------------------------------------------------------------
# Masks


def token_mask(lengths: jax.Array, n: int) -> jax.Array:
  """mask [B, N] bool, True at the first lengths[b] positions of row b (lengths [B] int)."""
  lengths = jnp.asarray(lengths)
  return jnp.arange(n)[None, :] < lengths[:, None]


def eos_mask(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  """mask [B, N] bool, True up to and including each row's first EOS token (tokens [B, N] int).

  eos_ids: the token ids that end a sequence. A row without any is all True.
  """
  tokens = jnp.asarray(tokens)
  is_eos = jnp.zeros(tokens.shape, bool)
  for eos in tuple(eos_ids):
    is_eos |= tokens == eos
  eos_before = jnp.cumsum(is_eos.astype(jnp.int32), axis=-1) - is_eos.astype(jnp.int32)
  return eos_before == 0


# ----------------------------------------------------------------------------------------------------
# KL estimators: logp, ref_logp [...] float32 logprobs of the sampled tokens -> [...] per token.


@register(KL_ESTIMATORS, "k1")
def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """logp - ref_logp: unbiased estimate of KL(pi || pi_ref), negative for some tokens."""
  return logp - ref_logp


@register(KL_ESTIMATORS, "k2")
def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """(logp - ref_logp)^2 / 2: biased, >= 0."""
  return 0.5 * jnp.square(logp - ref_logp)


@register(KL_ESTIMATORS, "k3")
def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """exp(d) - d - 1 with d = ref_logp - logp: unbiased, >= 0, 0 where logp == ref_logp."""
  d = ref_logp - logp
  return jnp.expm1(d) - d  # expm1: no cancellation when d is small


# ----------------------------------------------------------------------------------------------------
# Policy loss


def clipped_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                        clip_eps_low: float = 0.2, clip_eps_high: float = 0.2):
  """(per_token_loss [B, N] float32, clipped [B, N] bool) of the clipped policy gradient.

  logp [B, N]: current logprobs of the sampled tokens (the only input with a gradient);
  old_logp [B, N]: logprobs under the policy that sampled them; advantages [B] (broadcast over the
  tokens) or [B, N]. loss = -min(rho A, clip(rho, 1 - clip_eps_low, 1 + clip_eps_high) A),
  rho = exp(logp - old_logp). clipped: tokens where the clipped term is strictly the smaller, so their
  gradient is 0. Apply a mask afterwards: every position gets a value.
  """
  logp = jnp.asarray(logp, jnp.float32)
  old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
  if adv.ndim == logp.ndim - 1:
    adv = adv[..., None]
  rho = jnp.exp(logp - old_logp)
  unclipped = rho * adv
  clipped_term = jnp.clip(rho, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv
  clipped = clipped_term < unclipped
  return -jnp.where(clipped, clipped_term, unclipped), clipped


# ----------------------------------------------------------------------------------------------------
# Aggregation: per_token [B, N] float32, mask [B, N] bool -> scalar.


def _masked(per_token: jax.Array, mask: jax.Array):
  mask = jnp.asarray(mask, bool)
  return jnp.where(mask, jnp.asarray(per_token, jnp.float32), 0.0), mask.astype(jnp.float32)


@register(AGGREGATIONS, "sequence_mean")
def sequence_mean(per_token: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over sequences of each sequence's masked token mean (the original GRPO).

  Every sequence weighs the same, so a long sequence's tokens each count less. Rows without tokens
  contribute 0 and are left out of the count of sequences; an empty mask gives 0.
  """
  x, m = _masked(per_token, mask)
  tokens = jnp.sum(m, axis=-1)
  row_mean = jnp.sum(x, axis=-1) / jnp.maximum(tokens, 1.0)
  rows = jnp.sum((tokens > 0).astype(jnp.float32))
  return jnp.sum(row_mean) / jnp.maximum(rows, 1.0)


@register(AGGREGATIONS, "token_mean")
def token_mean(per_token: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum of the masked tokens over their number in the whole batch (DAPO); an empty mask gives 0.

  Every token weighs the same, so long sequences weigh more than short ones.
  """
  x, m = _masked(per_token, mask)
  return jnp.sum(x) / jnp.maximum(jnp.sum(m), 1.0)


def aggregate_loss(per_token: jax.Array, mask: jax.Array, mode: str = "sequence_mean") -> jax.Array:
  """Scalar loss of per_token [B, N] over the real tokens mask [B, N] bool; mode: an AGGREGATIONS name.

  'sequence_mean' weighs every sequence equally (long sequences' tokens count less), 'token_mean'
  weighs every token equally (long sequences count more).
  """
  return _lookup(AGGREGATIONS, mode, "aggregate_loss: mode")(per_token, mask)


# ----------------------------------------------------------------------------------------------------
# The loss


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Knobs of `grpo_loss` and `compute_advantages`.

  clip_eps: lower clip width eps_low, ratios below 1 - clip_eps are clipped (in [0, 1)).
  clip_eps_high: upper clip width eps_high; 0 means the same as clip_eps (a larger value is DAPO's
    clip-higher).
  kl_beta: weight of the KL term; 0 leaves it out of the loss.
  kl_estimator: a KL_ESTIMATORS name ('k1', 'k2', 'k3').
  advantage: an ADVANTAGES name ('grpo', 'mean_only'), used by `compute_advantages`.
  aggregation: an AGGREGATIONS name ('sequence_mean', 'token_mean').
  advantage_eps: eps added to the group std of the 'grpo' advantage.
  """
  clip_eps: float = bounded(0.2, 0.0, 1.0, high_open=True)
  clip_eps_high: float = non_negative(0.0)
  kl_beta: float = non_negative(0.04)
  kl_estimator: str = "k3"
  advantage: str = "grpo"
  aggregation: str = "sequence_mean"
  advantage_eps: float = non_negative(1e-6)

  def __post_init__(self):
    # Names are checked against the tables as they are now, so registered additions are accepted.
    tables = (("kl_estimator", KL_ESTIMATORS), ("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS))
    check(self, [(name, f"is not one of {sorted(table)}") for name, table in tables
                 if getattr(self, name) not in table])

  @property
  def clip_upper(self) -> float:
    """eps_high as used: clip_eps_high, or clip_eps when that is 0."""
    return self.clip_eps_high if self.clip_eps_high > 0 else self.clip_eps


def compute_advantages(rewards: jax.Array, config: Optional[GRPOConfig] = None) -> jax.Array:
  """A [Q, G] float32 of rewards [Q, G] by config.advantage (eps config.advantage_eps)."""
  config = GRPOConfig() if config is None else config
  return ADVANTAGES[config.advantage](rewards, config.advantage_eps)


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: Optional[jax.Array], advantages: jax.Array,
              mask: jax.Array, config: Optional[GRPOConfig] = None):
  """(loss scalar, metrics) of the GRPO objective over the real tokens.

  logp [B, N] float32: current logprobs of the sampled tokens (gradient flows to these only);
  old_logp [B, N]: logprobs under the sampling policy; ref_logp [B, N] | None: under the reference
  policy; advantages [B] (or [B, N]); mask [B, N] bool: real tokens. Per token: clipped policy loss
  + kl_beta * KL(logp, ref_logp) (no KL term when kl_beta == 0 or ref_logp is None), aggregated by
  config.aggregation.

  metrics (scalars, stop-gradient; means over the real tokens): policy_loss, kl (0 without
  ref_logp; computed even when kl_beta == 0), clip_fraction, ratio_mean, and tokens (their count).
  """
  config = GRPOConfig() if config is None else config
  logp = jnp.asarray(logp, jnp.float32)
  mask = jnp.asarray(mask, bool)
  if logp.shape != mask.shape or jnp.shape(old_logp) != mask.shape:
    raise ValueError(f"grpo_loss: logp {logp.shape}, old_logp {jnp.shape(old_logp)} and mask {mask.shape} "
                     f"must have the same shape [B, N]")
  kl_fn = _lookup(KL_ESTIMATORS, config.kl_estimator, "grpo_loss: kl_estimator")
  # Masked positions are replaced before any exp, so garbage there (inf, NaN) cannot leak through
  # the forward pass or, as 0 * inf, through the gradient.
  safe = lambda x: jnp.where(mask, jnp.asarray(x, jnp.float32), 0.0)
  logp = safe(logp)
  old_logp = safe(old_logp)
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = safe(jnp.broadcast_to(advantages, mask.shape))

  policy, clipped = clipped_policy_loss(logp, old_logp, advantages, config.clip_eps, config.clip_upper)
  per_token = policy
  kl = jnp.zeros_like(policy)
  if ref_logp is not None:
    kl = kl_fn(logp, jax.lax.stop_gradient(safe(ref_logp)))
    if config.kl_beta != 0:
      per_token = per_token + config.kl_beta * kl
  loss = aggregate_loss(per_token, mask, config.aggregation)

  ratio = jnp.exp(jax.lax.stop_gradient(logp - old_logp))
  metrics = {
      "policy_loss": token_mean(policy, mask),
      "kl": token_mean(kl, mask),
      "clip_fraction": token_mean(clipped.astype(jnp.float32), mask),
      "ratio_mean": token_mean(ratio, mask),
      "tokens": jnp.sum(mask.astype(jnp.float32)),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
