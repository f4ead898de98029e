"""The CIT chain across processes: `launch/local_multiprocess.sh` with 2 processes x 2 simulated CPU devices
runs the whole chain (the smallest the config allows: a 4-family catalog, 1-2 steps per training stage)
through every stage on both processes, each stage finishing once, to the numbers of 1 process x 4 devices:
the same generated attributes and, within the all-reduce's rounding, the same losses in every training
stage. (Without a barrier after the generate stage's join, process 1 started stage1 before process 0 had
written the attributes file stage1 reads, and the chain died there.)"""

import json
import os
import subprocess
import sys

import pytest

from tests.test_main import ROOT, _env
from tests.test_train_multihost import SCRIPT

ARGS = ["--config=configs/cit.py:ci", "--config.cit.stages.sft.train.num_steps=2",
        "--config.cit.stages.stage1.train.num_steps=2", "--config.cit.stages.stage2.train.num_steps=1"]
for _stage in ("sft", "generate", "stage1", "stage2"):
  ARGS += [f"--config.cit.stages.{_stage}.catalog.families_per_category=4",
           f"--config.cit.stages.{_stage}.pipeline.fresh_views=False"]
for _stage in ("sft", "stage1", "stage2"):
  ARGS += [f"--config.cit.stages.{_stage}.train.log_every=1"]


def _losses(step_dir):
  with open(step_dir / "metrics.jsonl") as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_cit_two_processes_run_the_chain_like_one(tmp_path):
  from afmrl_jax.config.sections import CHAIN
  from afmrl_jax.stages.cit import DONE
  env = dict(_env(), LOG_DIR=str(tmp_path / "logs"))
  env.pop("XLA_FLAGS")
  two = subprocess.run(["bash", SCRIPT, "2", "2", sys.executable, "-m", "afmrl_jax.main", *ARGS,
                        f"--workdir={tmp_path / 'two'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
  logs = [(tmp_path / "logs" / f"process_{i}.log").read_text(errors="replace") for i in (0, 1)]
  assert two.returncode == 0, logs[1][-3000:] + "\n---\n" + logs[0][-3000:]
  one = subprocess.run([sys.executable, "-m", "afmrl_jax.main", *ARGS, f"--workdir={tmp_path / 'one'}"], cwd=ROOT,
                       env=dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                       capture_output=True, text=True, timeout=1200)
  assert one.returncode == 0, one.stderr[-3000:]

  # Both processes ran the same chain, every stage once, in order; each stage finished (its record once).
  for log in logs:
    announced = [line.split()[2] for line in log.splitlines() if line.startswith("=== CIT: ")]
    assert announced == list(CHAIN), announced
  for step in CHAIN:
    assert (tmp_path / "two" / step / DONE).is_file(), step
  report = json.loads((tmp_path / "two" / "cit_report.json").read_text())
  assert sorted(report) == sorted(CHAIN)

  # The same attributes (greedy decoding of a generator trained to the same losses), each listing once.
  for step in ("generate_sft", "generate_rar"):
    a, b = ((tmp_path / run / step / "generated" / "attributes.jsonl").read_text() for run in ("one", "two"))
    ids = [json.loads(line)["listing_id"] for line in b.splitlines()]
    assert len(ids) == len(set(ids)) == report[step]["listings"] > 0
    assert a == b, step

  # Every training stage's losses: the gradient all-reduce sums in another order across processes.
  for step, steps in (("sft", 2), ("stage1", 2), ("stage2", 1), ("stage1_cit", 1)):
    want, got = _losses(tmp_path / "one" / step), _losses(tmp_path / "two" / step)
    assert sorted(want) == sorted(got) == list(range(1, steps + 1)), step
    for s in want:
      assert got[s] == pytest.approx(want[s], abs=1e-5), (step, s)

  # The same evaluations: the stage-1 rounds' retrieval metrics, stage 2's rewards.
  want = json.loads((tmp_path / "one" / "cit_report.json").read_text())
  for step, keys in (("stage1", ("recall@1", "recall@10", "map@10")), ("stage1_cit", ("recall@1", "recall@10", "map@10")),
                     ("stage2", ("reward_mean_first", "reward_mean_last"))):
    for key in keys:
      assert report[step][key] == pytest.approx(want[step][key], abs=1e-6), (step, key)
