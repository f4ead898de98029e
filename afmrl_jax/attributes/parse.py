"""Parse and format attribute strings (`key: value; key: value`).

The generator writes free text; the parser turns any string into canonical (key, value) pairs and says
whether the string was well formed. It never raises: the RL reward gives malformed strings a penalty,
so "malformed" must be a value, not an exception.

Canonical form: keys and values stripped, lower-cased, inner whitespace collapsed to one space.
Pairs are separated by `;` or newlines; key and value by the first `:` or `=` in the segment.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

_PAIR_SEPARATORS = re.compile(r"[;\n\r]")
_KEY_VALUE = re.compile(r"[:=]")
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class ParsedAttributes:
  """Result of `parse_attributes`.

  pairs: canonical (key, value) pairs in input order, exact duplicates dropped.
  malformed: True when the text is not a list of `key: value` pairs (a segment without a separator,
    an empty key or value, or no pair at all).
  problems: one human-readable line per problem found (also duplicates, which are not malformed).
  """
  pairs: tuple[tuple[str, str], ...]
  malformed: bool
  problems: tuple[str, ...]


def canonical(text: str) -> str:
  """Strip, lower-case and collapse inner whitespace."""
  return _WHITESPACE.sub(" ", str(text)).strip().lower()


def parse_attributes(text) -> ParsedAttributes:
  """Parse `key: value; key: value` into canonical pairs. Never raises, for any input.

  Empty segments (e.g. a trailing `;`) are ignored. A segment without `:`/`=`, with an empty key or an
  empty value makes the result malformed; the well-formed pairs found are still returned.
  """
  try:
    if not isinstance(text, str):
      return ParsedAttributes((), True, (f"expected a string, got {type(text).__name__}",))
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    problems: list[str] = []
    malformed = False
    for index, segment in enumerate(_PAIR_SEPARATORS.split(text)):
      if not segment.strip():
        continue
      match = _KEY_VALUE.search(segment)
      if match is None:
        malformed = True
        problems.append(f"segment {index} {segment.strip()[:40]!r}: no ':' or '=' between key and value")
        continue
      key = canonical(segment[:match.start()])
      value = canonical(segment[match.end():])
      if not key or not value:
        malformed = True
        which = "key" if not key else "value"
        problems.append(f"segment {index} {segment.strip()[:40]!r}: empty {which}")
        continue
      if (key, value) in seen:
        problems.append(f"segment {index}: duplicate pair {key}: {value}")
        continue
      seen.add((key, value))
      pairs.append((key, value))
    if not pairs and not malformed:
      malformed = True
      problems.append("no attribute pairs")
    return ParsedAttributes(tuple(pairs), malformed, tuple(problems))
  except Exception as error:  # noqa: BLE001 - the contract is "never raises"; report instead.
    return ParsedAttributes((), True, (f"parser error: {type(error).__name__}: {error}",))


def format_attributes(pairs: Iterable[Sequence[str]]) -> str:
  """Format pairs as `key: value; key: value` (canonicalised).

  Raises ValueError naming the pair when it cannot round-trip: an empty key/value, a key containing
  `:`/`=`, or a separator (`;`, newline) inside a key or value.
  """
  parts = []
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"format_attributes: expected (key, value) pairs, got {pair!r}")
    key, value = canonical(pair[0]), canonical(pair[1])
    if not key or not value:
      raise ValueError(f"format_attributes: empty key or value in {pair!r}")
    if _KEY_VALUE.search(key) or _PAIR_SEPARATORS.search(key) or _PAIR_SEPARATORS.search(value):
      raise ValueError(f"format_attributes: separator character inside {pair!r} would not round-trip")
    parts.append(f"{key}: {value}")
  return "; ".join(parts)
