"""Stage 1 (AGCL representation learning) config.

Usage:
  python -m afmrl_jax.main --config=configs/stage1.py --workdir=/tmp/stage1        # preset `tiny`
  python -m afmrl_jax.main --config=configs/stage1.py:bench-small --workdir=...
  python -m afmrl_jax.main --config=configs/stage1.py:qwen2vl-2b \
      --config.model.hf_checkpoint=/path/to/Qwen2-VL-2B-Instruct --workdir=...

Presets: `tiny` (default; the embedded catalog on a CPU in a few minutes), `ci` (smaller still, for
tests), `bench-small` (the model of the benchmarks under `launch/`), `qwen2vl-2b` (the paper's scale:
Qwen2-VL-2B + LoRA from a local HF checkpoint, global batch 1024, tau 0.02, bf16, FSDP).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # config files are loaded by path; make `configs.common` importable
  sys.path.insert(0, _ROOT)

from configs import common  # noqa: E402


def get_config(arg=None):
  preset = common.parse_preset(arg)
  config = common.base(preset, stage="stage1")
  if preset == "qwen2vl-2b":
    # FSDP over every device; activations of the 2B model need GradCache at batch 1024.
    config.mesh.data = 1
    config.mesh.fsdp = -1
  return config
