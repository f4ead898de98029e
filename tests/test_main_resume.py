"""Resuming a workdir through `python -m afmrl_jax.main`, as a user meets it: a changed run length moves the
learning-rate schedule (said in one line and recorded), and with mined negatives the evaluation batch size
is part of the config that guards the checkpoints (the mining refresh embeds with it)."""

import json
import os
import shutil

import pytest

from afmrl_jax.train import workdir as workdir_lib
from tests.test_main import _main

STEPS = 2


def _args(workdir, cache, steps, *extra):
  # Mining on (a refresh before the first step and at step 2): the run the eval_batch_size test needs.
  return ("--config=configs/stage1.py:ci", f"--workdir={workdir}", f"--config.catalog.cache_dir={cache}",
          "--config.catalog.families_per_category=4", "--config.pipeline.fresh_views=False",
          "--config.train.eval_at_end=False", f"--config.train.num_steps={steps}", "--config.mining.enabled=True",
          "--config.mining.every=2", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  proc = _main(*_args(root / "base", root / "cache", STEPS), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root


@pytest.fixture
def workdir(trained, tmp_path):
  path = tmp_path / "run"
  shutil.copytree(trained / "base", path)
  return path


def test_a_resume_that_changes_num_steps_says_the_schedule_changes_and_records_it(trained, workdir):
  proc = _main(*_args(workdir, trained / "cache", 4), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [line] = [l for l in proc.stdout.splitlines() if "config.train.num_steps" in l]
  changes = workdir / workdir_lib.CHANGES_FILE
  assert line.startswith(f"config.train.num_steps changed {STEPS} -> 4 at step {STEPS}: the learning-rate "
                         "schedule (warmup, then cosine decay to step 4) changes with it"), line
  assert line.endswith(f"recorded in {changes}")
  assert f"resumed from step {STEPS}" in proc.stdout
  [row] = [json.loads(l) for l in changes.read_text().splitlines()]
  assert row["step"] == STEPS and row["changes"] == {"config.train.num_steps": [STEPS, 4]}
  old_lr, new_lr = row["learning_rate_at_step"]
  assert new_lr > old_lr  # ci: warmup 2 steps; at step 2 the 2-step cosine has reached its floor
  assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 4

def test_with_mining_a_changed_eval_batch_size_is_refused_on_resume(trained, workdir):
  base = json.loads((trained / "base" / "config.json").read_text())["pipeline"]["eval_batch_size"]
  proc = _main(*_args(workdir, trained / "cache", STEPS + 1, "--config.pipeline.eval_batch_size=16"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 2 and "Traceback" not in proc.stderr, lines
  assert lines[0].endswith(f"config.pipeline.eval_batch_size: {base} -> 16"), lines[0]
  assert lines[1].startswith("hint: ") and "allow_config_change=True" in lines[1]
  assert not (workdir / workdir_lib.CHANGES_FILE).exists()


def test_eval_batch_size_is_fingerprinted_only_with_mining():
  from configs import stage1 as stage1_configs
  for mining in (False, True):
    a, b = stage1_configs.get_config("ci"), stage1_configs.get_config("ci")
    a.mining.enabled = b.mining.enabled = mining
    b.pipeline.eval_batch_size = 2 * a.pipeline.eval_batch_size
    changes = workdir_lib.differences(workdir_lib.fingerprint_fields(a.to_dict()),
                                      workdir_lib.fingerprint_fields(b.to_dict()))
    assert list(changes) == (["config.pipeline.eval_batch_size"] if mining else []), mining
