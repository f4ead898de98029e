"""The generate stage: committed shards, kill -9 at any point, rerun: every listing once, same bytes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.multiprocess import free_port, wait_all
from tests.test_main import ROOT, _env

ARGS = ["--config=configs/generate.py:ci", "--config.catalog.families_per_category=3",
        "--config.pipeline.fresh_views=False", "--config.generation.shard_size=16",
        "--config.generator.eval_batch_size=8"]


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
  """A few SFT steps of the `ci` generator (its checkpoint is what the generate stage loads)."""
  import configs.sft as sft_configs
  from afmrl_jax.config import schema
  from afmrl_jax.stages.sft import run as sft
  root = tmp_path_factory.mktemp("gen")
  config = sft_configs.get_config("ci")
  config.catalog.cache_dir = str(root / "cache")
  config.catalog.families_per_category = 3
  config.pipeline.fresh_views = False
  config.train.num_steps = 4
  config.train.eval_at_end = False
  sft.train(schema.parse(config), str(root / "sft"))
  return root


def _generate(root, workdir, env=None, **popen):
  args = [sys.executable, "-m", "afmrl_jax.main", *ARGS, f"--workdir={workdir}",
          f"--config.catalog.cache_dir={root / 'cache'}", f"--config.checkpoint.restore_dir={root / 'sft'}"]
  return subprocess.Popen(args, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen)


@pytest.fixture(scope="module")
def whole_run(sft_workdir):
  """The bytes of one uninterrupted single-process run."""
  root = sft_workdir
  whole = _generate(root, root / "whole")
  out, _ = whole.communicate(timeout=600)
  assert whole.returncode == 0, out[-3000:]
  return (root / "whole" / "generated" / "attributes.jsonl").read_bytes()


def test_kill_9_midway_then_rerun_gives_every_listing_once_and_the_same_bytes(sft_workdir, whole_run):
  root, expected = sft_workdir, whole_run
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


def test_two_processes_write_the_union_once_with_the_same_bytes_as_one(sft_workdir, whole_run):
  """Two `jax.distributed` processes (one CPU device each) split the shards; process 0 joins them."""
  root = sft_workdir
  port = free_port()
  procs = []
  for pid in range(2):
    env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    procs.append(_generate(root, root / "two", env=env))
  outs = [out for out, _ in wait_all(procs, 600, "two-process generation")]
  assert "[process 0] shard 1/" in outs[0] and "[process 1] shard 2/" in outs[1]  # each its own shards
  summary = json.loads(outs[0][outs[0].index("{"):])
  num_shards = len(list((root / "two" / "generated").glob("shard-*.jsonl")))
  assert summary["generated_now"] < summary["listings"] and num_shards >= 4
  assert (root / "two" / "generated" / "attributes.jsonl").read_bytes() == whole_run
