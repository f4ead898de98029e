"""Next-token distributions: temperature, top-k, top-p (nucleus) and greedy choice, as pure functions.

Order of operations follows HF `generate`: temperature, then top-k, then top-p on what top-k kept.
Filtered-out entries become -inf. Ties at a threshold are kept (so a filter may keep a few more
tokens than asked when logits tie exactly).

The returned log-probability of a chosen token is always taken under the *unfiltered* distribution
`log_softmax(logits / temperature)` (temperature 1 for greedy): that is the policy probability GRPO's
importance ratio needs, and what `generate.logprobs.completion_logprobs` recomputes teacher-forced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen. Hashable, so it can be a static jit argument.

  temperature: 0 means greedy (argmax); top_k: 0 disables; top_p: 1.0 disables;
  max_new_tokens: the fixed decode length (static shapes); eos_ids: any of these ends a row;
  pad_id: written after a row has ended.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 32
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}.")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}.")
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  @property
  def logprob_temperature(self) -> float:
    """Temperature of the distribution logprobs are reported under (1 for greedy)."""
    return 1.0 if self.greedy else self.temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps entries >= the k-th largest of each row. logits [..., V] -> [..., V]."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, NEG_INF, logits)


def _nucleus_keep_count(sorted_desc: jax.Array, p: float) -> jax.Array:
  """How many of the descending-sorted logits [..., n] the top-p set keeps: [..., 1] int32.

  The smallest prefix whose probability mass reaches p (at least one token).
  """
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  return jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest set of top entries whose probability reaches p. logits [..., V] -> [..., V]."""
  if p >= 1.0:
    return logits
  sorted_desc = -jnp.sort(-logits, axis=-1)
  keep = _nucleus_keep_count(sorted_desc, p)
  threshold = jnp.take_along_axis(sorted_desc, keep - 1, axis=-1)
  return jnp.where(logits < threshold, NEG_INF, logits)


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature, top-k, top-p on full-vocabulary logits [..., V] (float32)."""
  logits = logits.astype(jnp.float32) / config.logprob_temperature
  return top_p_filter(top_k_filter(logits, config.top_k), config.top_p)


def draw_uniforms(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniforms in (0, 1) for `sample_categorical` (never exactly 0, so a zero-probability first
  entry cannot be drawn)."""
  return jax.random.uniform(rng, shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny)


SAMPLE_BLOCK = 128  # vocabulary entries per block of the two-level inverse CDF


def _inverse_cdf(u: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One draw per row from softmax(logits) by a two-level inverse CDF; also the log normaliser.

  A full-vocabulary cumulative sum costs several passes over `[B, V]` on a CPU (XLA builds it
  from a tree of reduce-windows). Instead: one pass of `exp` + per-block sums (blocks of
  `SAMPLE_BLOCK`), a cumulative sum over the few block totals to find the block holding
  `u * total`, then a cumulative sum inside that one block only. The same distribution as a flat
  cumulative sum (up to float rounding at the boundaries). Zero-probability blocks and entries
  (-inf logits) are never returned.

  logits [B, n] (-inf allowed, at least one finite per row), u [B, 1] -> (tokens [B] int32,
  logsumexp(logits) [B]).
  """
  b, n = logits.shape
  x = logits.astype(jnp.float32)
  m = jnp.max(x, axis=-1, keepdims=True)
  bs = min(SAMPLE_BLOCK, n)
  nb = -(-n // bs)
  if nb * bs != n:
    x = jnp.pad(x, ((0, 0), (0, nb * bs - n)), constant_values=NEG_INF)
  blocks = x.reshape(b, nb, bs)
  block_mass = jnp.sum(jnp.exp(blocks - m[..., None]), axis=-1)  # [B, nb]
  cum = jnp.cumsum(block_mass, axis=-1)
  target = u * cum[:, -1:]
  last_block = jnp.max(jnp.where(block_mass > 0, jnp.arange(nb), 0), axis=-1)
  j = jnp.minimum(jnp.sum(cum < target, axis=-1), last_block)  # [B]
  before = jnp.take_along_axis(cum - block_mass, j[:, None], axis=-1)  # mass of blocks < j, [B, 1]
  mass = jnp.exp(jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0] - m)  # [B, bs]
  inside = jnp.sum(before + jnp.cumsum(mass, axis=-1) < target, axis=-1)
  last = jnp.max(jnp.where(mass > 0, jnp.arange(bs), 0), axis=-1)
  tokens = j * bs + jnp.minimum(inside, last)
  return tokens.astype(jnp.int32), m[:, 0] + jnp.log(cum[:, -1])


def sample_categorical(u: jax.Array, logits: jax.Array) -> jax.Array:
  """One draw per row from softmax(logits) by inverse CDF.

  One uniform per row (`u` [B, 1] from `draw_uniforms`) instead of `jax.random.categorical`'s n
  Gumbel draws: random-bit generation dominated the CPU decode step at an 8k vocabulary, and the
  decode loop can draw all its uniforms before the loop. See `_inverse_cdf`.
  logits [B, n] (-inf allowed) -> [B] int32.
  """
  return _inverse_cdf(u, logits)[0]


def choose_tokens(rng: jax.Array | None, logits: jax.Array, config: SamplingConfig,
                  u: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Picks one token per row and its log-probability.

  Args:
    rng: PRNG key (unused for greedy, or when `u` is given).
    logits: [batch, vocab] next-token logits.
    config: SamplingConfig.
    u: optional [batch, 1] uniforms from `draw_uniforms` (instead of `rng`).
  Returns:
    tokens [batch] int32, logprobs [batch] float32 under log_softmax(logits / temperature).
  """
  if u is None and not config.greedy:
    u = draw_uniforms(rng, logits.shape[:-1] + (1,))
  scaled = logits.astype(jnp.float32) / config.logprob_temperature
  log_norm = None  # logsumexp(scaled) [B], when a draw already computed it
  if config.greedy:
    tokens = jnp.argmax(scaled, axis=-1)
  elif 0 < config.top_k < logits.shape[-1]:
    # Sample inside the top-k candidates only: no full-vocabulary sort per step.
    vals, idx = jax.lax.top_k(scaled, config.top_k)
    if config.top_p < 1.0:
      keep = _nucleus_keep_count(vals, config.top_p)
      vals = jnp.where(jnp.arange(vals.shape[-1]) < keep, vals, NEG_INF)
    choice = sample_categorical(u, vals)
    tokens = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
  elif config.top_p < 1.0:
    tokens = sample_categorical(u, top_p_filter(scaled, config.top_p))
  else:  # the sampled distribution is the unfiltered one: its normaliser is the logprobs' too
    tokens, log_norm = _inverse_cdf(u, scaled)
  if log_norm is None:
    log_norm = jax.nn.logsumexp(scaled, axis=-1)
  tokens = tokens.astype(jnp.int32)
  # Only the chosen entries: no [B, V] log_softmax.
  return tokens, jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0] - log_norm
