"""Device mesh, logical-axis rules and multi-host set-up.

The mesh has three axes:
  * `data`   pure data parallelism (parameters replicated),
  * `fsdp`   data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
  * `tensor` tensor (model) parallelism inside layers.
The global batch is split over (`data`, `fsdp`). Parameters carry *logical* axis names
(`embed`, `mlp`, `heads`, ...) and `LOGICAL_RULES` is the single table mapping them to mesh axes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes). Earlier rules win when a mesh axis is already taken.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("q_heads_x_dim", "tensor"),  # fused [heads * head_dim] projections
    ("kv_heads_x_dim", "tensor"),
    ("head_dim", None),
    ("seq", None),
    ("patch", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("lora_rank", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """Sizes of the mesh axes; one of them may be -1 (the rest of the devices)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


def resolve_mesh_shape(shape: Mapping[str, int] | MeshShape, num_devices: int) -> tuple[int, ...]:
  """Fills a single -1 entry so the product equals `num_devices`.

  Args:
    shape: {'data': d, 'fsdp': f, 'tensor': t} or a MeshShape, at most one of them -1.
    num_devices: devices to cover.
  Returns:
    (data, fsdp, tensor) sizes.
  Raises:
    ValueError naming the `mesh` config fields when the shape cannot cover the devices.
  """
  if isinstance(shape, MeshShape):
    shape = dataclasses.asdict(shape)
  unknown = [name for name in MESH_AXES if shape.get(name, 1) == -1]
  if len(unknown) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(shape)}.")
  known = int(np.prod([shape.get(name, 1) for name in MESH_AXES if name not in unknown]))
  if known <= 0 or num_devices % known:
    raise ValueError(
        f"config.mesh {dict(shape)} does not divide the {num_devices} available devices; "
        "set one axis to -1 or make the product equal the device count.")
  sizes = {name: shape.get(name, 1) for name in MESH_AXES}
  if unknown:
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"config.mesh {dict(shape)} covers {known} devices but {num_devices} are available; "
        "set one axis to -1 to fill the rest.")
  return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(shape: Mapping[str, int] | MeshShape | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (`data`, `fsdp`, `tensor`) mesh; `shape` defaults to all devices on `data`."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(shape or {"data": -1}, len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules() -> contextlib.AbstractContextManager:
  """Context in which NNX resolves logical parameter axes with `LOGICAL_RULES`."""
  return nnx.logical_axis_rules(LOGICAL_RULES)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
                    rules=LOGICAL_RULES) -> PartitionSpec:
  """Maps the logical axis names of one array to a PartitionSpec.

  Each mesh axis is used at most once. Given `shape` and `mesh`, a mesh axis that is not in the mesh or
  does not divide its dimension is dropped for that dimension (a 2-head vision tower on a 4-way
  `tensor` axis is replicated there instead of failing), so one rules table serves every model size.
  """
  if not names:
    return PartitionSpec()
  table = dict(rules)
  dims = shape if shape is not None else (None,) * len(names)
  used: set[str] = set()
  spec = []
  for dim, name in zip(dims, names):
    target = table.get(name) if name is not None else None
    kept: list[str] = []
    for axis in (target,) if isinstance(target, str) else tuple(target or ()):
      if axis in used:
        continue
      if mesh is not None:
        if axis not in mesh.shape:
          continue
        if dim is not None and dim % (int(np.prod([mesh.shape[a] for a in kept])) * mesh.shape[axis]):
          continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-major array: leading axis over (`data`, `fsdp`), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's batch slice into global arrays sharded over the batch axes.

  Args:
    local_batch: name -> [local_batch, ...] NumPy arrays of this process.
  Returns:
    name -> [global_batch, ...] jax.Arrays.
  """
  return {
      key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), np.asarray(value))
      for key, value in local_batch.items()
  }


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
  """This process's rows of `x` [global_batch, ...] (sharded over the batch axes, as `global_batch` makes
  it) as NumPy [local_batch, ...]: the rows this process fed. All of `x` with one process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, PartitionSpec(BATCH_AXES)))


def gather_rows(x: jax.Array) -> np.ndarray:
  """Every row of the global array `x` as NumPy, on every process (`x` itself when it lives on this
  process's devices only, e.g. on a per-process mesh)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_processes(x: np.ndarray) -> np.ndarray:
  """Every process's NumPy `x` [n, ...] (the same shape on each) concatenated in process order:
  [processes * n, ...] (the row order of `global_batch`). `x` itself with one process. Through jax arrays:
  int64 / float64 travel as int32 / float32 unless jax_enable_x64."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  g = np.asarray(multihost_utils.process_allgather(np.asarray(x)))
  return g.reshape((-1,) + g.shape[2:])


def is_process_0() -> bool:
  """Whether this is process 0, the one that writes shared files, prints summaries and logs (the only
  "am I process 0" check: every other module asks this)."""
  return jax.process_index() == 0


def agree(flag: bool) -> bool:
  """Process 0's `flag` on every process: a decision that leads to collectives (load a file or compute
  it) must be the same everywhere, even when a shared filesystem shows the processes different things."""
  return bool(from_process_0(np.int32(bool(flag))))


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (a collective: every process must call it at the same point)."""
  return bool(gather_processes(np.asarray([flag], np.int32)).any())


def from_process_0(tree: Any) -> Any:
  """Process 0's pytree of NumPy arrays on every process (itself with one process). Through jax arrays:
  int64 / float64 travel as int32 / float32 unless jax_enable_x64."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` only when a cluster is detected.

  Detected: an explicit coordinator (`JAX_COORDINATOR_ADDRESS`), a TPU pod slice, SLURM or Open MPI
  with more than one task. Returns True if initialised.
  """
  env = os.environ
  # CPU processes (local multi-process runs, tests) exchange collectives through gloo.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  multi_task = any(int(env.get(k, "1")) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  tpu_pod = "TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]),
        process_id=int(env["JAX_PROCESS_ID"]))
    return True
  if multi_task or tpu_pod:
    jax.distributed.initialize()
    return True
  return False


def barrier(name: str) -> None:
  """Returns once every process has reached the barrier `name` (at once with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
