"""LoRA: identity at init, merge == unmerged, base frozen through the optimizer filter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from afmrl_jax.models import lora


class EinsumProj(nnx.Module):
  """A projection with a [embed, heads, head_dim] kernel (einsum style, as in sharded attention)."""

  def __init__(self, embed, heads, head_dim, *, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (embed, heads, head_dim)) * 0.3,
                            out_sharding=("embed", "heads", "head_dim"), eager_sharding=False)

  def __call__(self, x):
    return jnp.einsum("bte,ehd->bthd", x, self.kernel[...])


class Block(nnx.Module):

  def __init__(self, d, *, rngs):
    self.q_proj = EinsumProj(d, 2, d // 2, rngs=rngs)
    self.o_proj = nnx.Linear(d, d, use_bias=True, rngs=rngs)
    self.up_proj = nnx.Linear(d, 2 * d, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(2 * d, d, use_bias=False, rngs=rngs)
    self.norm = nnx.RMSNorm(d, rngs=rngs)

  def __call__(self, x):
    q = self.q_proj(x).reshape(x.shape)
    x = x + self.o_proj(jnp.tanh(q))
    return x + self.down_proj(jax.nn.silu(self.up_proj(self.norm(x))))


class Toy(nnx.Module):

  def __init__(self, d=8, layers=2, *, rngs):
    self.layers = nnx.List([Block(d, rngs=rngs) for _ in range(layers)])
    self.head = nnx.Linear(d, 3, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.head(x)


CONFIG = lora.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "up_proj", "down_proj"))


def _toy_with_lora():
  model = Toy(rngs=nnx.Rngs(0))
  base_out_model = Toy(rngs=nnx.Rngs(0))
  paths = lora.apply_lora(model, CONFIG, rngs=nnx.Rngs(1))
  return model, base_out_model, paths


def _x():
  return jax.random.normal(jax.random.key(2), (2, 5, 8))


def _train_steps(model, steps=3):
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=lora.trainable_filter(True))
  x, target = _x(), jax.random.normal(jax.random.key(3), (2, 5, 3))

  @nnx.jit
  def step(model, opt):
    loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(steps)]
  return opt, losses


def test_wraps_targets_and_identity_at_init():
  model, base, paths = _toy_with_lora()
  assert sorted(paths) == sorted(f"layers/{i}/{n}" for i in range(2) for n in CONFIG.targets)
  np.testing.assert_array_equal(np.asarray(model(_x())), np.asarray(base(_x())))
  # Base parameters keep their paths (so HF import/export and base checkpoints still apply).
  base_paths = {p for p, _ in nnx.to_flat_state(nnx.state(base, nnx.Param))}
  lora_model_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam)))}
  assert base_paths == lora_model_paths
  # Adapter shapes follow the kernels: a [in..., r], b [r, out...]; sharding names carried over.
  q = model.layers[0].q_proj
  assert q.lora_a.shape == (8, 4) and q.lora_b.shape == (4, 2, 4)
  assert q.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
  assert q.lora_b.get_metadata()["out_sharding"] == ("lora_rank", "heads", "head_dim")


def test_lora_forward_matches_numpy():
  model, base, _ = _toy_with_lora()
  up = model.layers[0].up_proj
  up.lora_b[...] = jax.random.normal(jax.random.key(9), up.lora_b.shape)
  x = np.asarray(jax.random.normal(jax.random.key(4), (3, 8)))
  w = np.asarray(up.kernel[...])
  a, b = np.asarray(up.lora_a[...]), np.asarray(up.lora_b[...])
  expected = x @ w + (8.0 / 4) * (x @ a) @ b
  np.testing.assert_allclose(np.asarray(up(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_optimizer_freezes_base_and_merge_matches():
  model, _, _ = _toy_with_lora()
  base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
  opt, losses = _train_steps(model)
  assert losses[-1] < losses[0]
  # Only adapters carry optimizer state.
  mu_leaves = jax.tree.leaves(opt.opt_state)
  n_lora = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  assert sum(np.size(l) > 1 for l in mu_leaves) == 2 * n_lora  # adam mu + nu per adapter
  base_after = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
    np.testing.assert_array_equal(before, after)  # bit-identical
  lora_after = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
  changed = [not np.array_equal(b, a) for b, a in zip(jax.tree.leaves(lora_before), jax.tree.leaves(lora_after))]
  assert all(changed)

  unmerged = np.asarray(model(_x()))
  lora.merge_lora(model)
  assert not nnx.state(model, nnx.LoRAParam)
  assert type(model.layers[1].q_proj) is EinsumProj and type(model.layers[0].up_proj) is nnx.Linear
  np.testing.assert_allclose(np.asarray(model(_x())), unmerged, rtol=1e-5, atol=1e-5)


def test_optax_mask_matches_filter():
  model, _, _ = _toy_with_lora()
  params = nnx.state(model, nnx.Param)
  mask = lora.lora_mask(params)
  flat = jax.tree.leaves(mask)
  assert sum(flat) == 2 * 4 * 2 and len(flat) == len(jax.tree.leaves(params))
  tx = optax.masked(optax.sgd(1.0), mask)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for m, u, g in zip(flat, jax.tree.leaves(updates), jax.tree.leaves(grads)):
    # masked-out leaves pass through untouched; the trainer zeroes them (or uses the nnx filter).
    if m:
      np.testing.assert_array_equal(np.asarray(u), -np.asarray(g))


def test_bad_targets_raise():
  with pytest.raises(ValueError, match="config.lora.targets"):
    lora.apply_lora(Toy(rngs=nnx.Rngs(0)), lora.LoRAConfig(targets=("qproj",)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="config.lora"):
    lora.LoRAConfig.from_dict({"rank": 2, "rnak": 3})
  assert lora.LoRAConfig.from_dict({"rank": 2, "targets": ["q_proj"]}).targets == ("q_proj",)
