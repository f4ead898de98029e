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


def test_pairs_and_the_two_std_rule(tmp_path):
  a = {0: 0.50, 1: 0.60, 2: 0.70}
  b = {0: 0.40, 1: 0.49, 2: 0.62}  # a - b = 0.10, 0.11, 0.08: mean 0.0967, std 0.0153 -> beats by > 2 std
  c = {0: 0.45, 1: 0.65, 2: 0.60}  # a - c = 0.05, -0.05, 0.10: mean 0.033, std 0.076 -> does not
  for arm, values in (("a", a), ("b", b), ("c", c)):
    for s, v in values.items():
      _write(tmp_path, arm, s, v)
  summary = ablate_report.summarize(ablate_report.load(str(tmp_path)), "b", ["recall@1"],
                                    pairs=(("a", "b"), ("a", "c"), ("a", "missing")))
  ab, ac = summary["pairs"]["a - b"], summary["pairs"]["a - c"]
  assert math.isclose(ab["mean"], 0.29 / 3) and ab["beats_by_two_std"] is True
  assert math.isclose(ac["mean"], 0.1 / 3) and ac["beats_by_two_std"] is False
  assert "a - missing" not in summary["pairs"]
  text = ablate_report.pairs_table(summary, "recall@1")
  assert "| a - b | 3 | +0.097 +- 0.015 |" in text and text.endswith("| no |")
