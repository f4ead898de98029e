"""CIT: sft -> generate -> stage1 -> stage2 (RAR) -> generate -> stage1 again on 30% of the training
products, in one resumable command (each stage in its own sub-directory of the workdir).

Usage:
  python -m afmrl_jax.main --config=configs/cit.py --workdir=/tmp/cit          # preset `tiny`
  python -m afmrl_jax.main --config=configs/cit.py:ci --workdir=/tmp/cit \\
      --config.cit.stages.stage2.train.num_steps=20 --config.cit.train_fraction=0.5

`cit.stages.<sft|generate|stage1|stage2>` is each stage's whole config at the preset (override any of
its fields as above); the chain sets the paths between them. Rerunning the command skips the stages that
finished and resumes the interrupted one. The report is `<workdir>/cit_report.md`.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import common, generate, sft, stage1, stage2  # noqa: E402

PRESETS = ("tiny", "ci")


def get_config(arg=None):
  preset = common.parse_preset(arg, PRESETS)
  config = stage2.get_config(preset)
  config.stage = "cit"
  config.cit.stages.sft = sft.get_config(preset)
  config.cit.stages.generate = generate.get_config(preset)
  config.cit.stages.stage1 = stage1.get_config(preset)
  config.cit.stages.stage2 = stage2.get_config(preset)
  return config
