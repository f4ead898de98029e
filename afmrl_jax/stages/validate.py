"""`validate(config, workdir) -> Run`: one clear sentence per bad config value, before anything compiles.

Field values are checked once, against their declarations, by `schema.parse_sections`; this module adds
what no single field can say: the stage, combinations (batch vs devices, heads vs widths, image size vs
patches, prompt length vs image tokens) and the file system (checkpoint, tokenizer, manifest and attribute
paths exist; the workdir is writable). All problems are reported together in one `ConfigError`.

`validate_catalog(run)` then checks what only the catalog's rows can say (a manifest's rows are read, its
images are not): a gallery smaller than the evaluation's K, an attribute source the training rows lack.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from afmrl_jax import parallel
from afmrl_jax.train import checkpointing
from afmrl_jax.config import schema
from afmrl_jax.config.sections import CONFIG_OF
from afmrl_jax.errors import ConfigError
from afmrl_jax.train import catalog as catalog_lib

CIT_STAGE_CONFIGS = tuple(sorted(set(CONFIG_OF.values())))

__all__ = ["ConfigError", "validate", "validate_catalog"]


def _stage(stage: str) -> list[str]:
  if stage not in schema.STAGES:
    return [f"config.stage={stage!r} is not one of {list(schema.STAGES)}."]
  return []


def _workdir(workdir: str) -> list[str]:
  if not workdir:
    return ["--workdir is required: the directory for checkpoints, logs and metrics."]
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
      pass
  except OSError as e:
    return [f"--workdir={workdir!r} is not writable ({e.strerror or e}); choose a directory you can write."]
  return []


def _json_field(path: str, key: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f).get(key)


# The architectures each stage's model may have (HF `model_type` of a checkpoint's config.json).
VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def _model_paths(model) -> list[str]:
  problems = []
  if model.hf_checkpoint:
    config_json = os.path.join(model.hf_checkpoint, "config.json")
    if not os.path.isdir(model.hf_checkpoint):
      problems.append(f"config.model.hf_checkpoint={model.hf_checkpoint!r} does not exist; give a local HF "
                      "checkpoint directory (config.json + *.safetensors).")
    elif not os.path.isfile(config_json):
      problems.append(f"config.model.hf_checkpoint={model.hf_checkpoint!r} has no config.json.")
    else:
      model_type = _json_field(config_json, "model_type")
      if model_type not in VL_MODEL_TYPES:
        problems.append(f"config.model.hf_checkpoint={model.hf_checkpoint!r} is a {model_type!r} model; this "
                        f"stage needs a vision-language model ({', '.join(VL_MODEL_TYPES)}).")
  if model.tokenizer and not os.path.isdir(model.tokenizer):
    problems.append(f"config.model.tokenizer={model.tokenizer!r} does not exist; give a local HF tokenizer "
                    "directory or '' for the embedded one.")
  return problems


def _arch(arch: dict[str, Any]) -> list[str]:
  """Widths, heads and rotary sections that fit together (random init from `config.model.arch`)."""
  problems = []
  for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size"):
    if not arch.get(name, 0) > 0:
      problems.append(f"config.model.arch.{name}={arch.get(name)!r} must be > 0.")
  if arch.get("vocab_size", 0) < 0:
    problems.append(f"config.model.arch.vocab_size={arch['vocab_size']!r} must be >= 0.")
  heads, kv, width = arch.get("num_attention_heads", 0), arch.get("num_key_value_heads", 0), arch.get("hidden_size", 0)
  if heads > 0 and width % heads:
    problems.append(f"config.model.arch.hidden_size={width} is not divisible by num_attention_heads={heads}.")
  elif heads > 0 and kv > 0:
    if heads % kv:
      problems.append(f"config.model.arch.num_attention_heads={heads} is not a multiple of "
                      f"num_key_value_heads={kv}.")
    head_dim = width // heads
    section = list((arch.get("rope_scaling") or {}).get("mrope_section", []))
    if section and 2 * sum(section) != head_dim:
      problems.append(f"config.model.arch.rope_scaling.mrope_section={section} must sum to head_dim/2="
                      f"{head_dim // 2}.")
  vision = arch.get("vision_config", {})
  if not vision.get("depth", 0) > 0:
    problems.append(f"config.model.arch.vision_config.depth={vision.get('depth')!r} must be > 0.")
  if vision.get("num_heads", 0) <= 0 or vision.get("embed_dim", 0) % vision["num_heads"]:
    problems.append(f"config.model.arch.vision_config.embed_dim={vision.get('embed_dim')} is not divisible by "
                    f"num_heads={vision.get('num_heads')}.")
  return problems


def _batch(pipeline, mesh, gradcache, num_devices: int, num_processes: int) -> list[str]:
  """The global batch splits evenly over the mesh's batch shards, the processes and GradCache chunks."""
  try:
    data, fsdp, _ = parallel.resolve_mesh_shape(mesh, num_devices)
  except ValueError as e:
    return [str(e)]
  shards, batch = data * fsdp, pipeline.batch_size
  if batch % shards:
    return [f"config.pipeline.batch_size={batch} must be divisible by the {shards} batch shards of the mesh "
            f"(data x fsdp = {data} x {fsdp})."]
  if batch % num_processes:
    return [f"config.pipeline.batch_size={batch} must be divisible by the {num_processes} processes."]
  if gradcache is not None and gradcache.enabled and (batch // shards) % gradcache.chunk:
    return [f"config.gradcache.chunk={gradcache.chunk} must divide the per-device batch {batch // shards}."]
  return []


def _combinations(pipeline, mining=None) -> list[str]:
  """Settings that each work alone but not together."""
  problems = []
  if mining is not None and mining.enabled and pipeline is not None and pipeline.pair_mode != "listing":
    problems.append(f"config.mining.enabled=True mines listings as candidates; it needs "
                    f"config.pipeline.pair_mode='listing' (got {pipeline.pair_mode!r}).")
  return problems


# The stages whose prompts hold an image: the representation model's (`pipeline.max_text_len`) and the
# attribute generator's (`generator.max_prompt_len`).
PIPELINE_STAGES = ("stage1", "eval")
GENERATOR_STAGES = ("sft", "generate", "stage2")


def _prompt_room(stage: str, catalog, pipeline, generator) -> list[str]:
  """A prompt length too short for the image tokens of `catalog.image_size` (and the instruction, vision
  start/end and eos) fails at the first batch; say it now, with the minimum."""
  from afmrl_jax.data import generator_data, image_patches, prompts
  if catalog is None or catalog.image_size <= 0 or catalog.image_size % 28:
    return []  # `_paths` names a bad image size
  size = catalog.image_size
  tokens = image_patches.num_image_tokens(size, size)
  where = f"the {tokens} image tokens of config.catalog.image_size={size} images"
  if stage in PIPELINE_STAGES and pipeline is not None:
    need = prompts.min_length(tokens, pipeline.query_instruction, pipeline.candidate_instruction)
    if pipeline.max_text_len < need:
      return [f"config.pipeline.max_text_len={pipeline.max_text_len} cannot hold {where} plus the instruction, "
              f"vision start/end and eos; raise it to at least {need} (more leaves room for the title) or lower "
              "config.catalog.image_size."]
  if stage in GENERATOR_STAGES and generator is not None:
    need = generator_data.min_prompt_len(tokens)
    if generator.max_prompt_len < need:
      return [f"config.generator.max_prompt_len={generator.max_prompt_len} cannot hold {where} plus vision "
              f"start/end and the answer cue; raise it to at least {need} plus room for the instruction and title "
              "(or lower config.catalog.image_size)."]
  return []


def _paths(catalog, attributes, checkpoint) -> list[str]:
  problems = []
  if catalog is not None:
    if catalog.manifest and not os.path.exists(catalog.manifest):
      problems.append(f"config.catalog.manifest={catalog.manifest!r} does not exist.")
    if catalog.image_size % 28:
      problems.append(f"config.catalog.image_size={catalog.image_size} must be a positive multiple of 28 "
                      "(14-pixel patches merged 2x2).")
  if attributes is not None:
    src = attributes.source
    if src not in ("teacher", "true", "none") and not os.path.isfile(src):
      problems.append(f"config.attributes.source={src!r} is neither 'teacher', 'true', 'none' nor an existing "
                      "generated-attributes JSONL file.")
  if checkpoint is not None and checkpoint.init_from and not checkpointing.has_checkpoint(checkpoint.init_from):
    problems.append(f"config.checkpoint.init_from={checkpoint.init_from!r} holds no checkpoint; give the "
                    "workdir of a training run of the same model.")
  if checkpoint is not None and checkpoint.restore_dir and not os.path.isdir(checkpoint.restore_dir):
    problems.append(f"config.checkpoint.restore_dir={checkpoint.restore_dir!r} does not exist; give the "
                    "workdir of a training run.")
  return problems


def _rar(rar, mesh, num_devices: int) -> list[str]:
  """Stage 2's policy and environment are finished runs; its Q x G rows split over the batch shards."""
  return _rar_paths(rar) + _rar_rows(rar, mesh, num_devices)


def _rar_paths(rar) -> list[str]:
  problems = []
  for name, kind, stages in (("policy", "SFT", ("sft", "stage2")), ("environment", "stage-1", ("stage1",))):
    path = getattr(rar, name)
    config_json = os.path.join(path, "config.json")
    if not path:
      problems.append(f"config.rar.{name} is required: the workdir of a finished {kind} run.")
    elif not os.path.isfile(config_json) or not checkpointing.has_checkpoint(path):
      problems.append(f"config.rar.{name}={path!r} is not a finished {kind} workdir (config.json and "
                      "checkpoints/ expected).")
    else:
      saved_stage = _json_field(config_json, "stage")
      if saved_stage not in stages:
        problems.append(f"config.rar.{name}={path!r} is a {saved_stage!r} run; it must be a {kind} run "
                        f"(stage {' or '.join(stages)}).")
  return problems


def _rar_rows(rar, mesh, num_devices: int) -> list[str]:
  problems = []
  rows = rar.queries_per_step * rar.group_size
  if rows % rar.rollout_chunks:
    problems.append(f"config.rar.rollout_chunks={rar.rollout_chunks} must divide the {rows} rows per step "
                    "(queries_per_step x group_size).")
  elif mesh is not None:
    try:
      data, fsdp, _ = parallel.resolve_mesh_shape(mesh, num_devices)
    except ValueError as e:
      return problems + [str(e)]
    if (rows // rar.rollout_chunks) % (data * fsdp):
      problems.append(f"config.rar: the {rows // rar.rollout_chunks} rows of a rollout chunk must be divisible by "
                      f"the {data * fsdp} batch shards of the mesh.")
  return problems


def _cit_stages(cit, num_devices: int, num_processes: int) -> list[str]:
  """Every stage config of the cit chain, checked before the first stage runs: each field against its
  declaration (unknown keys too) and the combinations no single field can say. The paths between the
  stages do not exist yet; each stage's own `validate` checks them when the chain reaches it."""
  problems = []
  for key in CIT_STAGE_CONFIGS:
    if key not in cit.stages:
      continue
    parts, found = schema.parse_sections(cit.stages[key])
    if parts["stage"] != key:
      found.append(f"config.stage={parts['stage']!r} must be {key!r} (the chain runs this config as its {key}).")
    model = parts["model"]
    if model is not None and not model.hf_checkpoint:
      found += _arch(model.arch)
    if parts["pipeline"] is not None and parts["mesh"] is not None:
      found += _batch(parts["pipeline"], parts["mesh"], parts["gradcache"], num_devices, num_processes)
    found += _combinations(parts["pipeline"], parts["mining"])
    found += _prompt_room(key, parts["catalog"], parts["pipeline"], parts["generator"])
    if key == "stage2" and parts["rar"] is not None:
      found += _rar_rows(parts["rar"], parts["mesh"], num_devices)
    problems += [re.sub(r"\bconfig\.", f"config.cit.stages.{key}.", p) for p in found]
  return problems


def validate(config: Any, workdir: str, *, num_devices: int | None = None,
             num_processes: int | None = None) -> schema.Run:
  """The typed run of `config`; raises ConfigError listing every bad value."""
  import jax  # only for device counts; nothing is compiled here
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  parts, problems = schema.parse_sections(config)
  problems = _stage(parts["stage"]) + problems
  model = parts["model"]
  if model is not None:
    problems += _model_paths(model)
    if not model.hf_checkpoint:  # else the architecture comes from the checkpoint's config.json
      problems += _arch(model.arch)
  if parts["pipeline"] is not None and parts["mesh"] is not None:
    problems += _batch(parts["pipeline"], parts["mesh"], parts["gradcache"], num_devices, num_processes)
  problems += _paths(parts["catalog"], parts["attributes"], parts["checkpoint"])
  problems += _combinations(parts["pipeline"], parts["mining"])
  problems += _prompt_room(parts["stage"], parts["catalog"], parts["pipeline"], parts["generator"])
  problems += _workdir(workdir)
  if parts["stage"] == "stage2" and parts["rar"] is not None:
    problems += _rar(parts["rar"], parts["mesh"], num_devices)
  if parts["stage"] == "cit" and parts["cit"] is not None:
    missing = sorted(set(CIT_STAGE_CONFIGS) - set(parts["cit"].stages))
    if missing:
      problems.append(f"config.cit.stages lacks the {', '.join(repr(m) for m in missing)} configs; start from "
                      "configs/cit.py, which fills them.")
    problems += _cit_stages(parts["cit"], num_devices, num_processes)
  needs_checkpoint = parts["stage"] == "eval" or (parts["stage"] == "generate" and not model.hf_checkpoint)
  if needs_checkpoint and not problems:
    source = parts["checkpoint"].restore_dir or workdir
    if not checkpointing.has_checkpoint(source):
      problems.append(f"The {parts['stage']} stage found no checkpoint in {checkpointing.checkpoint_dir(source)!r}; "
                      "train first or set config.checkpoint.restore_dir to a training workdir.")
  if problems:
    raise ConfigError(problems)
  return schema.Run(**parts)


def _gallery_problems(run: schema.Run, num_gallery: int, where: str) -> list[str]:
  """One problem naming the evaluation Ks that a gallery of `num_gallery` listings cannot fill."""
  from afmrl_jax.eval.retrieval import available_k
  room = available_k(num_gallery, run.eval, queries_in_gallery=False)  # a listing has one split
  asked = [("recall_ks", max(run.eval.recall_ks)), ("map_k", run.eval.map_k), ("knn_k", run.eval.knn_k)]
  too_big = [f"config.eval.{name}" + (f"={list(run.eval.recall_ks)}" if name == "recall_ks" else f"={k}")
             for name, k in asked if k > room]
  if not too_big:
    return []
  return [f"{', '.join(too_big)} need(s) a gallery of at least {max(k for _, k in asked)} listings, but {where} "
          f"has {num_gallery}; lower them or hold out more products (config.catalog.eval_share)."]


def validate_catalog(run: schema.Run) -> None:
  """Raises ConfigError when a manifest run (stage 1 or its eval) cannot work with the manifest's rows: a
  gallery smaller than an evaluation K, or a loss with attribute terms whose source the training rows lack
  (`train.catalog.attribute_coverage_problem`). Reads the manifest's rows, not its images."""
  if run.stage not in ("stage1", "eval") or run.task != "representation" or not run.catalog.manifest:
    return
  import warnings
  from afmrl_jax.data import manifest
  with warnings.catch_warnings():  # unknown fields are warned about once, when the data is loaded
    warnings.simplefilter("ignore", manifest.ManifestWarning)
    report = manifest.read_manifest(run.catalog.manifest, skip_bad_rows=run.catalog.skip_bad_rows,
                                    check_images=False, split_seed=run.catalog.split_seed,
                                    eval_share=run.catalog.eval_share)
  gallery = sum(r.split == "gallery" for r in report.rows)
  problems = _gallery_problems(run, gallery, f"the manifest's gallery ({manifest.split_summary(report.rows)})")
  train = [r for r in report.rows if r.split == "train"]
  source = run.attributes.source
  if run.stage == "stage1" and source not in ("teacher", "true", "none"):
    try:
      generated = catalog_lib.read_generated_attributes(source, [r.listing_id for r in report.rows],
                                                        run.attributes.skip_bad_rows)
    except ValueError as e:
      problems.append(str(e))
      generated = {}
    strings = [generated.get(r.listing_id, "") for r in train]
  else:
    strings = [catalog_lib.source_string(r, source) for r in train]
  if run.stage == "stage1":
    problem = catalog_lib.attribute_coverage_problem(run, strings)
    problems += [problem] if problem else []
  if problems:
    raise ConfigError(problems)
