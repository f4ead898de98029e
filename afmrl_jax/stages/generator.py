"""The attribute generator, shared by the stages that use one (sft, generate, stage2): its data and
decoding configs, and loading it from an SFT or a stage-2 workdir."""

from __future__ import annotations

import dataclasses

from flax import nnx

from afmrl_jax import parallel
from afmrl_jax.config import schema
from afmrl_jax.data import generator_data
from afmrl_jax.data.table import ListingTable
from afmrl_jax.eval import attributes as attribute_eval
from afmrl_jax.generate.filters import SamplingConfig
from afmrl_jax.models import lora as lora_lib
from afmrl_jax.generate.sampling import sampling_for
from afmrl_jax.train import checkpointing, state as state_lib
from afmrl_jax.train import model as builders


def restore(run: schema.Run, source: str, tokenizer, mesh) -> tuple[state_lib.ShardedModel, int]:
  """(the generator trained in workdir `source`, its checkpoint's step): the latest checkpoint of an SFT
  run, or of a stage-2 run (its tuned parameters, LoRA adapters or all, on its SFT policy)."""
  if schema.saved_stage(source) == "stage2":
    return tuned_policy(source, tokenizer, mesh)
  return builders.restore_model(run, checkpointing.checkpoint_dir(source), tokenizer, mesh)


def load_generator(run: schema.Run, tokenizer, mesh):
  """The generator module: the latest checkpoint of `checkpoint.restore_dir` (see `restore`), else the
  HF checkpoint."""
  restore_dir = run.checkpoint.restore_dir
  if restore_dir:
    model, _ = restore(run, restore_dir, tokenizer, mesh)
  else:
    model = builders.create_model(run, tokenizer, mesh)
  return model.merge()


def data_config(run: schema.Run) -> generator_data.GeneratorDataConfig:
  """`run.generator` with the catalog's image size."""
  return dataclasses.replace(run.generator, image_size=run.catalog.image_size)


def greedy(run: schema.Run, vl) -> SamplingConfig:
  """Greedy decoding up to `sft_eval.max_new_tokens`, stopping at the model's EOS."""
  return sampling_for(vl, temperature=0.0, max_new_tokens=run.sft_eval.max_new_tokens)


def policy_run(run: schema.Run) -> schema.Run:
  """The SFT run of `run.rar.policy`, with this run's mesh and attribute evaluation."""
  saved = schema.load_saved(run.rar.policy)
  return dataclasses.replace(saved, mesh=run.mesh, sft_eval=run.sft_eval)


def policy_model(run: schema.Run, prun: schema.Run, tokenizer, mesh) -> state_lib.ShardedModel:
  """The policy at the starting weights of `run.rar.policy` (an SFT run, or a stage-2 run's tuned
  generator): every parameter trainable, or with `run.lora.enabled` (or a LoRA policy) only fresh adapters
  (zero-initialised, so the policy starts equal to its start) on the frozen starting weights."""
  if prun.stage == "stage2":
    start, _ = tuned_policy(run.rar.policy, tokenizer, mesh)
  else:
    start, _ = builders.restore_model(prun, checkpointing.checkpoint_dir(run.rar.policy), tokenizer, mesh)
  if not run.lora.enabled and not prun.lora.enabled:
    return start
  # A LoRA policy stays LoRA unless this run sets its own adapters: its adapters are folded in below and
  # fresh ones (its LoRA settings) are trained, so the KL reference is exactly the starting policy.
  target = dataclasses.replace(prun, lora=run.lora if run.lora.enabled else prun.lora)
  fresh = state_lib.create_sharded(builders.model_constructor(target, builders.vl_config(prun, tokenizer)),
                                   mesh, builders.trainable_filter(target))
  module = fresh.merge()
  # The starting weights (adapters they carry folded in) into the frozen base of every projection.
  nnx.update(module, nnx.state(lora_lib.merge_lora(start.merge()), nnx.Param))
  graphdef, params, rest = nnx.split(module, builders.trainable_filter(target), ...)
  return state_lib.ShardedModel(graphdef, params, rest, fresh.param_shardings, fresh.rest_shardings)


def tuned_policy(workdir: str, tokenizer, mesh) -> tuple[state_lib.ShardedModel, int]:
  """(the generator a stage-2 run in `workdir` trained: its latest checkpoint on top of its SFT policy,
  that checkpoint's step)."""
  run = schema.load_saved(workdir)
  model = policy_model(run, policy_run(run), tokenizer, mesh)
  step = builders.restore_latest_params(model, run, checkpointing.checkpoint_dir(workdir), mesh)
  return model, step


def evaluate(run: schema.Run, model, catalog, tokenizer, workdir: str) -> dict[str, float]:
  """Attribute quality of `model`'s greedy generations on `run.sft_eval.split` (reports in the workdir)."""
  table = ListingTable.from_catalog(catalog, run.sft_eval.split)
  quality = attribute_eval.evaluate_generator(model.merge(), tokenizer, table, data_config(run), run.sft_eval,
                                              parallel.make_mesh(run.mesh), workdir,
                                              greedy(run, builders.vl_config(run, tokenizer)))
  return attribute_eval.headline(quality)
