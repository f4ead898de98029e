"""orbax checkpoints of the train state and the data iterator, and clean stops on SIGTERM/SIGINT.

Layout: `<workdir>/checkpoints/<step>/{state,data}`: `state` is the train-state dict (step, trainable
params, optimizer state; frozen weights are rebuilt from the seed or the HF checkpoint), `data` the
grain iterator state as JSON, so a resumed run reads exactly the batches an uninterrupted one would.
Saves are asynchronous; `close()` waits for the last one, so a process never exits mid-write.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from afmrl_jax.config.sections import CheckpointOptions
from afmrl_jax.errors import WorkdirError



def checkpoint_dir(path: str) -> str:
  """The checkpoint folder of a workdir (`<path>/checkpoints`), or `path` itself when it is one."""
  path = os.path.normpath(path)
  return path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")


def has_checkpoint(path: str) -> bool:
  """Whether the workdir (or checkpoint folder) `path` holds at least one saved step."""
  folder = checkpoint_dir(path)
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def saved_steps(path: str) -> list[int]:
  """The saved steps of the workdir (or checkpoint folder) `path`, ascending, read from the folder names
  (no orbax manager is opened)."""
  folder = checkpoint_dir(path)
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def latest_saved_step(path: str) -> int | None:
  """The highest saved step of the workdir (or checkpoint folder) `path`; None without one."""
  steps = saved_steps(path)
  return steps[-1] if steps else None


def _path_name(path: tuple[Any, ...]) -> str:
  """A jax key path as dotted text (`params.text.layers.0.mlp.kernel`), whatever the container kinds."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def shape_mismatch(saved: Any, target: Any) -> str | None:
  """The first leaf whose shape differs between the checkpoint's array metadata `saved` and the target
  tree `target` (arrays or ShapeDtypeStructs), as one sentence; None when every shared leaf agrees.

  Compared by dotted path, so namedtuples (stored as dicts) and tuples (stored as lists) line up. A
  parameter that only one side has is reported too; other missing leaves are left to orbax."""
  saved_leaves = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  target_leaves = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  for name in sorted(target_leaves, key=lambda n: (not n.startswith("params."), n)):
    if name not in saved_leaves:
      if name.startswith("params."):
        return f"{name} (shape {tuple(target_leaves[name].shape)}) is in the model but not in the checkpoint"
      continue
    a, b = getattr(saved_leaves[name], "shape", None), getattr(target_leaves[name], "shape", None)
    if a is not None and b is not None and tuple(a) != tuple(b):
      return f"{name} has shape {tuple(a)} in the checkpoint but {tuple(b)} in the model"
  for name in sorted(saved_leaves):
    if name.startswith("params.") and name not in target_leaves:
      return f"{name} (shape {tuple(saved_leaves[name].shape)}) is in the checkpoint but not in the model"
  return None


def _mismatch_error(message: str, hint: str) -> Exception:
  return WorkdirError(message, hint)


def _encode_data_state(state: Any) -> Any:
  """grain iterator states are dicts (datasets) or bytes (DataLoader); JSON needs text."""
  if isinstance(state, (bytes, bytearray)):
    return {"__bytes_b64__": base64.b64encode(bytes(state)).decode("ascii")}
  return state


def _decode_data_state(state: Any) -> Any:
  if isinstance(state, dict) and set(state) == {"__bytes_b64__"}:
    return base64.b64decode(state["__bytes_b64__"])
  return state


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory`; async saves, resume from the latest."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, every: int = 100):
    self.directory = directory
    self.every = every
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
    )

  @classmethod
  def for_workdir(cls, workdir: str, options: CheckpointOptions) -> "Checkpointer | None":
    """The run's checkpointer under `<workdir>/checkpoints`; None when checkpoints are disabled."""
    if not options.enabled:
      return None
    return cls(checkpoint_dir(workdir), keep=options.keep, async_save=options.async_save, every=options.every)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: dict[str, Any], data_state: Any = None) -> bool:
    """Starts saving `state` (and the data iterator's state) as `step`; False if it already exists."""
    if step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(_encode_data_state(data_state))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    return True

  def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Restores the train state onto the shardings in `abstract_state` (ShapeDtypeStructs).

    Returns (state, data_state or None).
    """
    self.check_shapes(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], (_decode_data_state(restored["data"]) if has_data else None)

  def check_shapes(self, step: int, abstract_state: dict[str, Any]) -> None:
    """Raises a one-line `workdir.WorkdirError` when the checkpoint's arrays (read from its metadata,
    nothing loaded) do not have the shapes of `abstract_state`: the model changed since it was saved."""
    path = os.path.join(self.directory, str(step), "state")
    try:
      saved = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
    except Exception as e:  # unreadable metadata: leave the verdict to the restore itself
      logging.warning("Could not read the array metadata of %s (%s); restoring without a shape check.", path, e)
      return
    problem = shape_mismatch(getattr(saved, "tree", saved), abstract_state)
    if problem:
      raise _mismatch_error(
          f"The checkpoint {self.directory}/{step} does not fit this model: {problem}",
          "the model config (config.model, config.lora) differs from the run that saved it: use that run's "
          "config or a new --workdir")

  def restore_latest(self, state: dict[str, Any], data: Any = None) -> tuple[dict[str, Any], int | None]:
    """(latest state, its step) restored onto the shardings of `state`, or (state, None) when there is
    no checkpoint. The data iterator `data` (grain `set_state`) is moved to the saved position."""
    step = self.latest_step()
    if step is None:
      return state, None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, data_state = self.restore(step, abstract)
    if data_state is not None and hasattr(data, "set_state"):
      data.set_state(data_state)
    logging.info("Resumed from %s/%d.", self.directory, step)
    return restored, step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending async saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(workdir: str, state: dict[str, Any]) -> Any:
  """The trainable params of the latest checkpoint of `workdir`, onto the shardings of `state['params']`
  (`state` is a train state of the same model and optimizer kind)."""
  checkpointer = Checkpointer(checkpoint_dir(workdir), async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"config.checkpoint.init_from={workdir!r} holds no checkpoint.")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, _ = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  logging.info("Initialised the params from %s step %d.", workdir, step)
  return restored["params"]


class StopRequest:
  """Set by SIGTERM/SIGINT; the trainer checks it after each step, saves and exits cleanly."""

  def __init__(self):
    self._event = threading.Event()
    self.signal_name = ""

  def __bool__(self) -> bool:
    return self._event.is_set()

  def set(self, name: str = "request") -> None:
    self.signal_name = name
    self._event.set()


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[StopRequest]:
  """Within the block, SIGTERM/SIGINT set the yielded StopRequest instead of killing the process.

  A second signal of the same kind falls through to the previous handler (so a stuck run can still
  be interrupted). Handlers are only installed on the main thread (signal's own restriction).
  """
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = {}

  def handler(signum, frame):
    name = signal.Signals(signum).name
    if request:
      logging.warning("Second %s: stopping without waiting.", name)
      old = previous.get(signum)
      if callable(old):
        old(signum, frame)
      raise KeyboardInterrupt(name)
    logging.warning("%s received: saving a checkpoint and stopping after this step (with several processes:"
                    " at the next step where they agree, train.stop_check_every).", name)
    request.set(name)

  for sig in signals:
    previous[sig] = signal.signal(sig, handler)
  try:
    yield request
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)
