"""The Python examples in docs/agcl_loss.md run as written (in order, one namespace)."""
import pathlib
import re

import jax
import numpy as np

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "agcl_loss.md"


def test_doc_examples_run_and_agree():
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
  assert len(blocks) >= 4
  namespace = {}
  for block in blocks:
    exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
  # The shard_map example's loss equals agcl_loss on the same data (dense reference).
  ns = namespace
  mesh, spec = ns["mesh"], ns["P"](("data", "fsdp"))
  host = ns["host"]
  q = ns["encode"](jax.device_get(ns["params"]), host["query"])
  c = ns["encode"](jax.device_get(ns["params"]), host["candidate"])
  fn = jax.jit(jax.shard_map(ns["local_step"], mesh=mesh, in_specs=(spec,) * 4, out_specs=(ns["P"](), ns["P"]())))
  args = [jax.device_put(x, ns["NamedSharding"](mesh, spec)) for x in (q, c, host["query_terms"], host["candidate_terms"])]
  loss, _ = fn(*args)
  ref, _ = ns["agcl_loss"](q, c, host["query_terms"], host["candidate_terms"], ns["idf"], 6.0, ns["config"])
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  np.testing.assert_allclose(float(ns["loss"]), float(ref), rtol=1e-5)  # GradCache block's loss
