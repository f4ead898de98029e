"""The generate stage: a trained generator writes `{"listing_id", "attributes", "malformed"}` JSONL for
the catalog, in committed shards (an interrupted run continues where it stopped).

Usage:
  python -m afmrl_jax.main --config=configs/generate.py --workdir=/tmp/gen \\
      --config.checkpoint.restore_dir=/tmp/sft                      # the SFT workdir (preset `tiny`)
  python -m afmrl_jax.main --config=configs/generate.py:qwen2.5vl-3b --workdir=... \\
      --config.model.hf_checkpoint=/path/to/generator               # an HF directory as it is

The preset must be the generator's (same model and catalog sections as its SFT run). The result,
`<workdir>/generated/attributes.jsonl`, is what `--config.attributes.source` of stage 1 and eval takes.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import sft  # noqa: E402


def get_config(arg=None):
  config = sft.get_config(arg)
  config.stage = "generate"
  config.generation.max_new_tokens = config.generator.max_answer_len
  config.generation.shard_size = 4 * config.generator.eval_batch_size
  return config
