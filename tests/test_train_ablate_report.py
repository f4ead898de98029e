"""launch/ablate_report.py: mean +- std per arm and paired-by-seed differences, on hand-made summaries."""

import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

import ablate_report  # noqa: E402


def _write(root, arm, seed, r1):
  d = root / arm / f"seed{seed}"
  d.mkdir(parents=True)
  (d / "summary.json").write_text(json.dumps({"eval": {"recall@1": r1}, "last_loss": 1.0}))


def test_paired_differences(tmp_path):
  base = {0: 0.50, 1: 0.60, 2: 0.70}
  arm = {0: 0.55, 1: 0.62, 2: 0.78, 3: 0.99}  # seed 3 has no baseline partner: not paired
  for s, v in base.items():
    _write(tmp_path, "infonce", s, v)
  for s, v in arm.items():
    _write(tmp_path, "agcl", s, v)
  (tmp_path / "agcl" / "seed9").mkdir()  # unfinished run: ignored
  summary = ablate_report.summarize(ablate_report.load(str(tmp_path)), "infonce", ["recall@1"])
  a = summary["arms"]["agcl"]["recall@1"]
  assert a["n"] == 4 and math.isclose(a["mean"], (0.55 + 0.62 + 0.78 + 0.99) / 4)
  d = a["paired_diff"]
  diffs = [0.05, 0.02, 0.08]
  assert d["n"] == 3 and math.isclose(d["mean"], 0.05)
  std = math.sqrt(sum((x - 0.05) ** 2 for x in diffs) / 2)
  assert math.isclose(d["std"], std) and math.isclose(d["t"], 0.05 / (std / math.sqrt(3)))
  b = summary["arms"]["infonce"]["recall@1"]
  assert math.isclose(b["std"], 0.1) and "paired_diff" not in b
  text = ablate_report.table(summary, ["recall@1"])
  assert "| infonce | 3 | 0.600 +- 0.100 | (baseline) | - |" in text
  assert "+0.050 +- 0.030" in text
