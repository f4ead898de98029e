"""AGCLConfig: every knob of the attribute-guided contrastive loss (docs/method.md, stage 1)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from afmrl_jax.fields import Checked, bounded, choice, non_negative, positive

BM25_NORMS = ("none", "self")
BIAS_ON = ("negatives", "all")
MASKS = ("none", "margin", "positive", "attribute")
BM25_IMPLS = ("auto", "gather", "matmul", "compare")


@dataclasses.dataclass(frozen=True)
class AGCLConfig(Checked):
  """Attribute-guided contrastive loss, logits l_ij = s_ij / tau + bias_ij (masked entries dropped).

  s_ij = cos(q_i, c_j); B_ij = BM25(query i's attribute terms, candidate j's terms).

  tau: temperature. Default 0.05 rather than the published 0.02: the bias is in logit units, so its
    strength relative to s / tau depends on tau, and the default bias scale was chosen at tau = 0.05
    (docs/agcl_loss.md); the two are kept together.
  bias_scale: alpha in the method's formulas; bias = bias_scale * tanh(norm(B)). 0 gives plain InfoNCE.
  bm25_norm: 'self' (default): norm(B)_ij = 2 * clip(B_ij / B_ii, 0, 1), B relative to the row's own
    positive (0 where B_ii = 0); 'none' (published): raw B, which saturates tanh as soon as two
    attribute strings share a term.
  bias_on: 'negatives' (default): bias 0 on the positive; 'all' (published): on every entry.
  uniform_margin: control without attributes: when set, bias = this constant on every negative and 0 on
    the positive (bias_scale, bm25_norm and bias_on are then unused).
  mask: false-negative mask, stop-gradient, never on the positive; masked entries leave the denominator.
    'none' (default: masks showed no measurable effect, docs/stage1.md), 'margin': s_ij > s_ii + delta,
    'positive': cos(c_j, c_i) > delta (the negative is too close to the positive candidate),
    'attribute': identical non-empty attribute term sets, or (when mask_threshold is set)
    B_ij / B_ii > mask_threshold.
  delta: threshold of the 'margin' and 'positive' masks (margin: about 0.1; positive: about 0.9).
  symmetric: add the candidate->query direction (the same loss with the towers' roles swapped) and
    average the two.
  k1, b: BM25 parameters.
  bm25_impl: how B is computed, same numbers either way (losses.bm25.resolve_impl): 'auto' ('matmul'
    of a per-row [L, V] term-count table with the columns' weights for vocabularies up to 8192 terms,
    else 'compare'), 'matmul', 'gather', 'compare' (K x K slot comparison, any vocabulary size).

  The published form is `AGCLConfig.published()`, plain InfoNCE `AGCLConfig.infonce()`.
  """
  tau: float = positive(0.05)
  bias_scale: float = non_negative(4.0)
  bm25_norm: str = choice("self", BM25_NORMS)
  bias_on: str = choice("negatives", BIAS_ON)
  uniform_margin: Optional[float] = non_negative(None)
  mask: str = choice("none", MASKS)
  delta: float = 0.1
  mask_threshold: Optional[float] = non_negative(None)
  symmetric: bool = False
  k1: float = non_negative(1.2)
  b: float = bounded(0.75, 0.0, 1.0)
  bm25_impl: str = choice("auto", BM25_IMPLS)


  @classmethod
  def published(cls, tau: float = 0.02, **overrides) -> "AGCLConfig":
    """The paper's form: tau 0.02, bias scale 1, raw BM25, bias on every entry."""
    return cls(tau=tau, bias_scale=1.0, bm25_norm="none", bias_on="all", **overrides)

  @classmethod
  def infonce(cls, tau: float = 0.05, **overrides) -> "AGCLConfig":
    """Plain InfoNCE: no bias, no mask."""
    return cls(tau=tau, bias_scale=0.0, **overrides)

  @property
  def bias_uses_bm25(self) -> bool:
    return self.uniform_margin is None and self.bias_scale != 0.0

  @property
  def needs_bm25(self) -> bool:
    """Whether the loss needs attribute terms at all."""
    return self.bias_uses_bm25 or self.mask == "attribute"
