"""Dataclass fields that carry their own allowed values, and the one checker that reads them.

A config dataclass declares each constrained field once:

    @dataclasses.dataclass(frozen=True)
    class Example:
      mode: str = choice("fast", ("fast", "exact"))
      tau: float = positive(0.05)
      share: float = bounded(0.5, 0.0, 1.0)

      def __post_init__(self):
        check(self)

`check` raises `InvalidFields` listing every bad field as `(name, value, why)`, so a caller that knows
where the values came from (the run config's `config.loss.tau`) can name them its own way. Nothing else
in the project repeats these rules. This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any


class InvalidFields(ValueError):
  """Bad field values of one dataclass: `problems` is a list of (field name, value, why)."""

  def __init__(self, owner: str, problems: Sequence[tuple[str, Any, str]]):
    self.owner = owner
    self.problems = list(problems)
    super().__init__("; ".join(f"{owner}.{name}={value!r} {why}" for name, value, why in self.problems))


def choice(default: Any, options: Iterable[Any], **kwargs) -> Any:
  """A field whose value must be one of `options`."""
  return dataclasses.field(default=default, metadata={"choices": tuple(options)}, **kwargs)


def bounded(default: Any, low: float | None = None, high: float | None = None, *, high_open: bool = False,
            **kwargs) -> Any:
  """A field whose value must lie in [low, high] (or [low, high) with `high_open`); None = unbounded."""
  return dataclasses.field(default=default, metadata={"range": (low, high, high_open)}, **kwargs)


def positive(default: Any, **kwargs) -> Any:
  """A field whose value must be > 0."""
  return dataclasses.field(default=default, metadata={"positive": True}, **kwargs)


def non_negative(default: Any, **kwargs) -> Any:
  """A field whose value must be >= 0 (None allowed: 'unset')."""
  return dataclasses.field(default=default, metadata={"non_negative": True}, **kwargs)


def field_problem(f: dataclasses.Field, value: Any) -> str | None:
  """Why `value` is not allowed in field `f`, or None when it is."""
  meta = f.metadata
  if "choices" in meta and value not in meta["choices"]:
    return f"is not one of {list(meta['choices'])}"
  if value is None:
    return None
  if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isnan(value):
    return "must be a number"
  if meta.get("positive") and not value > 0:
    return "must be > 0"
  if meta.get("non_negative") and not value >= 0:
    return "must be >= 0"
  if "range" in meta:
    low, high, high_open = meta["range"]
    too_low = low is not None and value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
      return f"must lie in [{low}, {high}{')' if high_open else ']'}"
  return None


def check(obj: Any, extra: Iterable[tuple[str, str]] = ()) -> None:
  """Raises InvalidFields for every field of dataclass `obj` outside its declared values.

  extra: further (field name, why) pairs from the class's own cross-field rules.
  """
  problems = []
  for f in dataclasses.fields(obj):
    why = field_problem(f, getattr(obj, f.name))
    if why is not None:
      problems.append((f.name, getattr(obj, f.name), why))
  problems.extend((name, getattr(obj, name), why) for name, why in extra)
  if problems:
    raise InvalidFields(type(obj).__name__, problems)


def narrow(obj: Any, cls: type) -> Any:
  """An instance of the dataclass `cls` from the same-named fields of `obj` (e.g. the loss fields of a
  trainer section that extends `AGCLConfig`)."""
  return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})


class Checked:
  """Mixin for a config dataclass whose fields are checked against their declarations on creation."""

  def __post_init__(self):
    check(self)
