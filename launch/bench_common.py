"""What every ours-vs-reference benchmark under launch/ shares: interleaved rounds, load averages, and
a ratio that is only printed when the machine was quiet enough for it to mean something.

A reference is measured in the same run as ours, round after round (ours, reference, ours, ...), so a
shared machine's changing load hits both alike; each side reports its best and its median round, and
the load average is recorded before every round. When the load average at the start is above
`MAX_LOAD` the ratio is withheld: the figures are printed with a warning instead.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

MAX_LOAD = 1.0


def load_average() -> float:
  """The one-minute load average of this machine."""
  return os.getloadavg()[0]


def interleaved(runners: dict[str, Callable[[], object]], rounds: int) -> dict:
  """Times each runner once per round, round after round, after one warm-up call each.

  Returns {"times": {name: [seconds per round]}, "load": [load average before each round]}.
  """
  for run in runners.values():
    run()
  times: dict[str, list[float]] = {name: [] for name in runners}
  load = []
  for _ in range(rounds):
    load.append(load_average())
    for name, run in runners.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  return {"times": times, "load": load}


def spread(seconds: list[float]) -> dict[str, float]:
  """Best and median of a list of round times."""
  return {"min_s": min(seconds), "median_s": statistics.median(seconds)}


def speedup_line(name: str, ours_s: float, reference_s: float, load_at_start: float) -> tuple[str, float | None]:
  """("<name>: 1.23x ..." or a warning with the figures, the ratio or None when the load was too high)."""
  ratio = reference_s / ours_s
  if load_at_start > MAX_LOAD:
    return (f"WARNING {name}: load average {load_at_start:.2f} > {MAX_LOAD} at the start; no ratio printed "
            f"(ours {ours_s:.3f} s, reference {reference_s:.3f} s). Rerun on a quiet machine."), None
  return f"{name}: {ratio:.2f}x (ours {ours_s:.3f} s, reference {reference_s:.3f} s)", ratio
