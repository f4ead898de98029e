"""evaluate() across two local JAX processes (gloo CPU collectives), each holding half the batches:
the gathered metrics equal the single-process ones and only process 0 writes the report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.multiprocess import free_port, wait_all
from tests.test_evaluate import _reference, _split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, workdir, search = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
from tests.test_evaluate import _batches, _embed_fn, _split
from afmrl_jax.eval.retrieval import EvalConfig, evaluate
# Process-local shards: alternate batches (the two processes hold different row counts).
gallery = list(_batches(_split("gallery"), batch_size=8))[pid::2]
query = list(_batches(_split("query"), batch_size=8))[pid::2]
metrics = evaluate(_embed_fn, gallery, query, f"{workdir}/p{pid}",
                   EvalConfig(retriever="exact", gallery_search=search))
print("METRICS" + json.dumps(metrics))
"""


@pytest.mark.parametrize("search", ["gathered", "sharded"])
def test_two_process_evaluate_matches_single_process(search, tmp_path):
  """'sharded': each process indexes only the gallery rows it embedded; the merged top-k lists, the
  category centroids added up across processes and the gathered k-means sample give the same metrics."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(pid), str(tmp_path), search], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in range(2)]
  outs = [json.loads(out.split("METRICS", 1)[1]) for out, _ in wait_all(procs, 120, "multi-process evaluate")]
  expected, *_ = _reference()
  for metrics in outs:
    for name, value in expected.items():
      assert metrics[name] == pytest.approx(value, abs=1e-9), name
  assert os.path.isfile(tmp_path / "p0" / "eval" / "metrics.json")
  if search == "gathered":
    assert not os.path.exists(tmp_path / "p1" / "eval")
  else:  # each process keeps its own gallery shard and index; together they are the whole gallery
    shards = [np.load(tmp_path / f"p{p}" / "eval" / f"gallery_embeddings.process-00{p}.npz") for p in range(2)]
    assert all(os.path.isdir(tmp_path / f"p{p}" / "eval" / "index" / f"process-00{p}") for p in range(2))
    assert not os.path.exists(tmp_path / "p1" / "eval" / "metrics.json")
    ids = np.concatenate([s["listing_id"] for s in shards])
    assert sorted(ids.tolist()) == sorted(r[0] for r in _split("gallery"))
