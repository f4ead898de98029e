"""orbax checkpoints of the train state and the data iterator, and clean stops on SIGTERM/SIGINT.

Layout: `<workdir>/checkpoints/<step>/{state,data}`: `state` is the train-state dict (step, trainable
params, optimizer state; frozen weights are rebuilt from the seed or the HF checkpoint), `data` the
grain iterator state as JSON, so a resumed run reads exactly the batches an uninterrupted one would.
Saves are asynchronous; `close()` waits for the last one, so a process never exits mid-write.

A damaged checkpoint (files cut short or lost: a full disk, a half-copied folder, a bad sync) is found on
resume by a cheap look at its files (`damage`) or by its restore failing; the resume then falls back to the
newest intact step with one warning line, and the trainer moves the damaged steps to
`<workdir>/checkpoints/damaged/<step>` (recorded in `<workdir>/checkpoint_damage.jsonl`) so that later saves
of those steps are not refused. With no intact step the run stops with one line and a hint (exit 2).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from afmrl_jax import parallel
from afmrl_jax.config.sections import CheckpointOptions
from afmrl_jax.errors import UserError, WorkdirError

DAMAGED_DIR = "damaged"  # under the checkpoint folder: steps set aside as damaged, `damaged/<step>`
DAMAGE_RECORD = "checkpoint_damage.jsonl"  # in the workdir: one JSON row per step set aside



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


class DamagedCheckpointError(UserError):
  """No checkpoint of the folder restores: one line naming each step and what is wrong with it, a hint."""

  def __init__(self, message: str, hint: str = ""):
    super().__init__(message)
    self.hint = hint


def _one_line(e: BaseException, limit: int = 200) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _quiet_late_read_callbacks() -> None:
  """When a read of a damaged checkpoint fails, tensorstore's other pending reads still complete and post to
  orbax's finished asyncio loop; each prints `RuntimeError: Event loop is closed` through
  `sys.unraisablehook`, dozens of tracebacks that are no error of ours. Once installed (by the first
  restore), those and only those are dropped; everything else still reaches the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._drops_closed_loop = True
  sys.unraisablehook = hook


def _json_problem(path: str, name: str) -> str | None:
  """Why the JSON file `path` (shown as `name`) is unusable; None when it parses."""
  if not os.path.isfile(path):
    return f"{name} is missing"
  try:
    with open(path, encoding="utf-8") as f:
      json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    return f"{name} is not valid JSON ({_one_line(e, 80)})"
  return None


def _state_problem(folder: str, name: str) -> str | None:
  """Why the orbax array item `folder` is unusable, from its metadata and file sizes (no array is read)."""
  problem = _json_problem(os.path.join(folder, "_METADATA"), f"{name}/_METADATA")
  if problem:
    return problem
  entries = os.listdir(folder)
  if any(e.startswith("ocdbt.process_") for e in entries) and "manifest.ocdbt" not in entries:
    return f"{name}/manifest.ocdbt is missing"
  for root, _, files in os.walk(folder):
    for file in files:
      path = os.path.join(root, file)
      rel = os.path.relpath(path, os.path.dirname(folder))
      if file == "manifest.ocdbt" or os.path.basename(root) == "d":  # the array data and its index
        if os.path.getsize(path) == 0:
          return f"{rel} is empty"
      elif file == "_sharding" or os.path.basename(root) == "array_metadatas":
        problem = _json_problem(path, rel)
        if problem:
          return problem
  return None


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

  def damage(self, step: int) -> str | None:
    """What is visibly wrong with the saved `step` (a missing or empty file, metadata that is not JSON), as a
    few words; None when it looks intact. Cheap: reads the small metadata files and file sizes, no array.
    A truncated array file can pass; its restore then fails, and `restore_latest` falls back as well."""
    folder = os.path.join(self.directory, str(step))
    if not os.path.isdir(folder):
      return "its folder is missing"
    if not os.listdir(folder):
      return "its folder is empty"
    meta = os.path.join(folder, "_CHECKPOINT_METADATA")
    problem = _json_problem(meta, "_CHECKPOINT_METADATA")
    if problem:
      return problem
    with open(meta, encoding="utf-8") as f:
      handlers = json.load(f).get("item_handlers") or {"state": ""}
    for item in sorted(handlers):
      path = os.path.join(folder, item)
      if not os.path.isdir(path):
        return f"its '{item}' folder is missing"
      if item == "state":
        problem = _state_problem(path, item)
      elif item == "data":
        problem = _json_problem(os.path.join(path, "metadata"), "data/metadata")
      if problem:
        return problem
    return None

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
    except Exception as e:  # noqa: BLE001 - unreadable metadata: leave the verdict to the restore itself
      logging.info("Could not read the array metadata of %s (%s); restoring without a shape check.", path,
                   _one_line(e))
      return
    problem = shape_mismatch(getattr(saved, "tree", saved), abstract_state)
    if problem:
      raise _mismatch_error(
          f"The checkpoint {self.directory}/{step} does not fit this model: {problem}",
          "the model config (config.model, config.lora) differs from the run that saved it: use that run's "
          "config or a new --workdir")

  def restore_latest(self, state: dict[str, Any], data: Any = None, *,
                     set_aside: bool = False) -> tuple[dict[str, Any], int | None]:
    """(latest intact state, its step) restored onto the shardings of `state`, or (state, None) when there
    is no checkpoint. The data iterator `data` (grain `set_state`) is moved to the saved position.

    A damaged step (`damage`, or its restore or data position failing on any process) is skipped for the
    next older one, with one warning line. `set_aside` (the run that owns the folder) moves the damaged steps
    newer than the one restored to `<checkpoints>/damaged/<step>` and records them in the workdir, so the
    run saves those steps again; else they stay. Raises DamagedCheckpointError when no step restores; a
    checkpoint of another model shape (`workdir.WorkdirError`) is raised as it is, without falling back."""
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return state, None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    damaged: list[tuple[int, str]] = []
    _quiet_late_read_callbacks()  # before any read: a failing one prints while its exception is raised
    for step in steps:
      problem = self.damage(step)
      # Every process restores the same step, or none: a restore is collective on several hosts.
      if parallel.any_process(problem is not None):
        damaged.append((step, problem or "damaged as another process sees it"))
        continue
      try:
        restored, data_state = self.restore(step, abstract)
        if data_state is not None and hasattr(data, "set_state"):
          data.set_state(data_state)
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read it: the files are not what was saved
        while e.__cause__ is not None:  # tensorstore's own words are at the root ("Truncated ... stream")
          e = e.__cause__
        problem = f"restoring it failed ({type(e).__name__}: {_one_line(e)})"
      if parallel.any_process(problem is not None):
        damaged.append((step, problem or "its restore failed on another process"))
        continue
      break
    else:
      listed = "; ".join(f"step {s}: {p}" for s, p in damaged)
      raise DamagedCheckpointError(
          f"No checkpoint in {self.directory} can be restored: {listed}",
          f"their files were cut short or lost (a full disk, a partial copy or sync?): copy them again from "
          f"where they came from, or move {self.directory} aside to train from step 0")
    if damaged:
      self._report_damage(damaged, step, set_aside)
    logging.info("Resumed from %s/%d.", self.directory, step)
    return restored, step

  def _report_damage(self, damaged: list[tuple[int, str]], restored: int, set_aside: bool) -> None:
    """One warning line; with `set_aside`, moves the damaged steps to `damaged/` and records them."""
    chief = parallel.is_process_0()
    moved: dict[int, str] = {}
    if set_aside:
      if chief:
        for step, _ in damaged:
          moved[step] = self._set_aside(step)
        record = os.path.join(os.path.dirname(self.directory), DAMAGE_RECORD)
        with open(record, "a", encoding="utf-8") as f:
          for step, problem in damaged:
            f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "problem": problem, "moved_to": moved[step], "resumed_from": restored}) + "\n")
      parallel.barrier("checkpointing_set_aside")
      self._manager.reload()  # orbax lists its steps once; the damaged ones are gone now
    if not chief:
      return
    names = ", ".join(str(s) for s, _ in damaged)
    what = "; ".join(f"{s}: {p}" for s, p in damaged) if len(damaged) > 1 else damaged[0][1]
    if set_aside:
      where = (f"moved to {moved[damaged[0][0]]}" if len(damaged) == 1 else
               f"moved to {os.path.join(self.directory, DAMAGED_DIR)}/")
      where += f", recorded in {os.path.join(os.path.dirname(self.directory), DAMAGE_RECORD)}"
    else:
      where = "left in place"
    print(f"warning: checkpoint step{'s' if len(damaged) > 1 else ''} {names} in {self.directory} "
          f"{'are' if len(damaged) > 1 else 'is'} damaged ({what}); {where}; resuming from step {restored}",
          file=sys.stderr, flush=True)

  def _set_aside(self, step: int) -> str:
    """Moves the folder of `step` to `damaged/<step>` (`<step>.1`, ... when taken); returns where."""
    target = os.path.join(self.directory, DAMAGED_DIR, str(step))
    n = 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(self.directory, DAMAGED_DIR, f"{step}.{n}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), target)
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending async saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(workdir: str, state: dict[str, Any]) -> Any:
  """The trainable params of the latest intact checkpoint of `workdir`, onto the shardings of
  `state['params']` (`state` is a train state of the same model and optimizer kind)."""
  checkpointer = Checkpointer(checkpoint_dir(workdir), async_save=False)
  try:
    restored, step = checkpointer.restore_latest(state)  # another run's folder: damaged steps stay
    if step is None:
      raise FileNotFoundError(f"config.checkpoint.init_from={workdir!r} holds no checkpoint.")
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
