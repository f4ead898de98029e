"""The model of a run: its HF-style architecture dict, `VLConfig`, a seeded sharded-ready constructor
(+ LoRA), the trainable filter, and loading a local HF checkpoint into the created model."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

from afmrl_jax.config import schema
from afmrl_jax.config.sections import ModelOptions



SPECIAL_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def hf_arch_dict(model: ModelOptions, tokenizer: Any = None) -> dict[str, Any]:
  """The HF-style `config.json` dict of the model: the checkpoint's, or `model.arch` completed with the
  tokenizer's vocabulary size and special-token ids."""
  if model.hf_checkpoint:
    with open(os.path.join(model.hf_checkpoint, "config.json"), encoding="utf-8") as f:
      return json.load(f)
  arch = copy.deepcopy(dict(model.arch))
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


def vl_config(run: schema.Run, tokenizer: Any = None):
  """The model's `models.config.VLConfig` (compute dtype `run.dtype`, params float32)."""
  from afmrl_jax.models.config import VLConfig
  return VLConfig.from_hf_dict(hf_arch_dict(run.model, tokenizer), dtype=run.dtype, param_dtype="float32")


def model_constructor(run: schema.Run, vl: Any) -> Callable[[], Any]:
  """A zero-argument, deterministic constructor of the representation model (+ LoRA adapters).

  Random init from `run.model.param_seed`; real weights are loaded afterwards (`load_hf_weights`) onto
  the already sharded parameters.
  """
  from flax import nnx
  from afmrl_jax.fields import narrow
  from afmrl_jax.models.lora import LoRAConfig
  from afmrl_jax.models.vl_model import VLModel
  lora = narrow(run.lora, LoRAConfig) if run.lora.enabled else None
  seed = int(run.model.param_seed)

  def build():
    model = VLModel(vl, rngs=nnx.Rngs(seed))
    if lora is not None:
      from afmrl_jax.models.lora import apply_lora
      apply_lora(model, lora, rngs=nnx.Rngs(seed + 1))
    return model

  return build


def trainable_filter(run: schema.Run) -> Any:
  """`nnx.LoRAParam` with LoRA on, else every `nnx.Param`."""
  from afmrl_jax.models.lora import trainable_filter as lora_filter
  return lora_filter(bool(run.lora.enabled))


def load_hf_weights(model: Any, run: schema.Run, mesh: Any) -> None:
  """Loads `run.model.hf_checkpoint` into the created sharded model (`train.state.ShardedModel`), in place:
  each device reads only its own slice."""
  import jax
  from flax import nnx
  from afmrl_jax.models.hf_checkpoint import load_hf_weights as load
  module = model.merge()
  with jax.set_mesh(mesh):
    load(module, run.model.hf_checkpoint, mesh)
  _, model.params, model.rest = nnx.split(module, trainable_filter(run), ...)


def create_model(run: schema.Run, tokenizer, mesh) -> Any:
  """The run's model, created sharded (+ LoRA), with the HF checkpoint's weights if one is set."""
  from afmrl_jax.train import state as state_lib
  vl = vl_config(run, tokenizer)
  if len(tokenizer) > vl.text.vocab_size:
    raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                     f"{vl.text.vocab_size}: the checkpoint and the tokenizer (config.model.tokenizer) do not match.")
  build = model_constructor(run, vl)
  model = state_lib.create_sharded(build, mesh, trainable_filter(run))
  if run.model.hf_checkpoint:
    load_hf_weights(model, run, mesh)
  return model


def restore_latest_params(model: Any, run: schema.Run, checkpoint_dir: str, mesh) -> int:
  """Sets `model.params` to the trainable params of the latest checkpoint in `checkpoint_dir`; returns its
  step. `run` gives the optimizer whose state shares the checkpoint."""
  from afmrl_jax.train import checkpointing
  from afmrl_jax.train import state as state_lib
  tx = state_lib.make_optimizer(run.optimizer, run.train.num_steps)
  checkpointer = checkpointing.Checkpointer(checkpoint_dir, keep=run.checkpoint.keep, async_save=False)
  try:
    state, step = checkpointer.restore_latest(state_lib.train_state_shapes(tx, model, mesh))
  finally:
    checkpointer.close()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {checkpoint_dir}; train first.")
  model.params = state["params"]
  return step


def restore_model(run: schema.Run, checkpoint_dir: str, tokenizer, mesh) -> tuple[Any, int]:
  """The run's model with the trainable params of the latest checkpoint in `checkpoint_dir`."""
  model = create_model(run, tokenizer, mesh)
  return model, restore_latest_params(model, run, checkpoint_dir, mesh)
