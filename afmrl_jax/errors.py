"""The base of the errors a user can act on (a bad config, manifest row, workdir or checkpoint).

`python -m afmrl_jax.main` prints such an error as its message and a hint, without a traceback, and
exits with status 2; any other exception keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
  """An error in what the user gave; `hint` says what to change (empty: the message says it)."""

  hint: str = ""
