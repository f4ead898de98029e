"""Generation on a (data, fsdp, tensor) mesh of 8 simulated devices equals the unsharded run."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from afmrl_jax import parallel
from afmrl_jax.generate import sampling
from afmrl_jax.generate.filters import SamplingConfig
from afmrl_jax.models import hf_checkpoint, sharding
from tests import test_models_hf_helpers as H

SHAPE = next(s for s in H.SHAPES if s.name == "qwen25vl_win1_merge3")


def test_sharded_generation_matches_unsharded(tmp_path):
  H.hf_model(SHAPE, seed=1).save_pretrained(str(tmp_path))
  model, _ = hf_checkpoint.load_hf_checkpoint(str(tmp_path))
  ids, mask, pixels = H.inputs(SHAPE, batch=3, seed=4)
  # batch 4 (divisible by data x fsdp = 4): repeat the first row
  ids, mask, pixels = (np.concatenate([a, a[:1]]) for a in (ids, mask, pixels))
  cfg = SamplingConfig(temperature=0.7, top_k=20, max_new_tokens=8, eos_ids=(2,))
  key = jax.random.key(5)
  want = sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), SHAPE.grid,
                           rng=key, config=cfg)

  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = sharding.shard_model(model, mesh)
  batch = parallel.global_batch({"ids": ids, "mask": mask, "pixels": pixels}, mesh)
  with jax.set_mesh(mesh):
    got = sampling.generate(sharded, batch["ids"], batch["mask"], batch["pixels"], SHAPE.grid,
                            rng=key, config=cfg)
  assert got.tokens.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None)), 2)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-4)
  # rows 0 and 3 share a prompt but not their sampled continuation (per-row randomness)
  assert not np.array_equal(np.asarray(got.tokens)[0], np.asarray(got.tokens)[3])
