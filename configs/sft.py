"""SFT of the attribute generator (Qwen2.5-VL architecture): image + title -> the teacher's attributes.

Usage:
  python -m afmrl_jax.main --config=configs/sft.py --workdir=/tmp/sft              # preset `tiny`
  python -m afmrl_jax.main --config=configs/sft.py:qwen2.5vl-3b --workdir=... \\
      --config.model.hf_checkpoint=/path/to/Qwen2.5-VL-3B-Instruct

Evaluate a trained generator again (attribute quality on `sft_eval.split`):
  python -m afmrl_jax.main --config=configs/sft.py --config.stage=eval --workdir=/tmp/sft

Presets: `tiny` (default: a small generator trained from scratch on the embedded catalog, a few CPU
minutes), `ci` (smaller still, for tests), `bench-small` (the benchmark size), `qwen2.5vl-3b` (the
paper's generator from a local HF checkpoint: full fine-tune, bf16, FSDP over every device;
`--config.lora.enabled=True` for LoRA).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import ml_collections  # noqa: E402

from configs import common  # noqa: E402

PRESETS = ("tiny", "ci", "bench-small", "qwen2.5vl-3b")


def generator_arch(preset: str) -> dict:
  """Qwen2.5-VL architecture of the generator at `preset` (HF config.json fields)."""
  sizes = {  # hidden, layers, heads, kv heads, mlp, mrope, vision (depth, width, heads, mlp)
      "ci": (32, 2, 4, 2, 64, [1, 1, 2], (1, 32, 2, 64)),
      "tiny": (96, 3, 4, 2, 256, [3, 4, 5], (2, 64, 4, 128)),
      "bench-small": (256, 4, 4, 2, 1024, [8, 12, 12], (4, 128, 4, 256)),
      "qwen2.5vl-3b": (2048, 36, 16, 2, 11008, [16, 24, 24], (32, 1280, 16, 3420)),
  }
  hidden, layers, heads, kv, mlp, mrope, (depth, width, v_heads, v_mlp) = sizes[preset]
  paper = preset == "qwen2.5vl-3b"
  return dict(
      model_type="qwen2_5_vl", vocab_size=0, rms_norm_eps=1e-6, rope_theta=1000000.0,
      tie_word_embeddings=True, hidden_act="silu", max_position_embeddings=32768,
      hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
      intermediate_size=mlp, rope_scaling=dict(type="mrope", mrope_section=mrope),
      vision_config=dict(depth=depth, hidden_size=width, num_heads=v_heads, intermediate_size=v_mlp,
                         out_hidden_size=hidden, in_channels=3, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, hidden_act="silu", window_size=112 if paper else 56,
                         fullatt_block_indexes=[7, 15, 23, 31] if paper else [depth - 1]),
  )


def get_config(arg=None):
  preset = common.parse_preset(arg, PRESETS)
  paper = preset == "qwen2.5vl-3b"
  config = common.base("qwen2vl-2b" if paper else preset, stage="sft")
  config.preset = preset
  config.task = "generator"
  config.model.arch = ml_collections.ConfigDict(generator_arch(preset))
  config.lora.enabled = False  # the paper fine-tunes the whole generator
  config.gradcache.enabled = False
  config.generator.batch_size = {"ci": 8, "tiny": 32, "bench-small": 32}.get(preset, 256)
  config.generator.eval_batch_size = {"ci": 16, "tiny": 64, "bench-small": 64}.get(preset, 256)
  config.generator.max_prompt_len = {"ci": 96, "tiny": 96, "bench-small": 128}.get(preset, 512)
  config.generator.max_answer_len = {"ci": 40, "tiny": 48}.get(preset, 96)
  config.sft_eval.max_new_tokens = config.generator.max_answer_len
  config.sft_eval.num_rows = {"ci": 16, "tiny": 256}.get(preset, 1024)
  config.optimizer.learning_rate = {"ci": 3e-3, "tiny": 2e-3, "bench-small": 1e-3}.get(preset, 1e-5)
  config.optimizer.warmup_steps = {"ci": 2, "tiny": 30}.get(preset, 100)
  config.train.num_steps = {"ci": 10, "tiny": 600, "bench-small": 1000}.get(preset, 3000)
  config.train.log_every = {"ci": 1, "tiny": 20}.get(preset, 20)
  config.checkpoint.every = {"ci": 4, "tiny": 200}.get(preset, 500)
  if paper:
    config.mesh.data = 1
    config.mesh.fsdp = -1
  return config
