"""LoRA on the real VLModel: HF import into a LoRA model, merge -> HF export -> PyTorch reload, mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from afmrl_jax import parallel
from afmrl_jax.generate import sampling
from afmrl_jax.generate.filters import SamplingConfig
from afmrl_jax.models import hf_checkpoint, lora, sharding
from afmrl_jax.models.vl_model import VLModel
from tests import test_models_hf_helpers as H

SHAPE = next(s for s in H.SHAPES if s.name == "qwen25vl_windows_tied")
CONFIG = lora.LoRAConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("hf"))
  H.hf_model(SHAPE, seed=2).save_pretrained(directory)
  return directory


_LOGITS = nnx.jit(lambda m, i, k, p: m.logits(m(i, k, p, SHAPE.grid)[0]))


def _forward(model, ids, mask, pixels):
  return _LOGITS(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))


def _randomise_adapters(model, seed=0):
  keys = iter(jax.random.split(jax.random.key(seed), 1000))
  for _, module in nnx.iter_modules(model):
    if isinstance(module, lora.LoRAProjection):
      module.lora_b[...] = 0.05 * jax.random.normal(next(keys), module.lora_b.shape)


def test_lora_vlmodel_import_merge_export_reload(hf_dir, tmp_path):
  model, config = hf_checkpoint.load_hf_checkpoint(hf_dir)
  ids, mask, pixels = H.inputs(SHAPE, batch=3, seed=1)
  base_logits = np.asarray(_forward(model, ids, mask, pixels))
  wrapped = lora.apply_lora(model, CONFIG, rngs=nnx.Rngs(3))
  # decoder: 7 projections per layer; the vision tower's attention is a fused `qkv`/`proj`, only its
  # MLP (gate/up/down) matches the HF names.
  text = [p for p in wrapped if p.startswith("language_model")]
  assert len(text) == 7 * 2 and len(wrapped) == len(text) + 3 * 2
  scoped = nnx.eval_shape(lambda: VLModel(config, rngs=nnx.Rngs(0)))
  assert sorted(lora.apply_lora(scoped, lora.LoRAConfig(scope="language_model"), rngs=nnx.Rngs(0))) == sorted(text)
  np.testing.assert_array_equal(np.asarray(_forward(model, ids, mask, pixels)), base_logits)

  _randomise_adapters(model)
  lora_logits = np.asarray(_forward(model, ids, mask, pixels))
  assert np.abs(lora_logits - base_logits).max() > 1e-3

  # An abstract model + LoRA filled from the HF directory: base weights load, adapters keep their values.
  fresh = nnx.eval_shape(lambda: VLModel(config, rngs=nnx.Rngs(7)))
  lora.apply_lora(fresh, CONFIG, rngs=nnx.Rngs(3))
  hf_checkpoint.load_hf_weights(fresh, hf_dir)
  np.testing.assert_array_equal(np.asarray(_forward(fresh, ids, mask, pixels)), base_logits)

  gen_cfg = SamplingConfig(temperature=0.0, max_new_tokens=6)
  gen = lambda m: sampling.generate(m, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), SHAPE.grid,
                                    config=gen_cfg)
  lora_tokens = np.asarray(gen(model).tokens)  # the KV-cache sampler drives a LoRA model too

  lora.merge_lora(model)
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  np.testing.assert_allclose(np.asarray(_forward(model, ids, mask, pixels)), lora_logits, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(gen(model).tokens), lora_tokens)

  out_dir = str(tmp_path / "merged")
  hf_checkpoint.save_hf_checkpoint(model, out_dir)
  import transformers as tf
  hf = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
  hf_logits, _ = H.hf_forward(hf, SHAPE, ids, mask, pixels)
  real = mask.astype(bool)
  np.testing.assert_allclose(hf_logits[real], lora_logits[real], atol=1e-4)


def test_lora_vlmodel_sharded_matches_unsharded(hf_dir):
  model, _ = hf_checkpoint.load_hf_checkpoint(hf_dir)
  lora.apply_lora(model, CONFIG, rngs=nnx.Rngs(3))
  _randomise_adapters(model, seed=1)
  ids, mask, pixels = H.inputs(SHAPE, batch=3, seed=2)
  want = np.asarray(_forward(model, ids, mask, pixels))
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  sharded = sharding.shard_model(model, mesh)
  q = sharded.language_model.layers[0].self_attn.q_proj
  assert q.lora_b.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  with jax.set_mesh(mesh):
    got = np.asarray(_forward(sharded, ids, mask, pixels))
  np.testing.assert_allclose(got, want, atol=1e-5)
