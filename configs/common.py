"""What the stage configs share: the presets' values on top of the defaults.

Every knob of a run, its default and its allowed values are declared once, in the dataclasses behind
`afmrl_jax.config.schema` (`schema.defaults()` is the full ConfigDict with every default). This file
only says how each preset differs: `tiny` (the default; the embedded catalog on a CPU in a few
minutes), `ci` (smaller still, for tests), `bench-small` (the benchmark model) and `qwen2vl-2b` (the
paper's scale: a local Qwen2-VL-2B checkpoint + LoRA, global batch 1024, tau 0.02, bf16).

Model sizes use Hugging Face `Qwen2VLConfig` field names (text fields at the top level, the vision
tower under `vision_config`), so the same dict describes a random-init model and the config.json of a
real checkpoint.
"""

from __future__ import annotations

import ml_collections

from afmrl_jax.config import schema

PRESETS = ("tiny", "ci", "bench-small", "qwen2vl-2b")


def parse_preset(arg: str | None, presets: tuple[str, ...] = PRESETS) -> str:
  """The preset named by the config-file argument (`configs/stage1.py:tiny`); `tiny` when absent."""
  preset = (arg or "tiny").strip()
  if preset not in presets:  # a ConfigError (a ValueError): `main` prints it as one line, exit 2
    raise schema.ConfigError([
        f"Unknown config preset '{preset}' (the part after ':' in --config); choose one of {list(presets)}."])
  return preset


def _pick(preset: str, values: dict[str, object], default: object) -> object:
  return values.get(preset, default)


def arch(preset: str) -> dict:
  """Qwen2-VL architecture of the representation model at `preset` (HF config.json fields)."""
  if preset in ("ci", "tiny"):
    small = preset == "ci"
    text = dict(hidden_size=32 if small else 64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64 if small else 128,
                rope_scaling=dict(type="mrope", mrope_section=[1, 1, 2] if small else [2, 3, 3]))
    vision = dict(depth=1 if small else 2, embed_dim=32, num_heads=2, mlp_ratio=2.0)
  elif preset == "bench-small":
    text = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=1024, rope_scaling=dict(type="mrope", mrope_section=[8, 12, 12]))
    vision = dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=2.0)
  else:  # qwen2vl-2b: the architecture comes from the checkpoint's config.json; these are its values
    text = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                intermediate_size=8960, rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]))
    vision = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4.0)
  return dict(
      model_type="qwen2_vl",
      vocab_size=0,  # 0 = the tokenizer's size
      rms_norm_eps=1e-6,
      rope_theta=1000000.0,
      tie_word_embeddings=True,
      hidden_act="silu",
      max_position_embeddings=32768,
      **text,
      vision_config=dict(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                         hidden_act="quick_gelu", hidden_size=text["hidden_size"], **vision),
  )


def base(preset: str, stage: str) -> ml_collections.ConfigDict:
  """The full config for `stage` at `preset`: the defaults, then what the preset changes."""
  c = schema.defaults()
  c.stage = stage
  c.preset = preset
  paper = preset == "qwen2vl-2b"
  c.dtype = "bfloat16" if paper else "float32"

  c.catalog.families_per_category = _pick(preset, {"ci": 6, "tiny": 40}, c.catalog.families_per_category)
  c.catalog.image_size = _pick(preset, {"ci": 56, "tiny": 56, "bench-small": 112}, 448)

  c.pipeline.batch_size = _pick(preset, {"ci": 16, "tiny": 64, "bench-small": 32}, 1024)
  c.pipeline.eval_batch_size = _pick(preset, {"ci": 32, "tiny": 64, "bench-small": 64}, 256)
  # Prompts hold the image's (image_size / 28)^2 tokens too: 256 at 448 px, so the paper's 320 leaves ~55
  # tokens of instruction and title (validate refuses a length without room for the image).
  c.pipeline.max_text_len = _pick(preset, {"ci": 48, "tiny": 64, "bench-small": 64}, 320)
  c.pipeline.max_terms = 24
  c.pipeline.fresh_views = True  # the synthetic catalog's; a manifest run has its own photos only

  c.model.arch = ml_collections.ConfigDict(arch(preset))

  c.lora.enabled = paper
  c.lora.rank = 16 if paper else 8
  c.lora.alpha = 32.0 if paper else 16.0

  if paper:
    c.loss.tau = 0.02  # the paper's (VLM2Vec's) temperature at the paper's scale
  c.gradcache.enabled = paper

  c.optimizer.learning_rate = _pick(preset, {"qwen2vl-2b": 2e-4, "bench-small": 3e-4}, 2e-3)
  c.optimizer.warmup_steps = _pick(preset, {"ci": 2, "tiny": 30}, 100)

  c.train.num_steps = _pick(preset, {"ci": 12, "tiny": 400, "bench-small": 1000}, 2000)
  c.train.log_every = _pick(preset, {"ci": 1, "tiny": 10}, 20)
  c.checkpoint.every = _pick(preset, {"ci": 4, "tiny": 100}, 500)
  return c
