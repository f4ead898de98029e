"""Trainer options on the tiny model: LoRA-only training, bf16 compute, HF checkpoint loading."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.stage1 as stage1_configs
from afmrl_jax import parallel
from afmrl_jax.losses import AGCLConfig
from afmrl_jax.models import hf_checkpoint
from afmrl_jax.train import model as builders
from afmrl_jax.config import schema
from afmrl_jax.stages.stage1 import objective as stage1_step
from afmrl_jax.train import loop as loop_lib
from afmrl_jax.train import state as state_lib
from tests.test_train_stage1_step import GRID, IDF, make_batch, mesh_of, tiny_vl


def _config(warmup_steps=None, **lora):
  config = stage1_configs.get_config("ci")
  config.lora.enabled = bool(lora)
  for k, v in lora.items():
    config.lora[k] = v
  if warmup_steps is not None:
    config.optimizer.warmup_steps = warmup_steps
  return schema.parse(config)


def _one_step(config, vl, mesh):
  build = builders.model_constructor(config, vl)
  trainable = builders.trainable_filter(config)
  model = state_lib.create_sharded(build, mesh, trainable)
  tx = state_lib.make_optimizer(config.optimizer, 10)
  shardings = state_lib.state_shardings(tx, model, mesh)
  state = state_lib.init_train_state(tx, model, mesh, shardings)
  before = jax.tree.map(np.asarray, state["params"])
  loss_fn = stage1_step.make_loss_fn(stage1_step.make_agcl(AGCLConfig(), "dense", IDF, 3.0), GRID)
  step = jax.jit(loop_lib.make_train_step(model.graphdef, tx, loss_fn=loss_fn))
  with jax.set_mesh(mesh), parallel.logical_rules():
    batch = parallel.global_batch(make_batch(), mesh)
    state, metrics = step(state, model.rest, batch)
  return model, before, state, metrics


def test_lora_trains_only_adapters():
  config = _config(warmup_steps=0, rank=4, targets=("q_proj", "v_proj"))
  mesh = mesh_of({"data": 1, "fsdp": 1, "tensor": 1})
  model, before, state, metrics = _one_step(config, tiny_vl(), mesh)
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state["params"])}
  assert names and all(n.endswith(("lora_a", "lora_b")) for n in names), sorted(names)[:4]
  # optimizer state exists for the adapters only: 2 moments per trainable leaf
  n_train = len(jax.tree.leaves(state["params"]))
  n_all = len(jax.tree.leaves(model.params)) + len(jax.tree.leaves(model.rest))
  assert n_train < n_all // 3
  after = jax.tree.map(np.asarray, state["params"])
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
  assert any(changed) and np.isfinite(float(metrics["loss"]))


@pytest.mark.slow  # two more compiles of the model step
def test_bf16_compute_is_close_to_float32():
  mesh = mesh_of({"data": 1, "fsdp": 1, "tensor": 1})
  config = _config()
  losses = {}
  for dtype in ("float32", "bfloat16"):
    vl = tiny_vl().replace(dtype=dtype)
    _, _, state, metrics = _one_step(config, vl, mesh)
    losses[dtype] = float(metrics["loss"])
    # parameters (and the optimizer) stay float32 under bf16 compute
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}
  assert abs(losses["bfloat16"] - losses["float32"]) < 0.05 * abs(losses["float32"])


def test_hf_checkpoint_weights_are_loaded(tmp_path):
  """A saved model loads into the trainer's sharded model (LoRA on): every HF weight is identical."""
  from afmrl_jax.models.vl_model import VLModel
  with nnx.use_eager_sharding(False):
    source = VLModel(tiny_vl(), rngs=nnx.Rngs(7))
  hf_checkpoint.save_hf_checkpoint(source, str(tmp_path))
  config = _config(rank=4)
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, hf_checkpoint=str(tmp_path)))
  mesh = mesh_of({"data": 1, "fsdp": 2, "tensor": 2})
  build = builders.model_constructor(config, builders.vl_config(config))
  model = state_lib.create_sharded(build, mesh, builders.trainable_filter(config))
  builders.load_hf_weights(model, config, mesh)
  loaded = dict(nnx.to_flat_state(nnx.state(model.merge(), nnx.Param)))
  want = list(nnx.to_flat_state(nnx.state(source, nnx.Param)))
  assert len(want) > 20
  for path, var in want:
    np.testing.assert_array_equal(np.asarray(loaded[path][...]), np.asarray(var[...]), err_msg=str(path))
  assert any(str(p[-1]).startswith("lora_") for p in loaded)  # adapters kept


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
  class FakeTokenizer:
    def __len__(self):
      return 500

    def convert_tokens_to_ids(self, token):
      return {"<|image_pad|>": 60, "<|vision_start|>": 61, "<|vision_end|>": 62}.get(token, 1)

  config = stage1_configs.get_config("ci")
  config.model.arch.vocab_size = 64
  with pytest.raises(ValueError, match="The tokenizer has 500 tokens but the model's vocabulary is 64"):
    builders.create_model(schema.parse(config), FakeTokenizer(), mesh_of({"data": 1, "fsdp": 1, "tensor": 1}))
