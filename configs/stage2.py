"""Stage 2, RAR: GRPO on the attribute generator with a frozen stage-1 model's retrieval as the reward.

Usage:
  python -m afmrl_jax.main --config=configs/stage2.py --workdir=/tmp/rar \\
      --config.rar.policy=/tmp/sft --config.rar.environment=/tmp/stage1     # preset `tiny`

`rar.policy` is a finished SFT workdir (the policy's starting weights and the frozen KL reference; its
model, tokenizer and prompt sections are read from its config.json), `rar.environment` a finished stage-1
workdir (the representation model, and the attributes its gallery listings carry). The preset must be
the policy's, so that `configs/generate.py` at the same preset can write the tuned generator's
attributes (`--config.checkpoint.restore_dir=<this workdir>`).

Presets: `tiny` (default), `ci`, `bench-small`, `qwen2.5vl-3b`.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import sft  # noqa: E402


def get_config(arg=None):
  config = sft.get_config(arg)
  preset = config.preset
  config.stage = "stage2"
  config.rar.group_size = {"ci": 4}.get(preset, 8)
  config.rar.queries_per_step = {"ci": 4, "tiny": 8, "bench-small": 8}.get(preset, 64)
  config.rar.max_new_tokens = config.generator.max_answer_len
  config.optimizer.learning_rate = {"ci": 1e-3, "tiny": 3e-4, "bench-small": 1e-4}.get(preset, 1e-6)
  config.optimizer.warmup_steps = {"ci": 0, "tiny": 5}.get(preset, 10)
  config.train.num_steps = {"ci": 4, "tiny": 100, "bench-small": 200}.get(preset, 500)
  config.train.log_every = 1  # one row per step: the reward curve
  config.checkpoint.every = {"ci": 2, "tiny": 25}.get(preset, 50)
  return config
