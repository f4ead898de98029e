"""Shared by the tests that run several local JAX processes (`jax.distributed` over gloo on CPU)."""

import socket
import subprocess

import pytest


def free_port() -> int:
  """A TCP port free on localhost now (the coordinator's)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float, what: str) -> list[tuple[str, str]]:
  """Waits for every process; (stdout, stderr) of each; fails the test (killing all) on a timeout or a
  non-zero exit."""
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{what} timed out")
    assert p.returncode == 0, (out or "")[-3000:] + (err or "")[-3000:]
    outs.append((out, err))
  return outs
