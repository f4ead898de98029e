"""The base of the errors a user can act on (a bad config, manifest row, workdir or checkpoint).

`python -m afmrl_jax.main` prints such an error as its message and a hint, without a traceback, and
exits with status 2; any other exception keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
  """An error in what the user gave; `hint` says what to change (empty: the message says it)."""

  hint: str = ""


class ConfigError(UserError, ValueError):
  """A bad config: `problems` holds one sentence per bad value."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    super().__init__("Invalid config:\n  - " + "\n  - ".join(self.problems))


class WorkdirError(ConfigError):
  """The workdir does not fit the run (config or model changed since its checkpoints): a one-line message
  and a `hint`, which `main` prints like any config error (no traceback, exit 2)."""

  def __init__(self, message: str, hint: str = ""):
    self.problems = [message]
    self.hint = hint
    ValueError.__init__(self, message)
