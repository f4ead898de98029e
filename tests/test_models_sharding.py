"""8 simulated CPU devices: the model sharded over an fsdp x tensor mesh gives the unsharded logits,
both when imported from an HF checkpoint (streamed onto the mesh) and when created sharded."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from afmrl_jax import parallel
from afmrl_jax.models import hf_checkpoint
from afmrl_jax.models.config import VLConfig
from afmrl_jax.models.sharding import create_sharded
from afmrl_jax.models.vl_model import VLModel
from tests.test_models_hf_helpers import SHAPES, inputs

pytest.importorskip('torch')
pytest.importorskip('transformers')

SHAPE = SHAPES[2]  # Qwen2.5-VL, hidden 64, 4 heads / 2 kv heads, windows, tied embeddings


def _mesh():
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 devices (tests/conftest.py sets XLA_FLAGS for CPU)')
  return parallel.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 4})


def _logits(model, ids, mask, pixels, grid, mesh=None):
  @nnx.jit(static_argnums=4)
  def run(model, ids, mask, pixels, grid):
    return model.logits(model(ids, mask, pixels, grid)[0])

  args = [jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)]
  if mesh is None:
    return np.asarray(run(model, *args, grid))
  batch = jax.sharding.NamedSharding(mesh, P(('data', 'fsdp')))
  args = [jax.device_put(a, batch) for a in args]
  with jax.set_mesh(mesh):
    return np.asarray(run(model, *args, grid))


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  from tests.test_models_hf_helpers import hf_model

  directory = str(tmp_path_factory.mktemp('ckpt'))
  hf_model(SHAPE).save_pretrained(directory)
  return directory


def test_created_sharded_matches_unsharded():
  mesh = _mesh()
  config = VLConfig.from_hf_dict({
      'model_type': 'qwen2_vl', 'image_token_id': 100,
      'text_config': dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          rope_parameters={'rope_type': 'default', 'mrope_section': [4, 2, 2]}),
      'vision_config': dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)})
  plain = VLModel(config, rngs=nnx.Rngs(3))
  sharded = create_sharded(lambda: VLModel(config, rngs=nnx.Rngs(3)), mesh)
  up = sharded.language_model.layers[1].mlp.up_proj.kernel.get_value()
  assert up.sharding.spec == P('fsdp', 'tensor')
  ids, mask, pixels = inputs(SHAPES[0], batch=2)  # grid (1, 4, 4), merge 2
  want = _logits(plain, ids, mask, pixels, (1, 4, 4))
  got = _logits(sharded, ids, mask, pixels, (1, 4, 4), mesh)
  assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-5


def test_imported_sharded_model_prefill_and_decode_match_unsharded(checkpoint):
  """Import streamed onto the mesh; prefill logits (all real positions) and two greedy decode
  steps with a sharded KV cache equal the single-device model's."""
  from afmrl_jax.models.decoder import cache_shardings

  mesh = _mesh()
  ids, mask, pixels = inputs(SHAPE, batch=2)
  plain, _ = hf_checkpoint.load_hf_checkpoint(checkpoint)
  sharded, _ = hf_checkpoint.load_hf_checkpoint(checkpoint, mesh=mesh)
  q = sharded.language_model.layers[0].self_attn.q_proj.kernel.get_value()
  assert q.sharding.spec == P('fsdp', 'tensor')
  assert q.addressable_shards[0].data.shape == (32, 16)  # [64, 64] over fsdp=2 x tensor=4
  assert sharded.language_model.embed_tokens.get_value().sharding.spec == P('tensor', 'fsdp')
  max_len = ids.shape[1] + 3
  real = mask.astype(bool)

  @nnx.jit
  def prefill(model, ids, mask, pixels, cache):
    hidden, cache = model(ids, mask, pixels, SHAPE.grid, cache=cache)
    return model.logits(hidden), cache

  @nnx.jit
  def step(model, tok, cache):
    hidden, cache = model(tok, None, cache=cache)
    return model.logits(hidden[:, -1]), cache

  def run(model, sharded_mesh=None):
    args = [jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)]
    cache = model.init_cache(2, max_len)
    if sharded_mesh is not None:
      batch = jax.sharding.NamedSharding(sharded_mesh, P(('data', 'fsdp')))
      args = [jax.device_put(a, batch) for a in args]
      shardings = cache_shardings(cache, sharded_mesh)
      # batch over data x fsdp; 2 kv heads do not divide the 4-way tensor axis, so replicated there
      assert shardings.k[0].spec == P(('data', 'fsdp'), None, None, None)
      cache = jax.device_put(cache, shardings)
    out = []
    with jax.set_mesh(sharded_mesh) if sharded_mesh is not None else contextlib.nullcontext():
      all_logits, cache = prefill(model, *args, cache)
      out.append(np.asarray(all_logits)[real])
      logits = all_logits[:, -1]
      for _ in range(2):
        tok = jnp.argmax(logits, -1)[:, None].astype(jnp.int32)
        logits, cache = step(model, tok, cache)
        out.append(np.asarray(logits))
    return np.concatenate(out)

  want = run(plain)
  got = run(sharded, mesh)
  assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize('arch', ['qwen2_vl', 'qwen2_5_vl'])
def test_every_parameter_has_known_logical_axes(arch):
  config = VLConfig.from_hf_dict({
      'model_type': arch, 'tie_word_embeddings': False,
      'text_config': dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2,
                          rope_parameters={'rope_type': 'default', 'mrope_section': [4, 2, 2]}),
      'vision_config': dict(depth=1, embed_dim=32, hidden_size=64 if arch == 'qwen2_vl' else 32,
                            out_hidden_size=64, intermediate_size=64, num_heads=2)})
  state = nnx.state(nnx.eval_shape(lambda: VLModel(config, rngs=nnx.Rngs(0))), nnx.Param)
  known = dict(parallel.LOGICAL_RULES)
  flat = nnx.to_flat_state(state)
  assert len(flat) > 20
  for path, var in flat:
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == var.get_value().ndim, path
    assert all(n in known for n in names), (path, names)


def test_import_reads_only_each_devices_slice(checkpoint, monkeypatch):
  """Streaming: a tensor-sharded weight is never read whole; each read is one device's block."""
  mesh = _mesh()
  reads = {}
  original = hf_checkpoint._Reader.slice

  class Recorder:
    def __init__(self, name, inner):
      self.name, self.inner = name, inner

    def get_shape(self):
      return self.inner.get_shape()

    def __getitem__(self, index):
      out = self.inner[index]
      reads.setdefault(self.name, []).append(tuple(out.shape))
      return out

  monkeypatch.setattr(hf_checkpoint._Reader, 'slice',
                      lambda self, name: Recorder(name, original(self, name)))
  hf_checkpoint.load_hf_checkpoint(checkpoint, mesh=mesh)
  # q_proj.weight is HF [64 out, 64 in]; our kernel [in (fsdp=2), out (tensor=4)] -> 8 reads of [16, 32]
  q = reads['model.layers.0.self_attn.q_proj.weight']
  assert len(q) == 8 and set(q) == {(16, 32)}
  assert set(reads['model.embed_tokens.weight']) == {(32, 32)}  # [128 vocab / 4, 64 / 2]
