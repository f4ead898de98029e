"""SFT of the generator: the loss is masked next-token cross-entropy on the answer; resume is bitwise."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.sft as sft_configs
from afmrl_jax.models.config import VLConfig
from afmrl_jax.models.vl_model import VLModel
from afmrl_jax.train import sft, sft_step

GRID = (1, 4, 4)  # 56x56 images: 16 patches, 4 merged image tokens
B, TP, TA = 3, 12, 6


def _tiny_generator():
  arch = sft_configs.get_config("ci").model.arch.to_dict()
  arch.update(vocab_size=64, image_token_id=60, vision_start_token_id=61, vision_end_token_id=62)
  return VLModel(VLConfig.from_hf_dict(arch), rngs=nnx.Rngs(3))


def _toy_batch():
  """Left-padded prompts (instruction, image, title) and right-padded answers of lengths 6, 3, 1."""
  rng = np.random.default_rng(0)
  prompt = rng.integers(1, 59, size=(B, TP)).astype(np.int32)
  mask = np.ones((B, TP), np.int32)
  for b, pad in enumerate((0, 2, 4)):
    prompt[b, :pad], mask[b, :pad] = 0, 0
    prompt[b, pad + 1], prompt[b, pad + 2:pad + 6], prompt[b, pad + 6] = 61, 60, 62
  lengths = np.array([6, 3, 1], np.int32)
  answer = rng.integers(1, 59, size=(B, TA)).astype(np.int32)
  answer[np.arange(TA)[None] >= lengths[:, None]] = 0
  pixels = rng.standard_normal((B, 16, 1176)).astype(np.float32)
  return dict(prompt_ids=prompt, prompt_mask=mask, answer_ids=answer, answer_length=lengths, pixel_values=pixels)


def test_loss_is_answer_only_masked_cross_entropy():
  model, batch = _tiny_generator(), _toy_batch()
  loss, metrics = sft_step.make_loss_fn(GRID)(model, {k: jnp.asarray(v) for k, v in batch.items()})
  # Reference: one plain forward over [prompt | answer] with the answer padding masked out, then NumPy.
  ids = np.concatenate([batch["prompt_ids"], batch["answer_ids"]], 1)
  answer_mask = (np.arange(TA)[None] < batch["answer_length"][:, None]).astype(np.int32)
  mask = np.concatenate([batch["prompt_mask"], answer_mask], 1)
  hidden, _ = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(batch["pixel_values"]), GRID)
  logits = np.asarray(model.logits(hidden), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  total, count = 0.0, 0
  for b in range(B):
    for i in range(batch["answer_length"][b]):  # position TP - 1 + i predicts answer token i
      total -= logp[b, TP - 1 + i, batch["answer_ids"][b, i]]
      count += 1
  assert count == 10 and float(metrics["answer_tokens"]) == 10
  np.testing.assert_allclose(float(loss), total / count, rtol=2e-5)
  # Prompt and padding carry no loss: changing a padded answer slot or the prompt padding changes nothing.
  changed = dict(batch)
  changed["answer_ids"] = batch["answer_ids"].copy()
  changed["answer_ids"][2, 3] = 17
  changed["prompt_ids"] = batch["prompt_ids"].copy()
  changed["prompt_ids"][2, 0] = 33
  again, _ = sft_step.make_loss_fn(GRID)(model, {k: jnp.asarray(v) for k, v in changed.items()})
  assert float(again) == pytest.approx(float(loss), abs=1e-6)


def _config(tmp_path, steps, **overrides):
  config = sft_configs.get_config("ci")
  config.catalog.cache_dir = str(tmp_path / "cache")
  config.catalog.families_per_category = 4
  config.pipeline.fresh_views = False
  config.train.num_steps = steps
  config.train.eval_at_end = False
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_stop_and_resume_is_bitwise(tmp_path):
  full, *_ = sft.train(_config(tmp_path, 6), str(tmp_path / "full"))
  first, *_ = sft.train(_config(tmp_path, 6, **{"train.stop_after_steps": 3}), str(tmp_path / "split"))
  assert first.stopped_early and first.step == 3
  second, *_ = sft.train(_config(tmp_path, 6), str(tmp_path / "split"))
  assert second.step == 6 and min(second.losses) == 4
  for s in range(1, 7):
    assert (first.losses if s <= 3 else second.losses)[s] == full.losses[s], s
  for a, b in ((second.state["params"], full.state["params"]), (second.state["opt_state"], full.state["opt_state"])):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
