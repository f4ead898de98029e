"""Training logs: a console line per `log_every` steps, TensorBoard events, a JSON-lines file, FLOPs/MFU.

Console: `step   120/400 [######......] 30% | loss 2.3451 | 812.3 ex/s | 1.2 TFLOP/s | ETA 0:01:23`.
TensorBoard (tensorboardX): every scalar under `train/`. `metrics.jsonl`: one JSON object per logged
step (what the report's loss curve reads). FLOPs per step come from the compiled step's
`cost_analysis()`; MFU divides achieved FLOP/s by the peak of the device kind (bf16 dense table below;
unknown kinds, e.g. CPUs, get no MFU rather than a made-up one).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from afmrl_jax import parallel

# Peak dense bf16 FLOP/s per chip, matched by substring of `jax.Device.device_kind` (lower case).
# Longer keys are tried first so e.g. 'v5 lite' wins over 'v5'.
PEAK_FLOPS: dict[str, float] = {
    "h200": 989e12,
    "h100": 989e12,
    "h800": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "a800": 312e12,
    "l40s": 362e12,
    "l4": 121e12,
    "a10g": 125e12,
    "v100": 125e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "tpu7x": 2307e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of this kind, or None if unknown (CPUs)."""
  kind = device_kind.lower()
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key in kind:
      return PEAK_FLOPS[key]
  return None


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one execution of a compiled jax function (`jit(f).lower(...).compile()`), or None.

  XLA reports the cost of the per-device (partitioned) program, so this is FLOPs per device.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops > 0 else None


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_bar(done: int, total: int, width: int = 20) -> str:
  frac = 0.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
  filled = int(round(frac * width))
  return f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:3.0f}%"


def _drop_rows_after(path: str, step: int) -> None:
  """A resumed run re-logs the steps after its checkpoint: drop the earlier run's rows for them."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    rows = [line for line in f if line.strip()]

  def before(line: str) -> bool:
    try:
      return json.loads(line).get("step", 0) <= step
    except json.JSONDecodeError:  # a line a kill cut short
      return False

  kept = [line for line in rows if before(line)]
  if len(kept) != len(rows):
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(kept)


class MetricsLogger:
  """Writes console lines, TensorBoard scalars and `metrics.jsonl` on process 0.

  Args:
    workdir: run directory (`tensorboard/` and `metrics.jsonl` go there).
    total_steps: the run's last step (for the bar and ETA).
    examples_per_step: global batch (pairs) per step.
    flops_per_step_per_device: from `compiled_flops`, or None.
  """

  def __init__(self, workdir: str, total_steps: int, examples_per_step: int,
               flops_per_step_per_device: float | None = None, stream=None,
               metrics_file: str = "metrics.jsonl", resumed_step: int = 0):
    self.total_steps = total_steps
    self.examples_per_step = examples_per_step
    self.flops = flops_per_step_per_device
    self.peak = peak_flops(jax.devices()[0].device_kind)
    self.is_main = parallel.is_process_0()
    self.stream = stream or sys.stdout
    self._writer = None
    self._jsonl = None
    self._last_time: float | None = None
    self._last_step: int | None = None
    if self.is_main:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, metrics_file)
      _drop_rows_after(path, resumed_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # optional: console and JSON still work
        self._writer = None

  def start(self, step: int) -> None:
    """Marks the time the timed interval begins (after compilation)."""
    self._last_time = time.perf_counter()
    self._last_step = step

  def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Logs the metrics of `step` (host scalars); returns them with the rate fields added."""
    now = time.perf_counter()
    row = {k: float(np.asarray(v)) for k, v in metrics.items()}
    if self._last_time is not None and self._last_step is not None and step > self._last_step:
      dt = (now - self._last_time) / (step - self._last_step)
      row["step_time_s"] = dt
      row["examples_per_s"] = self.examples_per_step / dt
      if self.flops:
        row["tflops_per_device"] = self.flops / dt / 1e12
        if self.peak:
          row["mfu"] = self.flops / dt / self.peak
      row["eta_s"] = dt * (self.total_steps - step)
    self._last_time, self._last_step = now, step
    if self.is_main:
      self._write(step, row)
    return row

  def _write(self, step: int, row: dict[str, float]) -> None:
    parts = [f"step {step:>{len(str(self.total_steps))}d}/{self.total_steps}",
             progress_bar(step, self.total_steps), f"loss {row.get('loss', float('nan')):.4f}"]
    if "examples_per_s" in row:
      parts.append(f"{row['examples_per_s']:.1f} ex/s")
    if "tflops_per_device" in row:
      tflops = row["tflops_per_device"]
      parts.append(f"{tflops:.2f} TFLOP/s/dev" if tflops >= 0.1 else f"{tflops * 1e3:.2f} GFLOP/s/dev")
    if "mfu" in row:
      parts.append(f"MFU {row['mfu'] * 100:.1f}%")
    if "eta_s" in row:
      parts.append(f"ETA {format_duration(row['eta_s'])}")
    print(" | ".join(parts), file=self.stream, flush=True)
    if self._writer is not None:
      for key, value in row.items():
        self._writer.add_scalar(f"train/{key}", value, step)
    self._jsonl.write(json.dumps({"step": step, **row}) + "\n")
    self._jsonl.flush()

  def write_scalars(self, step: int, scalars: dict[str, float], prefix: str) -> None:
    """Extra scalars (e.g. eval metrics, which evaluation writes to its own files) to TensorBoard."""
    if self.is_main and self._writer is not None:
      for key, value in scalars.items():
        self._writer.add_scalar(f"{prefix}/{key}", float(value), step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
