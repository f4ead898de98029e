"""grain pipelines: shapes and contents, exact resume, per-process sharding, family batches, eval coverage."""
import collections

import grain
import numpy as np
import pytest

from afmrl_jax.attributes import CorpusStats
from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import image_patches, pipeline, prompts, tokenizer
from afmrl_jax.data.table import ListingTable

CFG = catalog_lib.CatalogConfig(seed=5, families_per_category=4, listings_per_product=3, num_workers=0)
PCFG = pipeline.PipelineConfig(batch_size=8, eval_batch_size=8, max_text_len=48, max_terms=16, text_attributes="teacher",
                               num_threads=1)
ONE = grain.sharding.NoSharding()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cat = catalog_lib.generate_catalog(CFG)
  tok = tokenizer.default_tokenizer(cat.texts(), str(tmp_path_factory.mktemp("tok")), vocab_size=512)
  stats = CorpusStats.from_texts([l.teacher_attributes for l in cat.split("train")])
  return cat, tok, stats, ListingTable.from_catalog(cat, "train")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contents(env):
  cat, tok, stats, table = env
  b = next(iter(pipeline.train_dataset(table, tok, stats, PCFG, shard_options=ONE)))
  p = int(np.prod(pipeline.image_grid_thw(PCFG)))
  assert b["query_pixel_values"].shape == (8, p, 1176) and b["query_pixel_values"].dtype == np.float32
  assert b["query_input_ids"].shape == (8, 48) and b["query_terms"].shape == (8, 16)
  by_id = {l.listing_id: l for l in cat.listings}
  ids = tokenizer.special_ids(tok)
  for i in range(8):
    q, c = by_id[int(b["listing_id"][i])], by_id[int(b["candidate_listing_id"][i])]
    assert q.split == "train" and q.listing_id != c.listing_id and q.product_id == c.product_id
    assert b["product_id"][i] == q.product_id and b["true_product_id"][i] == q.true_product_id
    np.testing.assert_allclose(b["query_pixel_values"][i], image_patches.patchify(q.image), atol=0)
    np.testing.assert_allclose(b["candidate_pixel_values"][i], image_patches.patchify(c.image), atol=0)
    np.testing.assert_array_equal(b["query_terms"][i], stats.encode(q.teacher_attributes, 16))
    np.testing.assert_array_equal(b["candidate_terms"][i], stats.encode(c.teacher_attributes, 16))
    mask, toks = b["query_attention_mask"][i], b["query_input_ids"][i]
    n = int(mask.sum())
    assert mask[-n:].all() and not mask[:-n].any()  # left padding
    assert (toks[:-n] == ids["pad"]).all() and toks[-1] == ids["eos"]
    assert (toks == ids["image_pad"]).sum() == p // 4  # image tokens never truncated
    text = tok.decode(toks[-n:])
    assert text.startswith(prompts.QUERY_INSTRUCTION.strip())
    assert q.title[:10] in text


def test_prompt_truncates_text_not_image_tokens(env):
  _, tok, _, _ = env
  builder = prompts.PromptBuilder(tok, num_image_tokens=9, max_length=20)
  ids, mask = builder.build("Find: ", "a very long title " * 20)
  special = tokenizer.special_ids(tok)
  assert mask.all() and (ids == special["image_pad"]).sum() == 9 and ids[-1] == special["eos"]
  with pytest.raises(ValueError, match="max_length"):
    prompts.PromptBuilder(tok, num_image_tokens=30, max_length=20)
  text = "Scarlet V-neck dress, ünï 🙂 <|image_pad|>"  # the thread-safe encoder agrees with the HF call
  assert tokenizer.ThreadSafeEncoder(tok).encode(text) == tok(text, add_special_tokens=False)["input_ids"]


def test_iterator_state_restores_exactly(env):
  _, tok, stats, table = env
  ds = pipeline.train_dataset(table, tok, stats, PCFG, shard_options=ONE)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  want = _take(it, 4)
  fresh = iter(pipeline.train_dataset(table, tok, stats, PCFG, shard_options=ONE))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), want)


def test_epochs_shuffle_differently_and_cover_the_split(env):
  _, tok, stats, table = env
  cfg = pipeline.PipelineConfig(**{**PCFG.__dict__, "batch_size": 4})
  steps = pipeline.steps_per_epoch(table, cfg)
  it = iter(pipeline.train_dataset(table, tok, stats, cfg, shard_options=ONE))
  e0 = np.concatenate([b["listing_id"] for b in _take(it, steps)])
  e1 = np.concatenate([b["listing_id"] for b in _take(it, steps)])
  n = steps * 4
  assert len(set(e0)) == n and set(e0) <= set(table.listing_id.tolist())
  assert not np.array_equal(e0, e1)
  assert len(table) - n < 4  # only the remainder of the last global batch is dropped


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_cover_global_batches_exactly_once(env, count):
  _, tok, stats, table = env
  steps = 5
  single = _take(iter(pipeline.train_dataset(table, tok, stats, PCFG, shard_options=ONE)), steps)
  shards = [_take(iter(pipeline.train_dataset(table, tok, stats, PCFG,
                                              shard_options=grain.sharding.ShardOptions(i, count))), steps)
            for i in range(count)]
  for s in range(steps):
    merged = {k: np.concatenate([sh[s][k] for sh in shards]) for k in single[s]}
    _assert_batches_equal([merged], [single[s]])
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_dataset(table, tok, stats, PCFG, shard_options=grain.sharding.ShardOptions(0, 3))


def test_family_mixed_batches_hold_whole_families(env):
  cat, tok, stats, table = env
  cfg = pipeline.PipelineConfig(**{**PCFG.__dict__, "batch_size": 16, "batching": "family_mixed",
                                   "family_share": 0.5})
  family_products = collections.defaultdict(set)
  for l in cat.split("train"):
    family_products[l.family_id].add(l.product_id)
  for b in _take(iter(pipeline.train_dataset(table, tok, stats, cfg, shard_options=ONE)), 4):
    head_f, head_p = b["family_id"][:8], b["product_id"][:8]
    seen = collections.defaultdict(set)
    for f, p in zip(head_f, head_p):
      seen[int(f)].add(int(p))
    complete = [f for f in seen if seen[f] == family_products[f]]
    assert sum(len(family_products[f]) for f in complete) >= 5  # most of the family slots are whole families
    assert len(complete) >= 1


def test_image_text_pairs_and_fresh_views(env):
  cat, tok, stats, table = env
  cfg = pipeline.PipelineConfig(**{**PCFG.__dict__, "pair_mode": "image_text", "fresh_views": True})
  it = iter(pipeline.train_dataset(table, tok, stats, cfg, shard_options=ONE, fresh_view_config=CFG))
  b = next(it)
  ids = tokenizer.special_ids(tok)
  assert (b["candidate_listing_id"] == b["listing_id"]).all() and (b["candidate_has_image"] == 0).all()
  assert not (b["candidate_input_ids"] == ids["image_pad"]).any() and not b["candidate_pixel_values"].any()
  by_id = {l.listing_id: l for l in cat.listings}
  q = by_id[int(b["listing_id"][0])]
  assert not np.allclose(b["query_pixel_values"][0], image_patches.patchify(q.image))  # a new view
  # fresh views are a function of (seed, epoch, position): a restarted pipeline renders the same ones
  again = next(iter(pipeline.train_dataset(table, tok, stats, cfg, shard_options=ONE, fresh_view_config=CFG)))
  np.testing.assert_array_equal(again["query_pixel_values"], b["query_pixel_values"])


def test_eval_covers_split_once_across_processes(env):
  cat, tok, stats, _ = env
  table = ListingTable.from_catalog(cat, "gallery")
  seen = []
  for i in range(2):
    for b in pipeline.eval_dataset(table, tok, stats, PCFG, side="candidate",
                                   shard_options=grain.sharding.ShardOptions(i, 2)):
      seen += b["listing_id"][b["valid"] == 1].tolist()
  assert sorted(seen) == sorted(l.listing_id for l in cat.split("gallery"))


def test_attribute_override_reaches_the_prompt(env):
  cat, tok, stats, _ = env
  table = ListingTable.from_catalog(cat, "query")
  lid = int(table.listing_id[0])
  cfg = pipeline.PipelineConfig(**{**PCFG.__dict__, "max_text_len": 128})
  b = next(iter(pipeline.eval_dataset(table, tok, stats, cfg, shard_options=ONE,
                                      attributes_by_listing={lid: "colour: zebra"},
                                      terms_by_listing={lid: "colour: red"})))
  assert "attributes: colour: zebra" in tok.decode(b["input_ids"][0])
  np.testing.assert_array_equal(b["terms"][0], stats.encode("colour: red", cfg.max_terms))
  assert b["terms"][0][0] != 0


@pytest.mark.slow  # starts two worker processes (~10 s)
def test_worker_processes_give_the_same_batches_and_state(env):
  _, tok, stats, table = env
  ref = _take(iter(pipeline.train_dataset(table, tok, stats, PCFG, shard_options=ONE)), 4)
  cfg = pipeline.PipelineConfig(**{**PCFG.__dict__, "worker_processes": 2})
  it = iter(pipeline.train_dataset(table, tok, stats, cfg, shard_options=ONE))
  _assert_batches_equal(_take(it, 2), ref[:2])
  state = it.get_state()
  it2 = iter(pipeline.train_dataset(table, tok, stats, cfg, shard_options=ONE))
  it2.set_state(state)
  _assert_batches_equal(_take(it2, 2), ref[2:])
  it.close()
  it2.close()
