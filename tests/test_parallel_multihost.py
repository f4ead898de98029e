"""The host-side collectives of `afmrl_jax.parallel` across two local JAX processes (gloo): each process
passes different values and every process must see the same, expected answer."""

import json
import os
import subprocess
import sys

from tests.multiprocess import free_port, wait_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
from afmrl_jax import parallel
table = {"table": np.full((3, 2), 10 * pid + 1, np.int32), "scores": np.full((3, 2), -np.inf if pid else 0.5, np.float32)}
got = parallel.from_process_0(table)
out = {
    "from_process_0": {k: v.tolist() for k, v in got.items()},
    "dtypes": [str(got["table"].dtype), str(got["scores"].dtype)],
    "any_signal_on_1": parallel.any_process(pid == 1),
    "any_none": parallel.any_process(False),
    "agree": parallel.agree(pid == 0),
    "gathered": parallel.gather_processes(np.asarray([pid, 5 + pid], np.int32)).tolist(),
}
print("OUT" + json.dumps(out))
"""


def test_collectives_give_every_process_the_same_answer(tmp_path):
  port = free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(pid)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
  outs = [json.loads(out.split("OUT", 1)[1]) for out, _ in wait_all(procs, 120, "parallel collectives")]
  for out in outs:
    assert out["from_process_0"] == {"table": [[1, 1]] * 3, "scores": [[0.5, 0.5]] * 3}  # process 1 had 11, -inf
    assert out["dtypes"] == ["int32", "float32"]
    assert out["any_signal_on_1"] is True and out["any_none"] is False
    assert out["agree"] is True  # process 0's flag, though process 1 passed False
    assert out["gathered"] == [0, 5, 1, 6]  # process order
