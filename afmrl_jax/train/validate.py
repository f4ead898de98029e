"""`validate(config, workdir)`: one clear sentence per bad config value, before anything compiles.

Checks ranges and choices, combinations (batch vs devices, heads vs widths, image size vs patches),
and the file system (checkpoint, tokenizer, manifest and attribute paths exist; the workdir is
writable). All problems are reported together in one `ConfigError`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import ml_collections

from afmrl_jax import parallel
from afmrl_jax.train import builders

STAGES = ("stage1", "eval")
FUTURE_STAGES = ("sft", "generate", "stage2", "cit")


class ConfigError(ValueError):
  """A bad config: `problems` holds one sentence per bad value."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    super().__init__("Invalid config:\n  - " + "\n  - ".join(self.problems))


def _choice(problems, name, value, choices):
  if value not in choices:
    problems.append(f"config.{name}={value!r} is not one of {list(choices)}.")


def _positive(problems, name, value, allow_zero=False):
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    problems.append(f"config.{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}.")


def _in_range(problems, name, value, low, high, high_open=False):
  if not (low <= value < high if high_open else low <= value <= high):
    problems.append(f"config.{name}={value!r} must lie in [{low}, {high}{')' if high_open else ']'}.")


def _check_workdir(problems, workdir):
  if not workdir:
    problems.append("--workdir is required: the directory for checkpoints, logs and metrics.")
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
      pass
  except OSError as e:
    problems.append(f"--workdir={workdir!r} is not writable ({e.strerror or e}); choose a directory you can write.")


def _check_model(problems, config):
  m = config.model
  if m.hf_checkpoint:
    if not os.path.isdir(m.hf_checkpoint):
      problems.append(f"config.model.hf_checkpoint={m.hf_checkpoint!r} does not exist; give a local HF "
                      "checkpoint directory (config.json + *.safetensors).")
    elif not os.path.isfile(os.path.join(m.hf_checkpoint, "config.json")):
      problems.append(f"config.model.hf_checkpoint={m.hf_checkpoint!r} has no config.json.")
  if m.tokenizer and not os.path.isdir(m.tokenizer):
    problems.append(f"config.model.tokenizer={m.tokenizer!r} does not exist; give a local HF tokenizer "
                    "directory or '' for the embedded one.")
  if m.hf_checkpoint:
    return  # the architecture comes from the checkpoint's config.json
  a = m.arch
  for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size"):
    _positive(problems, f"model.arch.{name}", a[name])
  _positive(problems, "model.arch.vocab_size", a.vocab_size, allow_zero=True)
  if a.num_attention_heads > 0 and a.hidden_size % a.num_attention_heads:
    problems.append(f"config.model.arch.hidden_size={a.hidden_size} is not divisible by "
                    f"num_attention_heads={a.num_attention_heads}.")
  elif a.num_attention_heads > 0 and a.num_key_value_heads > 0:
    if a.num_attention_heads % a.num_key_value_heads:
      problems.append(f"config.model.arch.num_attention_heads={a.num_attention_heads} is not a multiple of "
                      f"num_key_value_heads={a.num_key_value_heads}.")
    head_dim = a.hidden_size // a.num_attention_heads
    section = list(a.rope_scaling.get("mrope_section", [])) if "rope_scaling" in a else []
    if section and 2 * sum(section) != head_dim:
      problems.append(f"config.model.arch.rope_scaling.mrope_section={section} must sum to head_dim/2="
                      f"{head_dim // 2}.")
  v = a.vision_config
  _positive(problems, "model.arch.vision_config.depth", v.depth)
  if v.num_heads <= 0 or v.embed_dim % v.num_heads:
    problems.append(f"config.model.arch.vision_config.embed_dim={v.embed_dim} is not divisible by "
                    f"num_heads={v.num_heads}.")


def _check_batch(problems, config, num_devices, num_processes):
  p = config.pipeline
  _positive(problems, "pipeline.batch_size", p.batch_size)
  try:
    shape = parallel.resolve_mesh_shape(dict(config.mesh), num_devices)
  except ValueError as e:
    problems.append(str(e))
    return
  shards = shape[0] * shape[1]
  if p.batch_size > 0 and p.batch_size % shards:
    problems.append(f"config.pipeline.batch_size={p.batch_size} must be divisible by the {shards} batch "
                    f"shards of the mesh (data x fsdp = {shape[0]} x {shape[1]}).")
  elif p.batch_size > 0 and p.batch_size % num_processes:
    problems.append(f"config.pipeline.batch_size={p.batch_size} must be divisible by the {num_processes} "
                    "processes.")
  if config.gradcache.enabled and p.batch_size > 0 and shards and p.batch_size % shards == 0:
    per_device = p.batch_size // shards
    if config.gradcache.chunk <= 0 or per_device % config.gradcache.chunk:
      problems.append(f"config.gradcache.chunk={config.gradcache.chunk} must divide the per-device batch "
                      f"{per_device}.")


def validate(config: ml_collections.ConfigDict, workdir: str, *, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  """Raises ConfigError listing every bad value; returns None when the config is usable."""
  import jax  # only for device counts; nothing is compiled here
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  problems: list[str] = []
  if config.stage in FUTURE_STAGES:
    problems.append(f"config.stage={config.stage!r} is not implemented yet; available: {list(STAGES)}.")
  else:
    _choice(problems, "stage", config.stage, STAGES)
  _choice(problems, "dtype", config.dtype, ("float32", "bfloat16"))

  p = config.pipeline
  _positive(problems, "pipeline.max_text_len", p.max_text_len)
  _positive(problems, "pipeline.max_terms", p.max_terms)
  _positive(problems, "pipeline.eval_batch_size", p.eval_batch_size)
  _positive(problems, "pipeline.num_workers", p.num_workers, allow_zero=True)
  _choice(problems, "pipeline.pair_mode", p.pair_mode, ("listing", "image_text"))
  _choice(problems, "pipeline.batching", p.batching, ("random", "family_mixed"))
  _in_range(problems, "pipeline.family_share", p.family_share, 0.0, 1.0)
  _check_batch(problems, config, num_devices, num_processes)

  c = config.catalog
  if c.manifest and not os.path.exists(c.manifest):
    problems.append(f"config.catalog.manifest={c.manifest!r} does not exist.")
  if c.image_size <= 0 or c.image_size % 28:
    problems.append(f"config.catalog.image_size={c.image_size} must be a positive multiple of 28 "
                    "(14-pixel patches merged 2x2).")
  try:
    builders.catalog_config(config)
  except (ValueError, TypeError) as e:
    problems.append(f"config.catalog: {e}.")

  _check_model(problems, config)
  if config.lora.enabled:
    _positive(problems, "lora.rank", config.lora.rank)
    if not config.lora.targets:
      problems.append("config.lora.targets is empty; name the projections to adapt (e.g. q_proj, v_proj).")

  l = config.loss
  _positive(problems, "loss.tau", l.tau)
  _positive(problems, "loss.alpha", l.alpha, allow_zero=True)
  _positive(problems, "loss.uniform_margin", l.uniform_margin, allow_zero=True)
  _choice(problems, "loss.bm25_norm", l.bm25_norm, ("none", "self"))
  _choice(problems, "loss.bias_on", l.bias_on, ("negatives", "all"))
  _choice(problems, "loss.mask", l.mask, ("none", "margin", "positive", "attribute"))
  _choice(problems, "loss.strategy", l.strategy, ("dense", "all_gather", "ring"))
  _positive(problems, "loss.k1", l.k1, allow_zero=True)
  _in_range(problems, "loss.b", l.b, 0.0, 1.0)
  if not problems:
    try:
      builders.agcl_config(config)
    except (ValueError, TypeError) as e:
      problems.append(f"config.loss: {e}.")

  o = config.optimizer
  _positive(problems, "optimizer.learning_rate", o.learning_rate)
  _positive(problems, "optimizer.warmup_steps", o.warmup_steps, allow_zero=True)
  _in_range(problems, "optimizer.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
  _in_range(problems, "optimizer.b1", o.b1, 0.0, 1.0, high_open=True)
  _in_range(problems, "optimizer.b2", o.b2, 0.0, 1.0, high_open=True)
  _positive(problems, "optimizer.eps", o.eps)
  _positive(problems, "optimizer.weight_decay", o.weight_decay, allow_zero=True)
  _positive(problems, "optimizer.grad_clip", o.grad_clip, allow_zero=True)

  t = config.train
  _positive(problems, "train.num_steps", t.num_steps)
  _positive(problems, "train.stop_after_steps", t.stop_after_steps, allow_zero=True)
  _positive(problems, "train.log_every", t.log_every)
  _positive(problems, "checkpoint.every", config.checkpoint.every)
  _positive(problems, "checkpoint.keep", config.checkpoint.keep)

  src = config.attributes.source
  if src not in ("teacher", "true") and not os.path.isfile(src):
    problems.append(f"config.attributes.source={src!r} is neither 'teacher', 'true' nor an existing "
                    "generated-attributes JSONL file.")

  e = config.eval
  _choice(problems, "eval.retriever", e.retriever, ("exact", "scann"))
  if not e.recall_ks or any(k <= 0 for k in e.recall_ks):
    problems.append(f"config.eval.recall_ks={tuple(e.recall_ks)} must be positive integers.")
  _positive(problems, "eval.map_k", e.map_k)
  restore = config.checkpoint.restore_dir
  if restore and not os.path.isdir(restore):
    problems.append(f"config.checkpoint.restore_dir={restore!r} does not exist; give the workdir of a "
                    "training run.")
  _check_workdir(problems, workdir)
  if config.stage == "eval" and not problems:
    source = restore or workdir
    ckpt = source if os.path.basename(os.path.normpath(source)) == "checkpoints" else os.path.join(
        source, "checkpoints")
    if not os.path.isdir(ckpt) or not any(name.isdigit() for name in os.listdir(ckpt)):
      problems.append(f"The eval stage found no checkpoint in {ckpt!r}; train first or set "
                      "config.checkpoint.restore_dir to a training workdir.")
  if problems:
    raise ConfigError(problems)


def as_dict(config: Any) -> dict:
  """The config as plain JSON-able data (saved next to checkpoints)."""
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)
