"""Mesh shape resolution, logical-axis rules and batch assembly (8 simulated CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from afmrl_jax import parallel


def test_resolve_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
  assert parallel.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert parallel.resolve_mesh_shape({"data": -1}, 8) == (8, 1, 1)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    parallel.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="does not divide"):
    parallel.resolve_mesh_shape({"data": -1, "tensor": 3}, 8)
  with pytest.raises(ValueError, match="covers 4 devices but 8"):
    parallel.resolve_mesh_shape({"data": 2, "tensor": 2}, 8)


def test_logical_to_spec_uses_each_mesh_axis_once_and_drops_non_dividing_axes():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  assert parallel.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert parallel.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)  # fsdp taken by batch
  assert parallel.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  # 6 is not divisible by the 4-way tensor axis: replicated on that dimension instead of failing.
  assert parallel.logical_to_spec(("embed", "heads"), (64, 6), mesh) == P("fsdp", None)
  # batch: data (size 1) divides 8, fsdp (2) too -> both kept; 3 rows: only data (size 1) divides.
  assert parallel.logical_to_spec(("batch",), (8,), mesh) == P(("data", "fsdp"))
  assert parallel.logical_to_spec(("batch",), (3,), mesh) == P("data")


def test_global_batch_is_sharded_over_the_batch_axes():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  local = {"x": np.arange(32, dtype=np.int32).reshape(8, 4)}
  batch = parallel.global_batch(local, mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
  row_blocks = {s.index[0].indices(8) for s in batch["x"].addressable_shards}
  assert len(row_blocks) == 4  # 4 row blocks of 2; the tensor axis replicates them
  assert jax.device_count() == 8
