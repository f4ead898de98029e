"""validate(config): one clear sentence per bad value, before anything compiles."""

import os

import pytest

import configs.eval as eval_configs
import configs.stage1 as stage1_configs
from afmrl_jax.stages.validate import ConfigError, validate


def problems_of(config, workdir, **kw):
  with pytest.raises(ConfigError) as info:
    validate(config, str(workdir), num_devices=8, num_processes=1, **kw)
  return info.value.problems


@pytest.mark.parametrize("preset", [None, "ci", "bench-small"])
def test_presets_are_valid(preset, tmp_path):
  validate(stage1_configs.get_config(preset), str(tmp_path), num_devices=8, num_processes=1)


def test_qwen2vl_preset_requires_its_checkpoint(tmp_path):
  config = stage1_configs.get_config("qwen2vl-2b")
  config.model.hf_checkpoint = str(tmp_path / "missing")
  (problem,) = problems_of(config, tmp_path / "w")
  assert "config.model.hf_checkpoint" in problem and "does not exist" in problem


def test_unknown_preset():
  with pytest.raises(ValueError, match="Unknown config preset 'huge'"):
    stage1_configs.get_config("huge")


@pytest.mark.parametrize("field, value, expected", [
    ("loss.tau", 0.0, "config.loss.tau=0.0 must be > 0"),
    ("loss.strategy", "gather", "config.loss.strategy='gather' is not one of"),
    ("loss.mask", "maybe", "config.loss.mask='maybe' is not one of"),
    ("loss.b", 1.5, "config.loss.b=1.5 must lie in [0.0, 1.0]"),
    ("optimizer.learning_rate", -1.0, "config.optimizer.learning_rate=-1.0 must be > 0"),
    ("optimizer.b2", 1.0, "config.optimizer.b2=1.0 must lie in [0.0, 1.0)"),
    ("pipeline.batching", "families", "config.pipeline.batching='families' is not one of"),
    ("pipeline.family_share", 1.2, "config.pipeline.family_share=1.2 must lie in"),
    ("pipeline.batch_size", 12, "config.pipeline.batch_size=12 must be divisible by the 8 batch shards"),
    ("dtype", "float16", "config.dtype='float16' is not one of"),
    ("train.num_steps", 0, "config.train.num_steps=0 must be > 0"),
    ("checkpoint.keep", 0, "config.checkpoint.keep=0 must be > 0"),
    ("catalog.image_size", 60, "config.catalog.image_size=60 must be a positive multiple of 28"),
    ("attributes.source", "/no/such/file.jsonl", "config.attributes.source='/no/such/file.jsonl' is neither"),
    ("model.arch.num_key_value_heads", 3, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("eval.retriever", "faiss", "config.eval.retriever='faiss' is not one of"),
])
def test_one_sentence_per_bad_value(field, value, expected, tmp_path):
  config = stage1_configs.get_config("ci")
  section, _, name = field.rpartition(".")
  target = config
  for part in filter(None, section.split(".")):
    target = target[part]
  target[name] = value
  problems = problems_of(config, tmp_path)
  assert len(problems) == 1, problems
  assert expected in problems[0]


def test_all_problems_reported_together(tmp_path):
  config = stage1_configs.get_config("ci")
  config.loss.tau = -1.0
  config.optimizer.grad_clip = -2.0
  config.mesh.data = 3
  problems = problems_of(config, tmp_path)
  assert len(problems) == 3
  assert any("config.mesh" in p and "does not divide the 8 available devices" in p for p in problems)


def test_unwritable_workdir(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  os.chmod(locked, 0o500)
  try:
    if os.access(locked, os.W_OK):  # running as root: permissions do not bind, use a file instead
      target = tmp_path / "a_file"
      target.write_text("x")
      workdir = target / "sub"
    else:
      workdir = locked / "run"
    (problem,) = problems_of(stage1_configs.get_config("ci"), workdir)
    assert problem.startswith(f"--workdir={str(workdir)!r} is not writable")
  finally:
    os.chmod(locked, 0o700)


def test_missing_workdir_flag():
  (problem,) = problems_of(stage1_configs.get_config("ci"), "")
  assert "--workdir is required" in problem


def test_eval_stage_needs_a_checkpoint(tmp_path):
  config = eval_configs.get_config("ci")
  (problem,) = problems_of(config, tmp_path)
  assert "no checkpoint" in problem and "config.checkpoint.restore_dir" in problem
  config.checkpoint.restore_dir = str(tmp_path / "nowhere")
  (problem,) = problems_of(config, tmp_path)
  assert "config.checkpoint.restore_dir" in problem and "does not exist" in problem


def test_unknown_stage(tmp_path):
  config = stage1_configs.get_config("ci")
  config.stage = "stage3"
  (problem,) = problems_of(config, tmp_path)
  assert problem == ("config.stage='stage3' is not one of ['stage1', 'eval', 'sft', 'generate', 'stage2', "
                     "'cit'].")


def test_gradcache_chunk_must_divide_local_batch(tmp_path):
  config = stage1_configs.get_config("ci")  # batch 16 over 8 devices: 2 rows per device
  config.gradcache.enabled = True
  config.gradcache.chunk = 3
  (problem,) = problems_of(config, tmp_path)
  assert "config.gradcache.chunk=3 must divide the per-device batch 2" in problem


def test_hf_checkpoint_of_the_wrong_architecture(tmp_path):
  ckpt = tmp_path / "llama"
  ckpt.mkdir()
  (ckpt / "config.json").write_text('{"model_type": "llama"}')
  config = stage1_configs.get_config("ci")
  config.model.hf_checkpoint = str(ckpt)
  (problem,) = problems_of(config, tmp_path / "w")
  assert problem == (f"config.model.hf_checkpoint={str(ckpt)!r} is a 'llama' model; this stage needs a "
                     "vision-language model (qwen2_vl, qwen2_5_vl).")


def test_fresh_views_belong_to_the_synthetic_catalog(tmp_path):
  """The presets' fresh_views=True is accepted with a manifest (before: refused until the user passed a flag
  meaningless there) and off in the pipeline it builds; the synthetic catalog keeps it."""
  from afmrl_jax.stages.stage1 import data as stage1_data
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("")  # exists; never read: validate reads nothing
  config = stage1_configs.get_config("ci")
  assert config.pipeline.fresh_views
  assert stage1_data.pipeline_config(validate(config, str(tmp_path / "w"), num_devices=8, num_processes=1)).fresh_views
  config.catalog.manifest = str(manifest)
  run = validate(config, str(tmp_path / "w"), num_devices=8, num_processes=1)
  assert run.pipeline.fresh_views and not stage1_data.pipeline_config(run).fresh_views


def _manifest_run(tmp_path, rows, **overrides):
  """The typed stage-1 `ci` run of a manifest made of `rows` (images as the rows name them)."""
  from afmrl_jax.config import schema
  from tests.test_data_manifest_real import _write_jsonl
  config = stage1_configs.get_config("ci")
  config.catalog.manifest = _write_jsonl(tmp_path / "data" / "manifest.jsonl", rows)
  for key, value in overrides.items():
    section, name = key.split(".")
    setattr(getattr(config, section), name, value)
  return schema.parse(config)


def test_a_manifest_gallery_smaller_than_k_is_refused_before_loading(tmp_path):
  from afmrl_jax.data import manifest
  from afmrl_jax.stages.validate import validate_catalog
  from tests.test_data_manifest_real import _rows
  rows = _rows(tmp_path / "data", products_per_category=8, listings_per_product=2)
  run = _manifest_run(tmp_path, rows)
  report = manifest.read_manifest(run.catalog.manifest, check_images=False)
  gallery = sum(r.split == "gallery" for r in report.rows)
  assert 0 < gallery < 10
  with pytest.raises(ConfigError) as info:
    validate_catalog(run)
  assert info.value.problems == [
      f"config.eval.recall_ks=[1, 5, 10], config.eval.map_k=10, config.eval.knn_k=10 need(s) a gallery of at "
      f"least 10 listings, but the manifest's gallery ({manifest.split_summary(report.rows)}) has {gallery}; "
      f"lower them or hold out more products (config.catalog.eval_share)."]
  validate_catalog(_manifest_run(tmp_path, rows, **{"eval.recall_ks": (1,), "eval.map_k": 1, "eval.knn_k": 1}))


def test_an_attribute_source_the_manifest_lacks_is_refused_before_loading(tmp_path):
  from afmrl_jax.stages.validate import validate_catalog
  from tests.test_data_manifest_real import _rows
  rows = _rows(tmp_path / "data", products_per_category=20, listings_per_product=2)
  for r in rows:
    del r["teacher_attributes"]
  small_k = {"eval.recall_ks": (1,), "eval.map_k": 1, "eval.knn_k": 1}
  with pytest.raises(ConfigError) as info:
    validate_catalog(_manifest_run(tmp_path, rows, **small_k))
  (problem,) = info.value.problems
  assert problem.startswith("config.loss uses attribute terms (bias_scale=") and (
      "100% of the 64 training listings have no attribute string from config.attributes.source='teacher'"
      in problem)
  # The source the rows do have, or a loss without attribute terms, is accepted.
  validate_catalog(_manifest_run(tmp_path, rows, **small_k, **{"attributes.source": "true"}))
  validate_catalog(_manifest_run(tmp_path, rows, **small_k, **{"loss.bias_scale": 0.0}))
