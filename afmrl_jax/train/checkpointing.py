"""orbax checkpoints of the train state and the data iterator, and clean stops on SIGTERM/SIGINT.

Layout: `<workdir>/checkpoints/<step>/{state,data}`: `state` is the train-state dict (step, trainable
params, optimizer state; frozen weights are rebuilt from the seed or the HF checkpoint), `data` the
grain iterator state as JSON, so a resumed run reads exactly the batches an uninterrupted one would.
Saves are asynchronous; `close()` waits for the last one, so a process never exits mid-write.
"""

from __future__ import annotations

import base64
import os
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import orbax.checkpoint as ocp
from absl import logging


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

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
    )

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
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], (_decode_data_state(restored["data"]) if has_data else None)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending async saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


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
    logging.warning("%s received: saving a checkpoint and stopping after this step.", name)
    request.set(name)

  for sig in signals:
    previous[sig] = signal.signal(sig, handler)
  try:
    yield request
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)
