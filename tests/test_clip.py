"""CLIP two-tower baseline: block parity with NumPy, padding invariance, normalisation, loss, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from afmrl_jax.models import clip

CFG = clip.CLIPConfig(patch_dim=12, max_patches=9, vision_width=16, vision_depth=2, vision_heads=4,
                      vision_mlp=32, vocab_size=50, max_text_len=10, text_width=16, text_depth=2,
                      text_heads=2, text_mlp=24, embed_dim=8)


def _model():
  return clip.CLIPModel(CFG, rngs=nnx.Rngs(0))


def _np(v):
  return np.asarray(v[...], np.float64)


def np_layer_norm(x, ln, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * _np(ln.scale) + _np(ln.bias)


def np_linear(x, lin):
  return x @ _np(lin.kernel) + (_np(lin.bias) if lin.bias is not None else 0)


def np_attention(x, attn, allowed):
  b, s, w = x.shape
  h = attn.heads
  d = w // h
  q, k, v = (np_linear(x, p).reshape(b, s, h, d) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
  logits = np.einsum("bshd,blhd->bhsl", q, k) / np.sqrt(d)
  if allowed is not None:
    logits = np.where(allowed[:, None], logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np_linear(np.einsum("bhsl,blhd->bshd", p, v).reshape(b, s, w), attn.o_proj)


def np_block(x, block, allowed):
  x = x + np_attention(np_layer_norm(x, block.ln1, CFG.norm_eps), block.attn, allowed)
  hdn = np_linear(np_layer_norm(x, block.ln2, CFG.norm_eps), block.mlp.fc1)
  hdn = hdn / (1 + np.exp(-1.702 * hdn))
  return x + np_linear(hdn, block.mlp.fc2)


def test_text_block_matches_numpy_with_causal_padding_mask():
  model = _model()
  block = model.text_blocks[0]
  x = np.random.default_rng(0).normal(size=(2, 6, 16)).astype(np.float32)
  mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
  allowed = np.tril(np.ones((6, 6), bool))[None] & (mask > 0)[:, None, :]
  got = np.asarray(nnx.jit(lambda b, *a: b(*a))(block, jnp.asarray(x), jnp.asarray(allowed)))
  want = np_block(x.astype(np.float64), block, allowed)
  np.testing.assert_allclose(got[0], want[0], atol=2e-5)
  np.testing.assert_allclose(got[1, 2:], want[1, 2:], atol=2e-5)  # padding query rows are don't-care


def test_vision_block_matches_numpy_full_attention():
  model = _model()
  block = model.vision_blocks[1]
  x = np.random.default_rng(1).normal(size=(3, 5, 16)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda b, y: b(y, None))(block, jnp.asarray(x))),
                             np_block(x.astype(np.float64), block, None), atol=2e-5)


def _batch(b=4, t=7, p=9, seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(b, p, CFG.patch_dim)).astype(np.float32)
  ids = rng.integers(1, CFG.vocab_size, size=(b, t))
  return jnp.asarray(pixels), jnp.asarray(ids), jnp.ones((b, t), jnp.int32)


def test_shapes_norms_and_padding_invariance():
  model = _model()
  pixels, ids, mask = _batch()
  img, txt = nnx.jit(lambda m, *a: m(*a))(model, pixels, ids, mask)
  assert img.shape == txt.shape == (4, CFG.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(txt), axis=-1), 1.0, rtol=1e-6)
  # The same 5-token text with 3 pads on the left or on the right embeds identically.
  real = ids[0, :5]
  left = jnp.concatenate([jnp.zeros(3, ids.dtype), real])[None]
  right = jnp.concatenate([real, jnp.zeros(3, ids.dtype)])[None]
  lm = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]])
  rm = jnp.asarray([[1, 1, 1, 1, 1, 0, 0, 0]])
  encode_text = nnx.jit(lambda m, i, k: m.encode_text(i, k))
  np.testing.assert_allclose(np.asarray(encode_text(model, left, lm)),
                             np.asarray(encode_text(model, right, rm)), atol=1e-5)
  np.testing.assert_allclose(np.asarray(encode_text(model, real[None], jnp.ones((1, 5), jnp.int32))),
                             np.asarray(encode_text(model, right, rm)), atol=1e-5)
  listing = np.asarray(nnx.jit(lambda m, *a: m.embed_listing(*a))(model, pixels, ids, mask))
  want = np.asarray(img + txt)
  np.testing.assert_allclose(listing, want / np.linalg.norm(want, axis=-1, keepdims=True), rtol=1e-5)


def test_clip_loss_matches_numpy():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(5, 8))
  b = rng.normal(size=(5, 8))
  a /= np.linalg.norm(a, axis=-1, keepdims=True)
  b /= np.linalg.norm(b, axis=-1, keepdims=True)
  logits = np.exp(1.5) * a @ b.T

  def ce(z):
    z = z - z.max(-1, keepdims=True)
    return -np.mean(np.diag(z - np.log(np.exp(z).sum(-1, keepdims=True))))

  got = clip.clip_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.float32(1.5))
  np.testing.assert_allclose(float(got), 0.5 * (ce(logits) + ce(logits.T)), rtol=1e-5)


def test_training_steps_reduce_loss():
  model = _model()
  pixels, ids, mask = _batch(b=6, seed=3)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(m):
      img, txt = m(pixels, ids, mask)
      return clip.clip_loss(img, txt, m.logit_scale[...])
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(20)]
  assert losses[-1] < 0.7 * losses[0] and max(losses[-5:]) < losses[0]


def test_config_and_input_errors():
  with pytest.raises(ValueError, match="vision_width"):
    clip.CLIPConfig(vision_width=10, vision_heads=4)
  model = _model()
  with pytest.raises(ValueError, match="max_text_len"):
    model.encode_text(jnp.zeros((1, 11), jnp.int32), jnp.ones((1, 11), jnp.int32))


def test_sharded_forward_matches_unsharded():
  from afmrl_jax import parallel
  from afmrl_jax.models import sharding

  pixels, ids, mask = _batch(b=4, seed=4)
  fwd = nnx.jit(lambda m, *a: m(*a))
  want = fwd(_model(), pixels, ids, mask)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = sharding.create_sharded(lambda: clip.CLIPModel(CFG, rngs=nnx.Rngs(0)), mesh)
  assert model.text_blocks[0].mlp.fc1.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  with jax.set_mesh(mesh):
    got = fwd(model, pixels, ids, mask)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
