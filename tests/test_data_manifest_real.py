"""Manifests as real catalogs have them: string SKU / UUID ids, the catalog's own categories and attribute
keys, Parquet as well as JSONL, the `family` alias, unknown fields, and stage 1 training on such a manifest."""
import json
import math
import os
import uuid

import numpy as np
import pytest
from PIL import Image

from afmrl_jax.data import generator_data, manifest, schema, tfds_builder
from afmrl_jax.data.table import ListingTable

SNEAKER_ATTRS = "Upper: mesh; sole colour: white; closure: laces"
HANDBAG_ATTRS = {"strap": "crossbody", "hardware": "gold"}


def _image(directory, rel, colour, fmt):
  path = os.path.join(directory, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (24, 18), colour).save(path, fmt)  # not square: padded when loaded
  return rel


def _rows(directory, products_per_category=2, listings_per_product=2):
  """Rows of a real-looking catalog: SKU listing ids, UUID product ids, nested image folders (PNG and JPEG)."""
  rows = []
  for c, category in enumerate(("sneaker", "handbag")):
    for p in range(products_per_category):
      pid = str(uuid.UUID(int=1000 * c + p + 1))
      for j in range(listings_per_product):
        n = len(rows)
        fmt, ext = ("PNG", "png") if n % 2 else ("JPEG", "jpg")
        colour = (40 + 90 * c, 30 * p % 255, 60 * j)
        rows.append({
            "listing_id": f"SKU-{n:05d}", "product_id": pid, "category": category,
            "title": f"{category} {p} photo {j}",
            "image": _image(directory, f"images/{category}/{pid[-4:]}/{j}.{ext}", colour, fmt),
            "attributes": SNEAKER_ATTRS if category == "sneaker" else HANDBAG_ATTRS,
            "teacher_attributes": ("upper: mesh; Toe Cap: rubber" if category == "sneaker"
                                   else "strap: crossbody; lining: suede")})
  return rows


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _write_parquet(path, rows, attributes_as_map=False):
  """`rows` as a Parquet table (a column per field, null where a row lacks it). An object value becomes a
  `key: value; ...` string (a column has one type), or with `attributes_as_map` a Parquet map column."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  def cell(v):
    if isinstance(v, dict):
      return list(v.items()) if attributes_as_map else "; ".join(f"{k}: {x}" for k, x in v.items())
    return v

  cols = list(dict.fromkeys(k for r in rows for k in r))
  pq.write_table(pa.table({
      k: pa.array([cell(r.get(k)) for r in rows],
                  type=pa.map_(pa.string(), pa.string()) if attributes_as_map and k == "attributes" else None)
      for k in cols}), str(path))
  return str(path)


def test_string_sku_and_uuid_ids_map_to_dense_ints_and_group_products(tmp_path):
  rows = _rows(tmp_path, products_per_category=3, listings_per_product=3)
  path = _write_jsonl(tmp_path / "m.jsonl", rows)
  cat = manifest.catalog_from_manifest(path, 32, eval_share=0.0)  # no split given: all train at share 0
  # Strings get ints in order of first appearance; the user's listing id stays on every listing.
  assert [l.listing_id for l in cat.listings] == list(range(18))
  assert [l.listing_key for l in cat.listings] == [r["listing_id"] for r in rows]
  uuids = list(dict.fromkeys(r["product_id"] for r in rows))
  assert cat.report.ids["product"] == {u: i for i, u in enumerate(uuids)}
  assert [l.product_id for l in cat.listings] == [uuids.index(r["product_id"]) for r in rows]
  for l, r in zip(cat.listings, rows):  # no true_product_id / family: both default to the product
    assert l.true_product_id == l.product_id and l.family_id == l.product_id
    assert l.image.shape == (32, 32, 3)
  assert sorted(cat.products) == list(range(6))
  assert not any(p.is_duplicate for p in cat.products.values())
  table = ListingTable.from_catalog(cat, "train")
  assert {int(p): list(rows_) for p, rows_ in table.rows_by_product().items()} == {
      p: [3 * p, 3 * p + 1, 3 * p + 2] for p in range(6)}


def test_int_ids_keep_their_values_and_strings_go_above_them(tmp_path):
  rows = _rows(tmp_path, products_per_category=2, listings_per_product=2)
  rows[0]["listing_id"], rows[1]["listing_id"], rows[2]["listing_id"], rows[3]["listing_id"] = 10, "A-1", 3, "A-2"
  rows[0]["product_id"] = rows[1]["product_id"] = 7
  rows[2]["true_product_id"] = 7  # a relisted duplicate of product 7 under a string product id
  cat = manifest.catalog_from_manifest(_write_jsonl(tmp_path / "m.jsonl", rows), 32)
  assert [l.listing_id for l in cat.listings][:4] == [10, 11, 3, 12]
  assert [l.listing_key for l in cat.listings][:4] == ["10", "A-1", "3", "A-2"]
  # product space: 7 is itself; strings from 8 on in order of first appearance (product, then true product)
  assert [l.product_id for l in cat.listings][:4] == [7, 7, 8, 8]
  assert cat.listings[2].true_product_id == 7 and cat.products[8].is_duplicate


@pytest.mark.parametrize("value", [3.0, True, ""])
def test_ids_must_be_int_or_non_empty_string(tmp_path, value):
  rows = _rows(tmp_path)[:2]
  rows[1]["product_id"] = value
  path = _write_jsonl(tmp_path / "m.jsonl", rows)
  with pytest.raises(manifest.ManifestError,
                     match=f"row 2: field 'product_id' must be an integer or a non-empty string, got {value!r}$"):
    manifest.read_manifest(path)


def test_user_categories_come_from_the_data_with_their_keys(tmp_path):
  rows = _rows(tmp_path)
  path = _write_jsonl(tmp_path / "m.jsonl", rows)
  report = manifest.read_manifest(path)
  assert report.categories == ("handbag", "sneaker")
  assert report.category_keys == {"sneaker": ("upper", "sole colour", "closure", "toe cap"),
                                  "handbag": ("strap", "hardware", "lining")}
  assert report.rows[0].attributes == SNEAKER_ATTRS
  assert report.rows[-1].attributes == "strap: crossbody; hardware: gold"
  # The generator's instruction names the derived keys; the synthetic categories keep the schema's.
  assert generator_data.instruction("sneaker") == "sneaker attributes (upper, sole colour, closure, toe cap):"
  assert generator_data.instruction("tops") == ("tops attributes (colour, pattern, sleeve, neckline, material, "
                                                "logo colour, logo position):")
  cat = manifest.catalog_from_manifest(path, 32)
  table = ListingTable.from_catalog(cat, "train")
  ids = dict(zip(table.category, table.category_id.tolist()))
  assert len(set(ids.values())) == 2 and min(ids.values()) >= len(schema.CATEGORIES)
  assert schema.category_id("tops") == 0
  # An explicit list still refuses the others, naming the row.
  with pytest.raises(manifest.ManifestError, match=r"row 5: field 'category': unknown category 'handbag'"):
    manifest.read_manifest(path, categories=("sneaker",))
  assert manifest.read_manifest(path, categories=("sneaker", "handbag")).categories == ("sneaker", "handbag")


def test_parquet_manifest_gives_the_same_catalog_as_jsonl(tmp_path):
  rows = _rows(tmp_path)
  rows[1]["family"] = "fam-1"
  rows[2]["split"] = "query"
  jsonl = _write_jsonl(tmp_path / "m.jsonl", rows)
  parquet = _write_parquet(tmp_path / "m.parquet", rows)
  a, b = manifest.catalog_from_manifest(jsonl, 32), manifest.catalog_from_manifest(parquet, 32)
  assert len(a) == len(b) == len(rows)
  assert b.digest() == a.digest()
  assert [dataclasses_row(r) for r in b.report.rows] == [dataclasses_row(r) for r in a.report.rows]
  assert b.report.category_keys == a.report.category_keys and b.report.ids == a.report.ids
  # Rows are numbered from 1 in Parquet too.
  bad = [dict(r) for r in rows]
  bad[2]["title"] = None
  with pytest.raises(manifest.ManifestError, match=r"m_bad.parquet, row 3: missing required field 'title'"):
    manifest.read_manifest(_write_parquet(tmp_path / "m_bad.parquet", bad))
  # The tfds builder builds from the Parquet file; records carry the user's listing id.
  builder = tfds_builder.build_catalog_dataset(
      str(tmp_path / "tfds"), tfds_builder.CatalogBuilderConfig(name="pq", manifest=parquet, image_size=32))
  src = builder.as_data_source()
  got = [tfds_builder.decode_record(src["train"][i]) for i in range(len(src["train"]))]
  want = a.split("train")
  assert [(g["listing_id"], g["product_id"], g["listing_key"], g["category"]) for g in got] == [
      (l.listing_id, l.product_id, l.listing_key, l.category) for l in want]
  assert np.array_equal(got[0]["image"], want[0].image)
  # A Parquet map column of attributes reads as the `key: value; ...` string.
  handbags = [dict(r, attributes={"strap": "tote", "hardware": "silver"}) for r in rows]
  report = manifest.read_manifest(_write_parquet(tmp_path / "map.parquet", handbags, attributes_as_map=True))
  assert {r.attributes for r in report.rows} == {"strap: tote; hardware: silver"}


def dataclasses_row(r):
  d = dict(vars(r))
  d.pop("row")
  return d


def test_family_is_an_alias_of_family_id(tmp_path):
  rows = _rows(tmp_path)
  for r in rows[:4]:  # both sneaker products: one family
    r["family"] = "runner-family"
  rows[4]["family_id"] = 5
  cat = manifest.catalog_from_manifest(_write_jsonl(tmp_path / "m.jsonl", rows), 32)
  fam = [l.family_id for l in cat.listings]
  # int family 5 is itself; strings from 6 on: 'runner-family', then the other rows' default (their product)
  assert fam[:4] == [6] * 4 and fam[5:] == [7, 8, 8]
  assert fam[4] == 5 and cat.report.unknown_fields == ()
  rows[0]["family_id"] = "other"
  with pytest.raises(manifest.ManifestError,
                     match=r"row 1: field 'family' \(an alias of 'family_id'\) is 'runner-family' but 'family_id'"):
    manifest.read_manifest(_write_jsonl(tmp_path / "m2.jsonl", rows))


def test_unknown_fields_warn_once_and_stay_on_the_row(tmp_path):
  rows = _rows(tmp_path)
  for i, r in enumerate(rows):
    r["price"] = 10 + i
  rows[2]["brand_url"] = "https://example.com/x"
  path = _write_jsonl(tmp_path / "m.jsonl", rows)
  with pytest.warns(manifest.ManifestWarning) as record:
    report = manifest.read_manifest(path)
  assert len(record) == 1
  assert str(record[0].message) == (f"{path}: unknown field(s) 'price', 'brand_url' (first in row 1) are not "
                                    "used; each row keeps them in ManifestRow.extra")
  assert report.unknown_fields == ("price", "brand_url")
  assert report.rows[0].extra == {"price": 10}
  assert report.rows[2].extra == {"price": 12, "brand_url": "https://example.com/x"}


def test_duplicate_string_listing_id_names_both_rows(tmp_path):
  rows = _rows(tmp_path)
  rows[3]["listing_id"] = rows[1]["listing_id"]
  path = _write_jsonl(tmp_path / "m.jsonl", rows)
  with pytest.raises(manifest.ManifestError) as e:
    manifest.read_manifest(path)
  assert str(e.value) == f"{path}, row 4: field 'listing_id': 'SKU-00001' already used in row 2"
  report = manifest.read_manifest(path, skip_bad_rows=True)
  assert [r for r, _ in report.skipped] == [4] and len(report.rows) == len(rows) - 1


def test_ids_that_differ_only_in_type_are_one_id_or_refused(tmp_path):
  """Outputs write ids as text, so listing 5 and listing "5" are the same listing; product 7 and "7"
  would be two products under one name: refused."""
  rows = _rows(tmp_path)
  rows[0]["listing_id"], rows[2]["listing_id"] = 5, "5"
  path = _write_jsonl(tmp_path / "m.jsonl", rows)
  with pytest.raises(manifest.ManifestError) as e:
    manifest.read_manifest(path)
  assert str(e.value) == f"{path}, row 3: field 'listing_id': '5' already used in row 1"
  rows = _rows(tmp_path)
  rows[0]["product_id"], rows[1]["product_id"] = 7, "7"
  path = _write_jsonl(tmp_path / "m.jsonl", rows)
  with pytest.raises(manifest.ManifestError) as e:
    manifest.read_manifest(path)
  assert str(e.value) == (f"{path}: product id 7 and '7' differ only in type; write each product id one way "
                          "(all numbers or all strings)")


def test_stage1_ci_trains_on_a_string_id_user_category_manifest(tmp_path):
  import configs.stage1 as stage1_configs
  from afmrl_jax.config import schema
  from afmrl_jax.stages.stage1 import run as stage1
  from tests.small_runs import small
  rows = _rows(tmp_path / "data", products_per_category=8, listings_per_product=2)
  path = _write_jsonl(tmp_path / "data" / "manifest.jsonl", rows)
  config = small(stage1_configs.get_config("ci"), tmp_path / "cache", 2, **{"catalog.manifest": path})
  result, *_ = stage1.train(schema.parse(config), str(tmp_path / "work"))
  assert result.step == 2 and sorted(result.losses) == [1, 2]
  assert all(math.isfinite(v) for v in result.losses.values())


def _split_rows(num_products=40, listings=3, families=None):
  from afmrl_jax.data import manifest as m
  rows = []
  for p in range(num_products):
    for k in range(listings if p % 5 else 1):  # every fifth product has a single listing
      rows.append(m.ManifestRow(row=len(rows) + 1, listing_id=len(rows), product_id=p, true_product_id=p,
                                family_id=p // 2 if families else p, category="c", title="t", image_path="x",
                                attributes="", teacher_attributes="", split=None, listing_key=str(len(rows))))
  return rows


def test_splits_are_assigned_per_family_when_the_manifest_gives_none():
  from afmrl_jax.data import manifest as m
  rows = _split_rows(families=True)
  out = m.assign_splits(rows, seed=3, eval_share=0.25)
  by_family: dict = {}
  for r in out:
    by_family.setdefault(r.family_id, set()).add(r.split == "train")
  assert all(len(v) == 1 for v in by_family.values())  # a family is all train or all held out
  held = {f for f, v in by_family.items() if v == {False}}
  assert len(held) == round(0.25 * len(by_family))
  for p in {r.product_id for r in out if r.family_id in held}:
    members = [r.split for r in out if r.product_id == p]
    assert members.count("query") == (1 if len(members) > 1 else 0)
    assert members.count("gallery") == len(members) - members.count("query")
  assert {r.split for r in out if r.family_id not in held} == {"train"}
  assert m.assign_splits(rows, seed=3, eval_share=0.25) == out  # seeded
  assert m.assign_splits(rows, seed=4, eval_share=0.25) != out
  summary = m.split_summary(out)
  assert summary.startswith("train ") and "gallery" in summary and "query" in summary


def test_given_splits_are_kept_and_a_row_without_one_is_train():
  import dataclasses
  from afmrl_jax.data import manifest as m
  rows = _split_rows(num_products=4)
  rows[0] = dataclasses.replace(rows[0], split="query")
  out = m.assign_splits(rows)
  assert out[0].split == "query" and {r.split for r in out[1:]} == {"train"}


def test_requery_after_skipped_rows():
  """A held-out product whose query listing was skipped (a corrupt image) gets a new query from its gallery
  listings; one left with its query alone turns it into a gallery listing."""
  from afmrl_jax.data import catalog as catalog_lib
  from afmrl_jax.data import manifest as m
  blank = np.zeros((2, 2, 3), np.uint8)
  def listing(lid, product, split):
    return catalog_lib.Listing(listing_id=lid, product_id=product, true_product_id=product, family_id=product,
                               category="c", title="t", image=blank, teacher_attributes="", listing_attributes="",
                               product_attributes="", split=split)
  listings = [listing(5, 0, "gallery"), listing(3, 0, "gallery"),  # product 0 lost its query
              listing(7, 1, "query"),                                 # product 1 lost its gallery
              listing(8, 2, "query"), listing(9, 2, "gallery"),       # product 2 intact
              listing(1, 3, "train"), listing(2, 3, "train")]
  out = m.requery(listings)
  assert [(l.listing_id, l.split) for l in out] == [(5, "gallery"), (3, "query"), (7, "gallery"), (8, "query"),
                                                     (9, "gallery"), (1, "train"), (2, "train")]


def test_relisted_duplicates_are_held_out_together_and_pair_as_query_and_gallery():
  """One listing per `product_id`, duplicates sharing a `true_product_id` under other families: they stay
  on one side, and a held-out true product gives one query and one gallery listing."""
  from afmrl_jax.data import manifest as m
  rows = [m.ManifestRow(row=i + 1, listing_id=i, product_id=i, true_product_id=i // 2, family_id=i,
                        category="c", title="t", image_path="x", attributes="", teacher_attributes="", split=None,
                        listing_key=str(i)) for i in range(40)]
  out = m.assign_splits(rows, seed=0, eval_share=0.5)
  for true in range(20):
    a, b = out[2 * true].split, out[2 * true + 1].split
    assert (a == "train") == (b == "train"), (true, a, b)  # never one trained and its duplicate held out
    if a != "train":
      assert {a, b} == {"query", "gallery"}
  assert sum(r.split == "query" for r in out) == 10
