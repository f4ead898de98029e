"""BM25 terms of an attribute set: `key=value` for each pair, then each word of each value.

The pair terms come first so that truncation to a fixed number of terms drops words, the less
specific terms, before pairs.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from afmrl_jax.attributes.parse import canonical, parse_attributes

_WORD = re.compile(r"\w+")


def attribute_terms(pairs: Iterable[Sequence[str]]) -> list[str]:
  """Lower-cased BM25 terms of (key, value) pairs. Repeated words are kept: they are term frequency."""
  pairs = [(canonical(k), canonical(v)) for k, v in pairs]
  terms = [f"{k}={v}" for k, v in pairs]
  for _, value in pairs:
    terms.extend(_WORD.findall(value))
  return terms


def terms_of(text_or_pairs) -> list[str]:
  """Terms of an attribute string (parsed, malformed parts ignored) or of a sequence of pairs."""
  if isinstance(text_or_pairs, str):
    return attribute_terms(parse_attributes(text_or_pairs).pairs)
  return attribute_terms(text_or_pairs)
