"""Every prompt holds its image: a prompt length below the image tokens of `catalog.image_size` (plus the
instruction and the special tokens) stopped the paper's `qwen2vl-2b` preset at its first batch, after the
model was built. Every preset of every config file leaves room, and validate refuses a combination that
does not, in one line naming both fields and the minimum, before anything compiles."""

import glob
import importlib
import os

import pytest

from afmrl_jax.config import schema
from afmrl_jax.stages.validate import validate
from tests.test_main import ROOT, _main

from configs import cit, common, sft  # noqa: E402

ALL_PRESETS = tuple(dict.fromkeys(common.PRESETS + sft.PRESETS + cit.PRESETS))  # each file takes some
PIPELINE_STAGES = ("stage1", "eval")  # the representation model's prompts: pipeline.max_text_len
GENERATOR_STAGES = ("sft", "generate", "stage2")  # the generator's: generator.max_prompt_len


def _configs():
  """(file, preset, ConfigDict) for every preset each configs/*.py accepts, and the cit chain's stages."""
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    if name in ("__init__", "common"):
      continue
    module = importlib.import_module(f"configs.{name}")
    for preset in ALL_PRESETS:
      try:
        config = module.get_config(preset)
      except schema.ConfigError:
        continue  # not one of this file's presets
      out.append((name, preset, config))
      for stage, sub in (config.cit.stages.items() if config.stage == "cit" else ()):
        out.append((f"{name}.stages.{stage}", preset, sub))
  return out


def _image_tokens(config) -> int:
  """Merged image tokens from the preset's own fields: (image_size / (patch * merge))^2."""
  vision = config.model.arch.vision_config
  side = config.catalog.image_size // (vision.patch_size * vision.spatial_merge_size)
  return side * side


def test_every_preset_of_every_config_leaves_room_for_its_image():
  configs = _configs()
  names = {(name, preset) for name, preset, _ in configs}
  assert {("stage1", "qwen2vl-2b"), ("sft", "qwen2.5vl-3b"), ("cit.stages.stage1", "ci"), ("eval", "tiny")} <= names
  for name, preset, config in configs:
    tokens = _image_tokens(config)
    if config.stage in PIPELINE_STAGES:  # the representation model's prompts
      pipeline = config.pipeline
      longest = max(len(pipeline.query_instruction.encode()), len(pipeline.candidate_instruction.encode()))
      # the instruction (at most a token per byte), vision start/end, eos
      assert pipeline.max_text_len >= tokens + 3 + longest, (name, preset, tokens, pipeline.max_text_len)
    if config.stage in GENERATOR_STAGES:  # the generator's: ~20 instruction tokens, the cue, a title
      assert config.generator.max_prompt_len >= tokens + 2 + 3 + 32, (name, preset, tokens)
    problems = [p for p in _problems(config) if "max_text_len" in p or "max_prompt_len" in p]
    assert not problems, (name, preset, problems)


def _problems(config, workdir="/tmp"):
  try:
    validate(config, workdir, num_devices=8, num_processes=1)
  except schema.ConfigError as e:
    return e.problems
  return []


def test_validate_names_both_fields_and_the_minimum(tmp_path):
  from configs import sft, stage1
  config = stage1.get_config("qwen2vl-2b")
  config.pipeline.max_text_len = 256  # the preset's old value
  problems = [p for p in _problems(config, str(tmp_path)) if "max_text_len" in p]
  assert problems == [
      "config.pipeline.max_text_len=256 cannot hold the 256 image tokens of config.catalog.image_size=448 images "
      "plus the instruction, vision start/end and eos; raise it to at least 287 (more leaves room for the "
      "title) or lower config.catalog.image_size."]
  config.pipeline.max_text_len = 287
  assert not [p for p in _problems(config, str(tmp_path)) if "max_text_len" in p]
  config = sft.get_config("ci")
  config.catalog.image_size = 280  # 100 image tokens in a 96-token generator prompt
  [problem] = [p for p in _problems(config, str(tmp_path)) if "max_prompt_len" in p]
  assert problem == ("config.generator.max_prompt_len=96 cannot hold the 100 image tokens of "
                     "config.catalog.image_size=280 images plus vision start/end and the answer cue; raise it to "
                     "at least 114 plus room for the instruction and title (or lower config.catalog.image_size).")


def test_a_prompt_too_short_for_the_image_is_one_line_before_anything_is_built(tmp_path):
  proc = _main("--config=configs/stage1.py:ci", f"--workdir={tmp_path / 'w'}", "--config.catalog.image_size=224",
               "--config.catalog.families_per_category=2", f"--config.catalog.cache_dir={tmp_path / 'cache'}",
               timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].strip() == (
      "- config.pipeline.max_text_len=48 cannot hold the 64 image tokens of config.catalog.image_size=224 images "
      "plus the instruction, vision start/end and eos; raise it to at least 95 (more leaves room for the title) "
      "or lower config.catalog.image_size."), lines
  assert not (tmp_path / "cache").exists()  # refused before the catalog was generated
