"""launch/mining_cost.py on hand-made workdirs: the refresh share and the step overhead by hand."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

import mining_cost  # noqa: E402


def _run(path, steps, steps_per_s, refreshes=None, start=0):
  path.mkdir()
  (path / "summary.json").write_text(json.dumps({"start_step": start, "step": steps, "steps_per_s": steps_per_s}))
  if refreshes is not None:
    (path / "mined").mkdir()
    (path / "mined" / "refreshes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refreshes))


def test_share_and_overhead(tmp_path):
  # 201 steps: 200 timed at 2 steps/s = 100 s, which include the step-100 refresh (4 s); the step-0 refresh
  # (6 s) happens before the timed span. Training 106 s, mining 10 s; steps (100 - 4) / 200 = 0.48 s.
  _run(tmp_path / "mined", 201, 2.0, [{"step": 0, "mining_s": 6.0}, {"step": 100, "mining_s": 4.0}])
  _run(tmp_path / "plain", 201, 2.5)  # 200 / 2.5 = 80 s: 0.4 s per step
  out = mining_cost.mining_cost(str(tmp_path / "mined"), str(tmp_path / "plain"))
  assert out["refreshes"] == 2 and out["mining_s_mean"] == pytest.approx(5.0)
  assert out["train_s"] == pytest.approx(106.0) and out["refresh_share"] == pytest.approx(10 / 106)
  assert out["step_s_mined"] == pytest.approx(0.48) and out["step_s_plain"] == pytest.approx(0.4)
  assert out["step_overhead"] == pytest.approx(0.2)


def test_a_resumed_run_counts_only_its_own_refreshes(tmp_path):
  # Resumed at step 150 (mining again there, untimed) and ran to 200: 49 timed steps at 1 step/s; the first
  # invocation's refreshes (steps 0 and 100) do not count.
  _run(tmp_path / "mined", 200, 1.0, [{"step": 0, "mining_s": 9.0}, {"step": 100, "mining_s": 9.0},
                                      {"step": 150, "mining_s": 3.0}], start=150)
  out = mining_cost.mining_cost(str(tmp_path / "mined"))
  assert out["refreshes"] == 1 and out["train_s"] == pytest.approx(52.0)
  assert out["refresh_share"] == pytest.approx(3 / 52) and out["step_s_mined"] == pytest.approx(1.0)
  _run(tmp_path / "short", 1, None, [{"step": 0, "mining_s": 1.0}])
  with pytest.raises(SystemExit, match="no timed steps"):
    mining_cost.mining_cost(str(tmp_path / "short"))
