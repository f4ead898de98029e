"""CLIP-style two-tower baseline: a ViT over image patches and a causal text transformer.

Built from the shared blocks of `models.layers` (dense projections with logical axes, LayerNorm,
the plain MLP, masked GQA attention). Pre-LN blocks as in OpenAI CLIP:
`x + attn(ln1(x))`, `x + mlp(ln2(x))`, quick-GELU MLPs.

  * image tower: patches `[B, P, patch_dim]` in the data pipeline's Qwen2-VL layout
    (C * 2 * 14 * 14 features each) -> linear patch embedding + learned positions, a prepended
    class token, blocks, final LN on the class token, projection;
  * text tower: token + learned position embeddings, causal blocks with a padding mask, final LN,
    the last real token's state (left or right padding), projection;
  * both outputs L2-normalised `[B, embed_dim]`; a learned `logit_scale` (CLIP's init log(1/0.07)).

`clip_loss` is the symmetric InfoNCE of CLIP; `embed_listing` combines the two towers into one
listing embedding (image + title) for the identical-product retrieval baseline row.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from afmrl_jax.models.layers import INIT_STD, LayerNorm, PlainMLP, attention, dense
from afmrl_jax.models.sharding import constrain, param
from afmrl_jax.vectors import l2_normalize


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Sizes of both towers. `max_patches` bounds P; `max_text_len` bounds T."""
  patch_dim: int = 3 * 2 * 14 * 14
  max_patches: int = 256
  vision_width: int = 256
  vision_depth: int = 4
  vision_heads: int = 4
  vision_mlp: int = 1024
  vocab_size: int = 8192
  max_text_len: int = 64
  text_width: int = 256
  text_depth: int = 4
  text_heads: int = 4
  text_mlp: int = 1024
  embed_dim: int = 256
  act: str = "quick_gelu"
  norm_eps: float = 1e-5

  def __post_init__(self):
    for tower, width, heads in (("vision", self.vision_width, self.vision_heads),
                                ("text", self.text_width, self.text_heads)):
      if width % heads:
        raise ValueError(f"CLIPConfig: {tower}_width {width} is not divisible by {tower}_heads {heads}.")


class SelfAttention(nnx.Module):
  """Multi-head self-attention with biased q/k/v/o projections. x [B, S, W] -> [B, S, W]."""

  def __init__(self, width: int, heads: int, axes: tuple[str, str], *, rngs: nnx.Rngs):
    kw = dict(bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.q_proj = dense(width, width, axes, **kw)
    self.k_proj = dense(width, width, axes, **kw)
    self.v_proj = dense(width, width, axes, **kw)
    self.o_proj = dense(width, width, axes[::-1], **kw)
    self.heads = heads

  def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """allowed: bool broadcastable to [B, S, S] (True = may attend), or None."""
    b, s, w = x.shape
    split = lambda y: y.reshape(b, s, self.heads, w // self.heads)
    out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), allowed,
                    (w // self.heads) ** -0.5)
    return self.o_proj(out.reshape(b, s, w))


class Block(nnx.Module):
  """Pre-LN transformer block."""

  def __init__(self, width: int, heads: int, mlp: int, cfg: CLIPConfig, axes: tuple[str, str], *,
               rngs: nnx.Rngs):
    self.ln1 = LayerNorm(width, cfg.norm_eps)
    self.attn = SelfAttention(width, heads, axes, rngs=rngs)
    self.ln2 = LayerNorm(width, cfg.norm_eps)
    self.mlp = PlainMLP(width, mlp, cfg.act, axes=axes, dtype=jnp.float32, param_dtype=jnp.float32,
                        rngs=rngs)

  def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:
    x = x + self.attn(self.ln1(x), allowed)
    return x + self.mlp(self.ln2(x))


def last_token_index(attention_mask: jax.Array) -> jax.Array:
  """[B, T] 0/1 mask -> [B] index of the last real token (works for left and right padding)."""
  t = attention_mask.shape[1]
  return jnp.max(jnp.where(attention_mask > 0, jnp.arange(t)[None], 0), axis=1)


class CLIPModel(nnx.Module):
  """Two towers. encode_image([B,P,patch_dim]) and encode_text([B,T], [B,T]) -> [B, embed_dim], unit norm."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    vw, tw = cfg.vision_width, cfg.text_width
    vaxes, taxes = ("vision_embed", "vision_mlp"), ("embed", "mlp")
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.patch_embed = dense(cfg.patch_dim, vw, (None, "vision_embed"), bias=False, **kw)
    self.class_embed = param(INIT_STD * jax.random.normal(rngs.params(), (vw,)), "vision_embed")
    self.vision_pos = param(INIT_STD * jax.random.normal(rngs.params(), (cfg.max_patches + 1, vw)),
                            None, "vision_embed")
    self.vision_pre_ln = LayerNorm(vw, cfg.norm_eps)
    self.vision_blocks = nnx.List([Block(vw, cfg.vision_heads, cfg.vision_mlp, cfg, vaxes, rngs=rngs)
                                   for _ in range(cfg.vision_depth)])
    self.vision_post_ln = LayerNorm(vw, cfg.norm_eps)
    self.vision_proj = dense(vw, cfg.embed_dim, ("vision_embed", None), bias=False, **kw)

    self.token_embed = param(INIT_STD * jax.random.normal(rngs.params(), (cfg.vocab_size, tw)), "vocab", "embed")
    self.text_pos = param(INIT_STD * jax.random.normal(rngs.params(), (cfg.max_text_len, tw)), None, "embed")
    self.text_blocks = nnx.List([Block(tw, cfg.text_heads, cfg.text_mlp, cfg, taxes, rngs=rngs)
                                 for _ in range(cfg.text_depth)])
    self.text_post_ln = LayerNorm(tw, cfg.norm_eps)
    self.text_proj = dense(tw, cfg.embed_dim, ("embed", None), bias=False, **kw)
    self.logit_scale = param(jnp.asarray(math.log(1 / 0.07), jnp.float32))

  def encode_image(self, pixel_values: jax.Array) -> jax.Array:
    """[B, P, patch_dim] -> [B, embed_dim] L2-normalised."""
    b, p, _ = pixel_values.shape
    if p > self.config.max_patches:
      raise ValueError(f"CLIPModel: {p} patches per image exceed CLIPConfig.max_patches={self.config.max_patches}.")
    x = self.patch_embed(pixel_values.astype(jnp.float32))
    cls = jnp.broadcast_to(self.class_embed[...], (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.vision_pos[:p + 1][None]
    x = constrain(self.vision_pre_ln(x), "batch", "seq", None)
    for block in self.vision_blocks:
      x = block(x, None)
    return l2_normalize(self.vision_proj(self.vision_post_ln(x[:, 0])))

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, T] ids and 0/1 mask (left or right padding) -> [B, embed_dim] L2-normalised."""
    b, t = input_ids.shape
    if t > self.config.max_text_len:
      raise ValueError(f"CLIPModel: text length {t} exceeds CLIPConfig.max_text_len={self.config.max_text_len}.")
    mask = attention_mask.astype(jnp.int32)
    # Positions count real tokens only, so left padding does not shift them.
    pos = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0)
    x = jnp.take(self.token_embed[...], input_ids, axis=0) + jnp.take(self.text_pos[...], pos, axis=0)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (mask > 0)[:, None, :]
    x = constrain(x, "batch", "seq", None)
    for block in self.text_blocks:
      x = block(x, allowed)
    last = x[jnp.arange(b), last_token_index(mask)]
    return l2_normalize(self.text_proj(self.text_post_ln(last)))

  def __call__(self, pixel_values, input_ids, attention_mask) -> tuple[jax.Array, jax.Array]:
    """(image embeddings [B, D], text embeddings [B, D])."""
    return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

  def embed_listing(self, pixel_values, input_ids, attention_mask) -> jax.Array:
    """One embedding per listing (image + title): the normalised sum of both towers, [B, D]."""
    img, txt = self(pixel_values, input_ids, attention_mask)
    return l2_normalize(img + txt)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropy with targets on the diagonal.

  image_emb, text_emb: [B, D] unit-norm; logit_scale: scalar log temperature (clipped at log 100).
  """
  scale = jnp.exp(jnp.minimum(logit_scale, math.log(100.0)))
  logits = scale * image_emb @ text_emb.T
  labels = jnp.arange(logits.shape[0])
  ce = lambda z: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), labels[:, None], axis=-1))
  return 0.5 * (ce(logits) + ce(logits.T))
