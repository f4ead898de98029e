"""Evaluation-only config: embed gallery and queries with a trained model and compute retrieval metrics.

Usage:
  python -m afmrl_jax.main --config=configs/eval.py:tiny --workdir=/tmp/stage1
  python -m afmrl_jax.main --config=configs/eval.py:tiny --config.checkpoint.restore_dir=/tmp/stage1 \
      --workdir=/tmp/eval_out

The preset must match the one the model was trained with (same model/catalog sections).
`checkpoint.restore_dir` defaults to the workdir itself.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import stage1  # noqa: E402


def get_config(arg=None):
  config = stage1.get_config(arg)
  config.stage = "eval"
  return config
