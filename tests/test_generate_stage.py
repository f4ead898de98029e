"""The generate stage: committed shards, kill -9 at any point, rerun: every listing once, same bytes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_main import ROOT, _env

ARGS = ["--config=configs/generate.py:ci", "--config.catalog.families_per_category=3",
        "--config.pipeline.fresh_views=False", "--config.generation.shard_size=16",
        "--config.generator.eval_batch_size=8"]


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
  """A few SFT steps of the `ci` generator (its checkpoint is what the generate stage loads)."""
  import configs.sft as sft_configs
  from afmrl_jax.train import sft
  root = tmp_path_factory.mktemp("gen")
  config = sft_configs.get_config("ci")
  config.catalog.cache_dir = str(root / "cache")
  config.catalog.families_per_category = 3
  config.pipeline.fresh_views = False
  config.train.num_steps = 4
  config.train.eval_at_end = False
  sft.train(config, str(root / "sft"))
  return root


def _generate(root, workdir, **popen):
  args = [sys.executable, "-m", "afmrl_jax.main", *ARGS, f"--workdir={workdir}",
          f"--config.catalog.cache_dir={root / 'cache'}", f"--config.checkpoint.restore_dir={root / 'sft'}"]
  return subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **popen)


def test_kill_9_midway_then_rerun_gives_every_listing_once_and_the_same_bytes(sft_workdir):
  root = sft_workdir
  whole = _generate(root, root / "whole")
  out, _ = whole.communicate(timeout=600)
  assert whole.returncode == 0, out[-3000:]
  expected = (root / "whole" / "generated" / "attributes.jsonl").read_bytes()
  rows = [json.loads(line) for line in expected.decode().splitlines()]
  ids = [r["listing_id"] for r in rows]
  assert ids == sorted(set(ids)) and len(ids) > 32  # every listing once, in listing-id order
  assert all(set(r) == {"listing_id", "attributes", "malformed"} for r in rows)

  folder = root / "killed" / "generated"
  proc = _generate(root, root / "killed")
  deadline = time.time() + 600
  while not (folder / "shard-00001.jsonl").exists():  # two shards committed, the rest not yet
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert not (folder / "attributes.jsonl").exists()
  rerun = _generate(root, root / "killed")
  out, _ = rerun.communicate(timeout=600)
  assert rerun.returncode == 0, out[-3000:]
  summary = json.loads(out[out.index("{"):])
  assert summary["resumed_shards"] >= 2 and summary["listings"] == len(ids)
  assert (folder / "attributes.jsonl").read_bytes() == expected
  assert not [name for name in os.listdir(folder) if ".tmp-" in name]  # a killed write's leftovers are gone
