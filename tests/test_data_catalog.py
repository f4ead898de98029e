"""Synthetic catalog: determinism, sibling structure, duplicates, splits, titles/teacher noise, fresh views."""
import collections
import itertools

import numpy as np
import pytest

from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import schema

CFG = catalog_lib.CatalogConfig(seed=3, families_per_category=6, duplicate_share=0.3, num_workers=0)


@pytest.fixture(scope="module")
def cat():
  return catalog_lib.generate_catalog(CFG)


def test_same_seed_same_bytes_and_other_seed_differs(cat):
  again = catalog_lib.generate_catalog(CFG)
  assert again.digest() == cat.digest()
  assert all(np.array_equal(a.image, b.image) for a, b in zip(cat.listings, again.listings))
  other = catalog_lib.generate_catalog(catalog_lib.CatalogConfig(seed=4, families_per_category=6, num_workers=0))
  assert other.digest() != cat.digest()


def test_parallel_rendering_gives_the_same_bytes():
  cfg = catalog_lib.CatalogConfig(seed=1, families_per_category=12, listings_per_product=2, num_workers=0)
  serial = catalog_lib.generate_catalog(cfg)
  assert len({l.product_id for l in serial.listings}) >= 200  # enough tasks to use the process pool
  import dataclasses
  parallel = catalog_lib.generate_catalog(dataclasses.replace(cfg, num_workers=2))
  assert parallel.digest() == serial.digest()


def test_schema_sizes():
  for cat_name in ("tops", "dresses", "trousers", "bags", "shoes"):
    keys = schema.SCHEMA[cat_name]
    assert len(keys) >= 5
    assert all(3 <= len(v) <= 10 for v in keys.values())


def test_siblings_differ_in_exactly_one_attribute(cat):
  by_family = collections.defaultdict(dict)
  for p in cat.products.values():
    if not p.is_duplicate:
      by_family[p.family_id][p.product_id] = p.attributes
  pairs = 0
  for fam in by_family.values():
    assert len(fam) >= 2
    for a, b in itertools.combinations(fam.values(), 2):
      assert set(a) == set(b)
      assert sum(a[k] != b[k] for k in a) == 1
      pairs += 1
  assert pairs >= len(by_family)
  # Attribute sets are unique across the catalog (apart from duplicates): product = attribute set.
  keys = [(p.category, tuple(sorted(p.attributes.items()))) for p in cat.products.values() if not p.is_duplicate]
  assert len(keys) == len(set(keys))


def test_duplicates_share_attributes_and_identity_not_product_id(cat):
  dups = [p for p in cat.products.values() if p.is_duplicate]
  assert 0.15 < len(dups) / len(cat.products) < 0.35  # duplicate_share 0.3 of originals
  for d in dups:
    orig = cat.products[d.true_product_id]
    assert not orig.is_duplicate and orig.product_id != d.product_id
    assert orig.attributes == d.attributes and orig.family_id == d.family_id and orig.category == d.category
  by_pid = collections.defaultdict(list)
  for l in cat.listings:
    by_pid[l.product_id].append(l)
  for d in dups:
    dl, ol = by_pid[d.product_id], by_pid[d.true_product_id]
    assert {l.true_product_id for l in dl + ol} == {d.true_product_id}
    assert {l.product_attributes for l in dl} == {l.product_attributes for l in ol}
    assert {l.listing_id for l in dl}.isdisjoint({l.listing_id for l in ol})
    assert not np.array_equal(dl[0].image, ol[0].image)  # a new listing, not a copy


def test_splits_disjoint_by_family_and_eval_layout(cat):
  fams = {s: {l.family_id for l in cat.split(s)} for s in catalog_lib.SPLITS}
  assert all(fams[s] for s in catalog_lib.SPLITS)
  assert fams["train"].isdisjoint(fams["gallery"] | fams["query"] | fams["heldout"])
  assert fams["heldout"].isdisjoint(fams["gallery"] | fams["query"])
  gallery_true = collections.Counter(l.true_product_id for l in cat.split("gallery"))
  for q in cat.split("query"):  # every query product has its other listings in the gallery
    assert gallery_true[q.true_product_id] >= CFG.listings_per_product - 1
  assert len({l.product_id for l in cat.split("query")}) == len(cat.split("query"))


def test_heldout_combination_never_seen_outside_heldout(cat):
  for category in CFG.categories:
    combo = catalog_lib.heldout_combo(CFG.seed, category)
    for p in cat.products.values():
      if p.category != category:
        continue
      has = all(p.attributes[k] == v for k, v in combo)
      assert has == (p.split_group == "heldout"), (p, combo)


def test_titles_reveal_only_some_attributes_and_teacher_is_noisy():
  cfg = catalog_lib.CatalogConfig(seed=0, families_per_category=4, teacher_drop_rate=0.2, teacher_wrong_rate=0.1,
                                  num_workers=0, image_size=32)
  cat = catalog_lib.generate_catalog(cfg)
  total = dropped = wrong = 0
  for l in cat.listings:
    truth = schema.parse_pairs(l.product_attributes)
    teacher = schema.parse_pairs(l.teacher_attributes)
    total += len(truth)
    dropped += len(truth) - len(teacher)
    wrong += sum(teacher[k] != truth[k] for k in teacher)
    assert set(teacher) <= set(truth)
  assert 0.15 < dropped / total < 0.25
  assert 0.05 < wrong / (total - dropped) < 0.15
  # A title never names every attribute value of a 7-key product in most listings.
  full = sum(all(v in l.title for v in schema.parse_pairs(l.product_attributes).values()) for l in cat.listings)
  assert full < 0.1 * len(cat.listings)


def test_listings_of_one_product_all_differ(cat):
  by_pid = collections.defaultdict(list)
  for l in cat.listings:
    by_pid[l.product_id].append(l.image.astype(np.int16))
  for imgs in list(by_pid.values())[:30]:
    for a, b in itertools.combinations(imgs, 2):
      assert np.abs(a - b).mean() > 2.0


def test_fresh_views_are_deterministic_and_new(cat):
  p = next(iter(cat.products.values()))
  a = catalog_lib.render_view(p, 0, epoch=1, index=5)
  b = catalog_lib.render_view(p, 0, epoch=1, index=5)
  c = catalog_lib.render_view(p, 0, epoch=2, index=5)
  listing = next(l for l in cat.listings if l.product_id == p.product_id)
  d = catalog_lib.render_view(listing, 0, epoch=1, index=5)  # from a listing: same product, same view
  assert a.shape == (64, 64, 3) and a.dtype == np.uint8
  assert np.array_equal(a, b) and np.array_equal(a, d)
  assert np.abs(a.astype(int) - c.astype(int)).mean() > 2.0


def test_catalog_save_load_round_trip(cat, tmp_path):
  cat.save(str(tmp_path))
  loaded = catalog_lib.Catalog.load(str(tmp_path))
  assert loaded.digest() == cat.digest() and loaded.config.content_dict() == cat.config.content_dict()
  assert loaded.products[5].attributes == cat.products[5].attributes


def test_bad_config_is_named():
  with pytest.raises(ValueError, match="listings_per_product"):
    catalog_lib.generate_catalog(catalog_lib.CatalogConfig(listings_per_product=1))
  with pytest.raises(ValueError, match="unknown"):
    catalog_lib.generate_catalog(catalog_lib.CatalogConfig(categories=("hats",)))
