"""From the run config to the library objects: catalog config, loss config, model config and constructor.

Each function reads one section of the ConfigDict and returns the dataclass of the package that owns
it, so the packages never see a ConfigDict and an unknown or bad field fails here, named.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def catalog_config(config: ml_collections.ConfigDict):
  """`config.catalog` -> `data.catalog.CatalogConfig` (validated)."""
  from afmrl_jax.data.catalog import CatalogConfig
  section = config.catalog.to_dict()
  extra = {"manifest", "skip_bad_rows", "cache_dir"}
  unknown = set(section) - _fields(CatalogConfig) - extra
  if unknown:
    raise ValueError(f"unknown field(s) {sorted(unknown)} (CatalogConfig has {sorted(_fields(CatalogConfig))})")
  kwargs = {k: v for k, v in section.items() if k not in extra}
  if "categories" in kwargs:
    kwargs["categories"] = tuple(kwargs["categories"])
  cat = CatalogConfig(**kwargs)
  cat.validate()
  return cat


def agcl_config(config: ml_collections.ConfigDict):
  """`config.loss` -> `losses.config.AGCLConfig`; 0 stands for None in `uniform_margin`/`mask_threshold`."""
  from afmrl_jax.losses.config import AGCLConfig
  section = config.loss.to_dict()
  section.pop("strategy", None)
  unknown = set(section) - _fields(AGCLConfig)
  if unknown:
    raise ValueError(f"unknown field(s) {sorted(unknown)} (AGCLConfig has {sorted(_fields(AGCLConfig))})")
  for key in ("uniform_margin", "mask_threshold"):
    if key in section and not section[key]:
      section[key] = None
  return AGCLConfig(**section)


def lora_config(config: ml_collections.ConfigDict):
  """`config.lora` -> `models.lora.LoRAConfig`, or None when LoRA is off."""
  if not config.lora.enabled:
    return None
  from afmrl_jax.models.lora import LoRAConfig
  section = {k: v for k, v in config.lora.to_dict().items() if k != "enabled"}
  return LoRAConfig.from_dict(section)


SPECIAL_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def hf_arch_dict(config: ml_collections.ConfigDict, tokenizer: Any = None) -> dict[str, Any]:
  """The HF-style `config.json` dict of the model: the checkpoint's, or `config.model.arch` completed
  with the tokenizer's vocabulary size and special-token ids."""
  if config.model.hf_checkpoint:
    with open(os.path.join(config.model.hf_checkpoint, "config.json"), encoding="utf-8") as f:
      return json.load(f)
  arch = config.model.arch.to_dict()
  if tokenizer is not None:
    if not arch.get("vocab_size"):
      arch["vocab_size"] = len(tokenizer)
    for field, token in SPECIAL_TOKENS.items():
      token_id = tokenizer.convert_tokens_to_ids(token)
      if token_id is None or token_id < 0:
        raise ValueError(f"The tokenizer has no {token} token, which the model needs.")
      arch[field] = int(token_id)
    for field, token in (("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>")):
      token_id = tokenizer.convert_tokens_to_ids(token)
      if token_id is not None and token_id >= 0:
        arch[field] = int(token_id)
  if not arch.get("vocab_size"):
    raise ValueError("config.model.arch.vocab_size is 0 and no tokenizer was given to size it.")
  return arch


def vl_config(config: ml_collections.ConfigDict, tokenizer: Any = None):
  """The model's `models.config.VLConfig` (compute dtype from `config.dtype`, params float32)."""
  from afmrl_jax.models.config import VLConfig
  return VLConfig.from_hf_dict(hf_arch_dict(config, tokenizer), dtype=config.dtype, param_dtype="float32")


def model_constructor(config: ml_collections.ConfigDict, vl: Any) -> Callable[[], Any]:
  """A zero-argument, deterministic constructor of the representation model (+ LoRA adapters).

  Random init from `config.model.param_seed`; real weights are loaded afterwards by the trainer
  (`load_pretrained`) onto the already sharded parameters.
  """
  from flax import nnx
  from afmrl_jax.models.vl_model import VLModel
  lora = lora_config(config)
  seed = int(config.model.param_seed)

  def build():
    model = VLModel(vl, rngs=nnx.Rngs(seed))
    if lora is not None:
      from afmrl_jax.models.lora import apply_lora
      apply_lora(model, lora, rngs=nnx.Rngs(seed + 1))
    return model

  return build


def trainable_filter(config: ml_collections.ConfigDict) -> Any:
  from afmrl_jax.models.lora import trainable_filter as lora_filter
  return lora_filter(bool(config.lora.enabled))
