"""evaluate() across two local JAX processes (gloo CPU collectives), each holding half the batches:
the gathered metrics equal the single-process ones and only process 0 writes the report."""

import json
import os
import subprocess
import sys

import pytest

from tests.multiprocess import free_port, wait_all
from tests.test_evaluate import _reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
from tests.test_evaluate import _batches, _embed_fn, _split
from afmrl_jax.train.evaluate import EvalConfig, evaluate
# Process-local shards: alternate batches (the two processes hold different row counts).
gallery = list(_batches(_split("gallery"), batch_size=8))[pid::2]
query = list(_batches(_split("query"), batch_size=8))[pid::2]
metrics = evaluate(_embed_fn, gallery, query, f"{workdir}/p{pid}", EvalConfig(retriever="exact"))
print("METRICS" + json.dumps(metrics))
"""


def test_two_process_evaluate_matches_single_process(tmp_path):
  port = free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(pid), str(tmp_path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in range(2)]
  outs = [json.loads(out.split("METRICS", 1)[1]) for out, _ in wait_all(procs, 120, "multi-process evaluate")]
  expected, *_ = _reference()
  for metrics in outs:
    for name, value in expected.items():
      assert metrics[name] == pytest.approx(value, abs=1e-9), name
  assert os.path.isfile(tmp_path / "p0" / "eval" / "metrics.json")
  assert not os.path.exists(tmp_path / "p1" / "eval")
