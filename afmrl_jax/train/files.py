"""Files every stage writes: JSON written by process 0 only, numbers made plain, and atomic text writes
(a reader never sees half a file)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def _clean(value: Any) -> Any:
  """JSON-safe: NaN/inf -> None, NumPy scalars/arrays -> Python."""
  if isinstance(value, Mapping):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, np.ndarray):
    return _clean(value.tolist())
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: str, payload: dict[str, Any]) -> None:
  """`payload` as sorted, indented JSON at `path`, written by process 0 only (summaries, config.json)."""
  from afmrl_jax import parallel
  if not parallel.is_process_0():
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1, sort_keys=True, default=str)


def write_metrics_json(path: str, metrics: Mapping[str, float],
                       info: Mapping[str, Any] | None = None) -> None:
  """{"metrics": {...}, **info}; NaN (no query had a positive) is written as null."""
  with open(path, "w") as f:
    json.dump(_clean({"metrics": dict(metrics), **(info or {})}), f, indent=1)


def write_atomically(path: str, text: str) -> None:
  """`path` holds either its old content or all of `text`, never a part (rename is atomic)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
