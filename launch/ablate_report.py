"""Aggregates a stage-1 ablation grid: mean +- std per arm over seeds, and differences paired by seed.

Reads `<root>/<arm>/seed<k>/summary.json` (written by `python -m afmrl_jax.main`, see ablate_stage1.sh) and
prints a markdown table: per arm the number of seeds, mean +- sample std of each metric, and for each arm
the paired difference to the baseline arm (mean +- std over the seeds both have, and mean / std-of-mean,
a paired t statistic). `--pairs A:B ...` adds a table of A - B for chosen pairs of arms, with whether A
beats B by more than twice the seed std of the difference (the rule the mined-negatives ablation uses to
change a default). Writes the same numbers as JSON with --json.

  python launch/ablate_report.py /tmp/ablate --baseline infonce --metrics recall@1 recall@5 map@10
  python launch/ablate_report.py /tmp/ablate_mining --baseline uniform_margin \
      --pairs agcl_mined:uniform_margin_mined agcl_mined:agcl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys


def load(root: str) -> dict[str, dict[int, dict[str, float]]]:
  """arm -> seed -> flat metrics (eval metrics plus last_loss) of the finished runs under `root`."""
  out: dict[str, dict[int, dict[str, float]]] = {}
  for arm in sorted(os.listdir(root)):
    arm_dir = os.path.join(root, arm)
    if not os.path.isdir(arm_dir):
      continue
    for name in sorted(os.listdir(arm_dir)):
      m = re.fullmatch(r"seed(\d+)", name)
      path = os.path.join(arm_dir, name, "summary.json")
      if not m or not os.path.isfile(path):
        continue
      with open(path) as f:
        summary = json.load(f)
      if "eval" not in summary:
        continue  # stopped early / not evaluated
      row = dict(summary["eval"])
      row["last_loss"] = summary.get("last_loss")
      out.setdefault(arm, {})[int(m.group(1))] = row
  return out


def mean_std(values: list[float]) -> tuple[float, float]:
  n = len(values)
  if n == 0:
    return math.nan, math.nan
  mean = sum(values) / n
  if n == 1:
    return mean, math.nan
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired(arm: dict[int, dict[str, float]], other: dict[int, dict[str, float]], metric: str) -> dict | None:
  """`arm` - `other` on the seeds both have: mean, sample std, n and t = mean / (std / sqrt(n)); None when
  no seed is shared."""
  common = [s for s in sorted(arm) if s in other and arm[s].get(metric) is not None
            and other[s].get(metric) is not None]
  if not common:
    return None
  diffs = [arm[s][metric] - other[s][metric] for s in common]
  d_mean, d_std = mean_std(diffs)
  t = d_mean / (d_std / math.sqrt(len(diffs))) if len(diffs) > 1 and d_std > 0 else math.nan
  return {"mean": d_mean, "std": d_std, "n": len(diffs), "t": t}


def summarize(runs, baseline: str, metrics: list[str], pairs: tuple[tuple[str, str], ...] = ()) -> dict:
  result = {"baseline": baseline, "arms": {}, "pairs": {}}
  base = runs.get(baseline, {})
  for arm, seeds in runs.items():
    entry = {"seeds": sorted(seeds)}
    for metric in metrics:
      values = [seeds[s][metric] for s in sorted(seeds) if seeds[s].get(metric) is not None]
      mean, std = mean_std(values)
      entry[metric] = {"mean": mean, "std": std, "n": len(values)}
      diff = paired(seeds, base, metric) if arm != baseline else None
      if diff:
        entry[metric]["paired_diff"] = diff
    result["arms"][arm] = entry
  for a, b in pairs:
    diff = paired(runs.get(a, {}), runs.get(b, {}), metrics[0])
    if not diff:
      print(f"ablate_report: no seed shared by {a!r} and {b!r}; pair skipped.", file=sys.stderr)
      continue
    # The verdict needs a spread: None with a single shared seed.
    diff["beats_by_two_std"] = None if math.isnan(diff["std"]) else bool(diff["mean"] > 2 * diff["std"])
    result["pairs"][f"{a} - {b}"] = diff
  return result


def _fmt(mean, std, digits=3):
  if math.isnan(mean):
    return "-"
  return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" +- {std:.{digits}f}")


def table(summary: dict, metrics: list[str]) -> str:
  base = summary["baseline"]
  head = ["arm", "seeds"] + metrics + [f"{m} - {base} (paired)" for m in metrics[:1]] + ["t"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  order = sorted(summary["arms"], key=lambda a: (a != base, a))
  for arm in order:
    e = summary["arms"][arm]
    cells = [arm, str(len(e["seeds"]))]
    cells += [_fmt(e[m]["mean"], e[m]["std"]) for m in metrics]
    d = e[metrics[0]].get("paired_diff")
    cells += [("%+.3f +- %.3f" % (d["mean"], d["std"])) if d and not math.isnan(d["std"]) else
              (("%+.3f" % d["mean"]) if d else "(baseline)" if arm == base else "-"),
              ("%.1f" % d["t"]) if d and not math.isnan(d["t"]) else "-"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def pairs_table(summary: dict, metric: str) -> str:
  """The --pairs differences: one row per pair, with the beats-by-two-std verdict."""
  lines = [f"| {metric}: A - B (paired) | seeds | mean +- std | t | A beats B by > 2 std |", "|---|---|---|---|---|"]
  for name, d in summary["pairs"].items():
    spread = "" if math.isnan(d["std"]) else f" +- {d['std']:.3f}"
    t = "-" if math.isnan(d["t"]) else f"{d['t']:.1f}"
    verdict = {True: "yes", False: "no", None: "-"}[d["beats_by_two_std"]]
    lines.append(f"| {name} | {d['n']} | {d['mean']:+.3f}{spread} | {t} | {verdict} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("root")
  ap.add_argument("--baseline", default="infonce")
  ap.add_argument("--metrics", nargs="+", default=["recall@1", "recall@5", "recall@10", "map@10"])
  ap.add_argument("--pairs", nargs="*", default=[], metavar="A:B",
                  help="extra paired differences A - B on the first metric")
  ap.add_argument("--json", default="")
  args = ap.parse_args(argv)
  pairs = []
  for pair in args.pairs:
    if pair.count(":") != 1:
      sys.exit(f"--pairs takes ARM:OTHER_ARM, got {pair!r}.")
    pairs.append(tuple(pair.split(":")))
  runs = load(args.root)
  if not runs:
    sys.exit(f"No finished runs (<arm>/seed<k>/summary.json with eval metrics) under {args.root}.")
  summary = summarize(runs, args.baseline, args.metrics, tuple(pairs))
  print(table(summary, args.metrics))
  if summary["pairs"]:
    print()
    print(pairs_table(summary, args.metrics[0]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
