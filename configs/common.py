"""Config sections shared by the stage configs (`stage1.py`, `eval.py`).

Every knob of a run lives in one `ml_collections.ConfigDict`, overridable on the command line as
`--config.section.field=value`. The section builders below give the defaults; the stage files pick a
preset (`tiny`, `ci`, `bench-small`, `qwen2vl-2b`) and adjust sizes. `afmrl_jax.train.validate` checks
the result before anything compiles.

Model sizes are written with Hugging Face `Qwen2VLConfig` field names (text fields at the top level,
the vision tower under `vision_config`), so the same dict describes a random-init model and the
config.json of a real checkpoint.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "ci", "bench-small", "qwen2vl-2b")


def parse_preset(arg: str | None) -> str:
  """The preset named by the config-file argument (`configs/stage1.py:tiny`); `tiny` when absent."""
  preset = (arg or "tiny").strip()
  if preset not in PRESETS:
    raise ValueError(
        f"Unknown config preset '{preset}' (the part after ':' in --config); choose one of {list(PRESETS)}.")
  return preset


def catalog(preset: str) -> ml_collections.ConfigDict:
  """The embedded synthetic catalog: the fields of `afmrl_jax.data.catalog.CatalogConfig`.

  `manifest` (a path to an on-disk JSONL/Parquet manifest) replaces the synthetic catalog when set;
  `cache_dir` keeps the generated catalog between runs ('' = `<workdir>/catalog`).
  """
  import dataclasses
  from afmrl_jax.data.catalog import CatalogConfig
  fields = {f.name: getattr(CatalogConfig(), f.name) for f in dataclasses.fields(CatalogConfig)}
  c = ml_collections.ConfigDict(fields)
  c.categories = tuple(c.categories)
  c.families_per_category = {"ci": 6, "tiny": 40}.get(preset, c.families_per_category)
  c.image_size = {"ci": 56, "tiny": 56, "bench-small": 112}.get(preset, 448)
  c.manifest = ""
  c.skip_bad_rows = False  # with a manifest: skip (count and report) bad rows instead of stopping
  c.cache_dir = ""
  return c


def pipeline(preset: str) -> ml_collections.ConfigDict:
  """Batches: size (global, over all processes), text length, pairs, batching policy."""
  p = ml_collections.ConfigDict()
  p.batch_size = {"ci": 16, "tiny": 64, "bench-small": 32}.get(preset, 1024)
  p.max_text_len = {"ci": 48, "tiny": 64, "bench-small": 64}.get(preset, 256)
  p.max_terms = 24  # attribute term ids per side for the on-device BM25
  p.pair_mode = "listing"  # 'listing' (two listings of one product) | 'image_text'
  p.fresh_views = True  # render new views of the training products every epoch
  p.batching = "random"  # 'random' | 'family_mixed'
  p.family_share = 0.5  # with 'family_mixed': share of each batch made of whole sibling families
  p.shuffle_seed = 0
  p.num_workers = 2  # grain read threads (the order of batches does not depend on it)
  p.eval_batch_size = {"ci": 32, "tiny": 64, "bench-small": 64}.get(preset, 256)
  return p


def model(preset: str) -> ml_collections.ConfigDict:
  """Representation model: Qwen2-VL architecture, HF field names; `hf_checkpoint` loads real weights."""
  m = ml_collections.ConfigDict()
  m.hf_checkpoint = ""  # local directory with config.json + *.safetensors; '' = random init from `arch`
  m.tokenizer = ""  # local HF tokenizer directory; '' = the embedded tokenizer trained on the catalog
  m.param_seed = 0
  if preset in ("ci", "tiny"):
    small = preset == "ci"
    text = dict(hidden_size=32 if small else 64, num_hidden_layers=2, num_attention_heads=4 if small else 4,
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
  m.arch = ml_collections.ConfigDict(dict(
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
  ))
  return m


def lora(preset: str) -> ml_collections.ConfigDict:
  """LoRA adapters (only they train when enabled); fields of `afmrl_jax.models.lora.LoRAConfig`."""
  l = ml_collections.ConfigDict()
  l.enabled = preset == "qwen2vl-2b"
  l.rank = 16 if preset == "qwen2vl-2b" else 8
  l.alpha = 32.0 if preset == "qwen2vl-2b" else 16.0
  l.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  return l


def loss(preset: str) -> ml_collections.ConfigDict:
  """AGCL: the fields of `afmrl_jax.losses.config.AGCLConfig` plus the sharding strategy.

  Defaults are AGCLConfig's (the measured best: B normalised by the positive's own score, a
  negatives-only bias of scale alpha at tau 0.05, masks off). `alpha=0` is plain InfoNCE;
  `bm25_norm='none', bias_on='all', alpha=1` the published form; `uniform_margin>0` the attribute-free
  control. `uniform_margin=0` and `mask_threshold=0` mean "unset" (None in AGCLConfig).
  """
  import dataclasses
  from afmrl_jax.losses.config import AGCLConfig
  fields = {f.name: getattr(AGCLConfig(), f.name) for f in dataclasses.fields(AGCLConfig)}
  fields["uniform_margin"] = fields["uniform_margin"] or 0.0
  fields["mask_threshold"] = fields["mask_threshold"] or 0.0
  l = ml_collections.ConfigDict(fields)
  if preset == "qwen2vl-2b":
    l.tau = 0.02  # the paper's (VLM2Vec's) temperature at the paper's scale
  l.strategy = "all_gather"  # 'dense' | 'all_gather' | 'ring'
  return l


def gradcache(preset: str) -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  g.enabled = preset == "qwen2vl-2b"
  g.chunk = 32  # rows per encoder chunk (per device) when GradCache is on
  return g


def optimizer(preset: str) -> ml_collections.ConfigDict:
  """optax AdamW with linear warmup + cosine decay and global-norm clipping."""
  o = ml_collections.ConfigDict()
  o.learning_rate = {"qwen2vl-2b": 2e-4, "bench-small": 3e-4}.get(preset, 2e-3)
  o.warmup_steps = {"ci": 2, "tiny": 30}.get(preset, 100)
  o.min_lr_ratio = 0.05  # cosine decays to learning_rate * min_lr_ratio
  o.b1 = 0.9
  o.b2 = 0.98
  o.eps = 1e-8
  o.weight_decay = 0.01
  o.grad_clip = 1.0  # global-norm clip; 0 disables
  return o


def train(preset: str) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.num_steps = {"ci": 12, "tiny": 400, "bench-small": 1000}.get(preset, 2000)
  # Stop this process after this many steps (checkpointing first), as if interrupted; 0 = off. The
  # schedule still uses num_steps, so a resumed run continues exactly where this one stopped.
  t.stop_after_steps = 0
  t.log_every = {"ci": 1, "tiny": 10}.get(preset, 20)
  t.check_finite = True  # stop the run on a NaN/Inf loss, naming the step and batch
  t.eval_at_end = True  # run the retrieval evaluation after the last step
  return t


def mesh() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})


def checkpoint(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.enabled = True
  c.every = {"ci": 4, "tiny": 100}.get(preset, 500)
  c.keep = 3
  c.async_save = True
  c.resume = True  # resume from the latest checkpoint in the workdir
  c.restore_dir = ""  # eval stage: the training workdir to load from; '' = this workdir
  return c


def eval_section(preset: str) -> ml_collections.ConfigDict:
  """Retrieval evaluation (end of training and the `eval` stage): `train.evaluate`'s own fields."""
  from afmrl_jax.train.evaluate import default_eval_config
  return ml_collections.ConfigDict(default_eval_config())


def attributes() -> ml_collections.ConfigDict:
  a = ml_collections.ConfigDict()
  # 'teacher' (the catalog's teacher attributes) | 'true' (ground truth: an oracle for ablations) |
  # path to a generated-attributes JSONL ({"listing_id": int, "attributes": str} per line)
  a.source = "teacher"
  a.enrich_queries = False  # append the attributes to the query (and candidate) text
  return a


def base(preset: str, stage: str) -> ml_collections.ConfigDict:
  """The full config for `stage` at `preset`."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.preset = preset
  c.dtype = "bfloat16" if preset == "qwen2vl-2b" else "float32"  # compute dtype; params stay float32
  c.catalog = catalog(preset)
  c.pipeline = pipeline(preset)
  c.model = model(preset)
  c.lora = lora(preset)
  c.loss = loss(preset)
  c.gradcache = gradcache(preset)
  c.optimizer = optimizer(preset)
  c.train = train(preset)
  c.mesh = mesh()
  c.checkpoint = checkpoint(preset)
  c.eval = eval_section(preset)
  c.attributes = attributes()
  return c
