"""SFT of the generator: the loss is masked next-token cross-entropy on the answer; resume is bitwise."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.sft as sft_configs
from afmrl_jax.config import sections
from afmrl_jax.models.config import VLConfig
from afmrl_jax.models.vl_model import VLModel
from afmrl_jax.train import checkpointing
from afmrl_jax.stages.sft import run as sft, objective as sft_step
from afmrl_jax.config import schema
from tests.small_runs import small

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
  return small(sft_configs.get_config("ci"), tmp_path / "cache", steps, **overrides)


def test_stop_and_resume_is_bitwise(tmp_path):
  full, *_ = sft.train(schema.parse(_config(tmp_path, 6)), str(tmp_path / "full"))
  first, *_ = sft.train(schema.parse(_config(tmp_path, 6, **{"train.stop_after_steps": 3})), str(tmp_path / "split"))
  assert first.stopped_early and first.step == 3
  second, *_ = sft.train(schema.parse(_config(tmp_path, 6)), str(tmp_path / "split"))
  assert second.step == 6 and min(second.losses) == 4
  for s in range(1, 7):
    assert (first.losses if s <= 3 else second.losses)[s] == full.losses[s], s
  for a, b in ((second.state["params"], full.state["params"]), (second.state["opt_state"], full.state["opt_state"])):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


COLOURS = ("red", "blue", "green", "black", "white", "yellow")
NOISE = ("new", "sale", "classic", "soft", "cotton", "summer", "slim", "basic", "premium", "casual")


def _toy_table(rows, seed):
  """Listings whose answer is the colour named in the title ('colour: blue'); blank images."""
  from afmrl_jax.data.table import ListingTable
  rng = np.random.default_rng(seed)
  metas = []
  for i in range(rows):
    colour = COLOURS[i % len(COLOURS)]
    words = list(rng.choice(NOISE, 3, replace=False)) + [colour]
    rng.shuffle(words)
    metas.append(dict(listing_id=i, product_id=i, true_product_id=i, family_id=i, category="toy",
                      title=" ".join(words) + " top", teacher_attributes=f"colour: {colour}",
                      product_attributes=f"colour: {colour}"))
  blank = np.zeros((56, 56, 3), np.uint8)
  return ListingTable(metas, lambda i: blank, categories=("toy",), name=f"toy{seed}")


# Training steps of the toy task. At 600 the run has not converged for every seed (exact match 0.60-1.00
# over model/data seeds 0-2, and the float32 rounding of a changed-but-equivalent model moves a seed
# across 0.9); at 1200 every seed tried reaches 1.00 with a loss below 1e-4.
STEPS = 1200


@pytest.mark.slow  # 90 s of training; the masked loss and bitwise resume stay in the default suite
def test_sft_learns_to_copy_the_title_colour(tmp_path):
  """A toy task: after SFT, greedy generations on rows never trained on name the title's colour."""
  from afmrl_jax import parallel
  from afmrl_jax.data import generator_data, tokenizer as tokenizer_lib
  from afmrl_jax.generate.filters import SamplingConfig
  from afmrl_jax.eval import attributes as attribute_eval
  from afmrl_jax.train import loop as loop_lib, state as state_lib
  train_table, heldout = _toy_table(192, 0), _toy_table(48, 1)
  texts = list(train_table.title) + list(train_table.teacher_attributes) + [generator_data.instruction("toy")] * 50
  tok = tokenizer_lib.default_tokenizer(texts, str(tmp_path / "tok"))
  cfg = generator_data.GeneratorDataConfig(batch_size=16, eval_batch_size=16, image_size=56, max_prompt_len=48,
                                           max_answer_len=8, num_threads=1)
  arch = sft_configs.get_config("tiny").model.arch.to_dict()
  ids = tokenizer_lib.special_ids(tok)
  arch.update(vocab_size=len(tok), image_token_id=ids["image_pad"], vision_start_token_id=ids["vision_start"],
              vision_end_token_id=ids["vision_end"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
  vl = VLConfig.from_hf_dict(arch)
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  model = state_lib.create_sharded(lambda: VLModel(vl, rngs=nnx.Rngs(0)), mesh, nnx.Param)
  opt = sections.OptimizerConfig(learning_rate=3e-3, warmup_steps=10)
  tx = state_lib.make_optimizer(opt, STEPS)
  grid = generator_data.image_grid_thw(cfg)
  step_fn = loop_lib.make_train_step(model.graphdef, tx, loss_fn=sft_step.make_loss_fn(grid))
  data = iter(generator_data.sft_dataset(train_table, tok, cfg, shard_options=grain.sharding.NoSharding()))
  result = loop_lib.resume_and_run(step_fn, model, tx, data, mesh=mesh,
                                   options=sections.TrainOptions(num_steps=STEPS, log_every=100),
                                   checkpoint=sections.CheckpointOptions(enabled=False),
                                   workdir=str(tmp_path), examples_per_step=16)
  model.params = result.state["params"]
  sampling = SamplingConfig(temperature=0.0, max_new_tokens=8, eos_ids=(ids["eos"],), pad_id=ids["pad"])
  batches = generator_data.prompt_batches(heldout, tok, cfg, with_answers=False,
                                          shard_options=grain.sharding.NoSharding())
  generated, cut, _ = attribute_eval.generate_strings(model.merge(), tok, batches, grid, mesh, sampling)
  predicted = [generated[int(i)] for i in heldout.listing_id]
  exact = np.mean([p == t for p, t in zip(predicted, heldout.teacher_attributes)])
  assert exact >= 0.9, (exact, predicted[:6], [result.losses[s] for s in (1, 400, 800, STEPS)])
  assert not cut
