"""What mined negatives cost a stage-1 run: the refreshes' share of training time, and the step-time
overhead of the mined columns against a run without mining.

  python launch/mining_cost.py --mined /tmp/s1_mined --plain /tmp/s1 [--json out.json]

Reads each workdir's summary.json (`start_step`, `step`, `steps_per_s`: timed from the end of the first step
the last invocation ran) and the mined run's mined/refreshes.jsonl (`mining_s` per refresh; only the
refreshes of that invocation count). The refresh before its first step falls outside the timed span, so
the training time is the timed span plus that refresh:

  share      = sum(mining_s) / (timed span + first refresh)
  step time  = (timed span - later refreshes) / timed steps       (mined run; the plain run's: span / steps)
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


def _span(summary: dict, workdir: str) -> tuple[int, int, float]:
  """(first step, timed steps, seconds) of the run's last invocation: its steps after the first."""
  start = int(summary.get("start_step", 0))
  timed = int(summary["step"]) - start - 1
  if not summary.get("steps_per_s") or timed < 1:
    raise SystemExit(f"{workdir}: no timed steps in summary.json (it needs two or more steps in one invocation).")
  return start, timed, timed / float(summary["steps_per_s"])


def mining_cost(mined_dir: str, plain_dir: str | None = None) -> dict:
  summary = _summary(mined_dir)
  start, timed, span = _span(summary, mined_dir)
  with open(os.path.join(mined_dir, "mined", "refreshes.jsonl"), encoding="utf-8") as f:
    refreshes = [r for r in map(json.loads, filter(str.strip, f)) if start <= r["step"] < int(summary["step"])]
  if not refreshes:
    raise SystemExit(f"No refreshes of the last invocation (steps {start}-{summary['step']}) in "
                     f"{mined_dir}/mined/refreshes.jsonl.")
  first = refreshes[0]["mining_s"] if refreshes[0]["step"] == start else 0.0
  later = sum(r["mining_s"] for r in refreshes) - first
  out = {"refreshes": len(refreshes), "mining_s_mean": sum(r["mining_s"] for r in refreshes) / len(refreshes),
         "train_s": span + first, "refresh_share": (first + later) / (span + first),
         "step_s_mined": (span - later) / timed}
  if plain_dir:
    _, plain_timed, plain_span = _span(_summary(plain_dir), plain_dir)
    out["step_s_plain"] = plain_span / plain_timed
    out["step_overhead"] = out["step_s_mined"] / out["step_s_plain"] - 1.0
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mined", required=True, help="workdir of a run with config.mining.enabled")
  ap.add_argument("--plain", default="", help="workdir of the same run without mining")
  ap.add_argument("--json", default="")
  args = ap.parse_args(argv)
  out = mining_cost(args.mined, args.plain or None)
  loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"refreshes {out['refreshes']}, {out['mining_s_mean']:.2f} s each: {100 * out['refresh_share']:.1f}% of "
        f"{out['train_s']:.0f} s of training; step {out['step_s_mined']:.3f} s"
        + (f" vs {out['step_s_plain']:.3f} s without mining ({100 * out['step_overhead']:+.0f}%)"
           if "step_s_plain" in out else "") + f"  [load average now {loadavg:.2f}]")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
