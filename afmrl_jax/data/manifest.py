"""On-disk catalogs: the manifest format (documented in docs/catalog.md), reader and writer.

A manifest is a JSONL file (one JSON object per line) or, for a path ending in `.parquet`, a Parquet
table (one row per listing, read with pyarrow in batches); both carry the same fields and go through the
same validation, rows numbered from 1 (the JSONL line, the Parquet row).

Required: `listing_id`, `product_id` (ids: an int or a non-empty string such as "SKU-00123" or a UUID;
not a bool or a float), `category` (a non-empty str), `title` (str), `image` (path, relative to the
manifest's folder or absolute). Optional: `attributes` (`key: value; ...` string, a {key: value} object
or a list of [key, value] pairs (Parquet map columns): ground truth), `teacher_attributes` (same forms),
`true_product_id` (id, evaluation only; default `product_id`), `family_id` (id; `family` is an alias;
default `product_id`), `split` (`train` | `gallery` | `query` | `heldout`). A null value is the same as a
missing field.

Splits: when no row gives a `split`, `assign_splits` chooses them, seeded (`split_seed`): a share
`eval_share` of the families (a family is `family_id`, by default the product, joined with every family
that shares a `true_product_id` with it: siblings and relisted duplicates stay on one side) is held out
for evaluation, and each of their true products gives one listing to `query` and the rest to `gallery`
(a true product with one listing goes to `gallery`, a distractor); every other listing is `train`. Held-out products are never trained on. When some rows give a split, a row
without one is `train`.

Ids: the rest of the package uses int ids, so ids are mapped to ints per id space (listings; products,
shared by `product_id` and `true_product_id`; families): an int id maps to itself (an all-int manifest keeps
exactly its ids), and each distinct string id gets a fresh int above the space's largest int id (from 0
when it has none), in order of first appearance in the manifest. Outputs write ids as text, so the int 5
and the string "5" are one listing id (a repeat, refused like any other) and, as product or family ids, are
refused (each id space must write an id one way). The user's listing id is kept as `listing_key` (str) on
every row and listing, and `ManifestReport.ids` holds each space's {user id: int id}.

Categories: taken from the data (the sorted set of `category` values) unless the caller passes
`categories=`, which then refuses any other category. A category's attribute keys (the generator's
instruction names them) are the synthetic schema's for the five synthetic categories, else the keys found
in that category's `attributes` and `teacher_attributes` strings, in order of first appearance; they are
in `ManifestReport.category_keys` and registered with `schema.register_categories` when a manifest is read.

Unknown fields are not an error: one `ManifestWarning` per manifest names them, and each row keeps their
values in `ManifestRow.extra` (they go no further: listings and the tfds records do not carry them).

Bad rows (unreadable JSON, a missing or mistyped field, a category outside an explicit `categories=`,
a repeated listing id, a missing or corrupt image) raise `ManifestError` naming the file, the row and the
field; with `skip_bad_rows=True` they are skipped and counted in the returned report instead.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from afmrl_jax.attributes.parse import parse_attributes
from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import schema
from afmrl_jax.errors import UserError

ID = "id"  # an int (not a bool) or a non-empty string
REQUIRED = {"listing_id": ID, "product_id": ID, "category": str, "title": str, "image": str}
OPTIONAL_ID = ("true_product_id", "family_id")
ALIASES = {"family": "family_id"}
KNOWN_FIELDS = frozenset(REQUIRED) | set(OPTIONAL_ID) | set(ALIASES) | {"attributes", "teacher_attributes", "split"}
MANIFEST_NAME = "manifest.jsonl"
PARQUET_SUFFIX = ".parquet"


class ManifestError(UserError, ValueError):
  """A bad manifest row: the message names the file, the row and the field."""

  hint = "fix the row, or set config.catalog.skip_bad_rows=True to skip and count bad rows"


class ManifestWarning(UserWarning):
  """Something in a manifest that is read anyway (unknown fields)."""


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  """One validated row. Ids are ints once `read_manifest` returns (the user's values in `parse_row`'s)."""
  row: int  # 1-based line (JSONL) or row (Parquet) number in the manifest
  listing_id: int
  product_id: int
  true_product_id: int
  family_id: int
  category: str
  title: str
  image_path: str  # absolute
  attributes: str
  teacher_attributes: str
  split: str | None  # None until `assign_splits` (no row of the manifest gave one) or read_manifest sets it
  listing_key: str = ""  # the user's listing id, as a string ("SKU-00123", "17")
  extra: dict = dataclasses.field(default_factory=dict)  # unknown fields of this row, as read


@dataclasses.dataclass
class ManifestReport:
  path: str
  rows: list[ManifestRow]
  skipped: list[tuple[int, str]]  # (row, reason)
  categories: tuple[str, ...] = ()  # the explicit `categories=`, else the sorted categories of the rows
  category_keys: dict = dataclasses.field(default_factory=dict)  # category -> tuple of attribute keys
  ids: dict = dataclasses.field(default_factory=dict)  # 'listing' | 'product' | 'family' -> {user id: int}
  unknown_fields: tuple[str, ...] = ()
  splits_assigned: bool = False  # no row gave a split: `assign_splits` chose them

  def summary(self) -> str:
    head = f"{self.path}: {len(self.rows)} rows read, {len(self.skipped)} skipped"
    return head + "".join(f"\n  row {r}: {why}" for r, why in self.skipped[:20]) + (
        f"\n  ... and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else "")


def _attr_string(value, where: str, field: str) -> str:
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  if isinstance(value, dict):
    items = value.items()
  elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
    items = value  # [[key, value], ...]; what pyarrow gives for a Parquet map column
  else:
    raise ManifestError(f"{where}: field {field!r} must be a `key: value; ...` string, an object or a list of "
                        f"[key, value] pairs, got {type(value).__name__}")
  return "; ".join(f"{k}: {v}" for k, v in items if v is not None)


def _check_id(v, where: str, field: str):
  if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip()):
    raise ManifestError(f"{where}: field {field!r} must be an integer or a non-empty string, got {v!r}")
  return v


def parse_row(obj, path: str, row: int, categories: Sequence[str] | None = None) -> ManifestRow:
  """Validates one decoded row; raises ManifestError naming file, row and field.

  Ids are returned as the user wrote them (int or str); `read_manifest` maps them to ints. `categories`
  None accepts any non-empty category.
  """
  where = f"{path}, row {row}"
  if not isinstance(obj, dict):
    raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  obj = {k: v for k, v in obj.items() if v is not None}  # null = missing (Parquet has a value per column)
  for alias, field in ALIASES.items():
    if alias in obj:
      if field in obj and obj[field] != obj[alias]:
        raise ManifestError(f"{where}: field {alias!r} (an alias of {field!r}) is {obj[alias]!r} but "
                            f"{field!r} is {obj[field]!r}; give one")
      obj[field] = obj.pop(alias)
  for field, typ in REQUIRED.items():
    if field not in obj:
      raise ManifestError(f"{where}: missing required field {field!r}")
    v = obj[field]
    if typ is ID:
      _check_id(v, where, field)
    elif not isinstance(v, str):
      raise ManifestError(f"{where}: field {field!r} must be a string, got {v!r}")
  for field in OPTIONAL_ID:
    if field in obj:
      _check_id(obj[field], where, field)
  category = obj["category"]
  if not category.strip():
    raise ManifestError(f"{where}: field 'category' must be a non-empty string")
  if categories is not None and category not in categories:
    raise ManifestError(f"{where}: field 'category': unknown category {category!r}; "
                        f"known: {', '.join(categories)}")
  split = obj.get("split")
  if split is not None and split not in catalog_lib.SPLITS:
    raise ManifestError(f"{where}: field 'split' must be one of {', '.join(catalog_lib.SPLITS)}, got {split!r}")
  image = obj["image"]
  image_path = image if os.path.isabs(image) else os.path.join(os.path.dirname(os.path.abspath(path)), image)
  return ManifestRow(
      row=row, listing_id=obj["listing_id"], product_id=obj["product_id"],
      true_product_id=obj.get("true_product_id", obj["product_id"]),
      family_id=obj.get("family_id", obj["product_id"]), category=category, title=obj["title"],
      image_path=image_path, attributes=_attr_string(obj.get("attributes"), where, "attributes"),
      teacher_attributes=_attr_string(obj.get("teacher_attributes"), where, "teacher_attributes"),
      split=split, listing_key=str(obj["listing_id"]),
      extra={k: v for k, v in obj.items() if k not in KNOWN_FIELDS})


def _decoded_rows(path: str) -> Iterator[tuple[int, object, str | None]]:
  """(row, decoded object, error message or None) for every non-empty row of a JSONL or Parquet file."""
  if path.endswith(PARQUET_SUFFIX):
    import pyarrow.parquet as pq
    try:
      batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
      raise ManifestError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    row = 0
    for batch in batches:
      for obj in batch.to_pylist():
        row += 1
        yield row, obj, None
    return
  with open(path, encoding="utf-8") as f:
    for row, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield row, json.loads(line), None
      except json.JSONDecodeError as e:
        yield row, None, f"{path}, row {row}: not valid JSON ({e.msg})"


def _id_map(values) -> dict:
  """user id -> int: ints map to themselves; strings, in order of first appearance, to fresh ints above the
  largest int id (from 0 when there is none)."""
  values = list(values)
  ints = [v for v in values if isinstance(v, int)]
  out = {v: v for v in ints}
  nxt = max(ints) + 1 if ints else 0
  for v in values:
    if v not in out:
      out[v] = nxt
      nxt += 1
  return out


def category_keys(rows: Sequence[ManifestRow], categories: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """category -> attribute keys: the synthetic schema's for its categories, else the keys of the category's
  `attributes` and `teacher_attributes` strings in order of first appearance."""
  found: dict[str, dict[str, None]] = {c: {} for c in categories}
  for r in rows:
    if r.category in schema.SCHEMA:
      continue
    keys = found.setdefault(r.category, {})
    for text in (r.attributes, r.teacher_attributes):
      for k, _ in parse_attributes(text).pairs:
        keys.setdefault(k, None)
  return {c: tuple(schema.SCHEMA[c]) if c in schema.SCHEMA else tuple(keys) for c, keys in found.items()}


def assign_splits(rows: list[ManifestRow], seed: int = 0, eval_share: float = 0.2) -> list[ManifestRow]:
  """`rows` with every `split` set: as given; `train` where some rows give one and this one does not; and
  when none does, the seeded rule of the module docstring. The unit held out is a family joined with every
  family that shares a true product with it (relisted duplicates under another `product_id` and family
  stay on the same side); within it each *true* product (evaluation's identity) gives one listing to
  `query` and the rest to `gallery`."""
  if any(r.split is not None for r in rows):
    return [r if r.split is not None else dataclasses.replace(r, split="train") for r in rows]
  parent: dict = {}

  def find(x):
    while parent.setdefault(x, x) != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for r in rows:  # union a family with its listings' true products
    a, b = find(("family", r.family_id)), find(("true", r.true_product_id))
    if a != b:
      parent[max(a, b)] = min(a, b)
  group = [find(("family", r.family_id)) for r in rows]
  units = sorted(set(group))
  rng = np.random.default_rng([seed, 0x5B117])
  picked = rng.permutation(len(units))[:int(round(eval_share * len(units)))]
  held = {units[i] for i in picked}
  by_true: dict[int, list[int]] = {}
  for i, r in enumerate(rows):
    if group[i] in held:
      by_true.setdefault(r.true_product_id, []).append(i)
  split = ["train"] * len(rows)
  for true_product in sorted(by_true):
    members = by_true[true_product]
    for i in members:
      split[i] = "gallery"
    if len(members) > 1:
      split[members[int(rng.integers(len(members)))]] = "query"
  return [dataclasses.replace(r, split=s) for r, s in zip(rows, split)]


def requery(listings: list[catalog_lib.Listing]) -> list[catalog_lib.Listing]:
  """After skipped rows, `assign_splits`' rule again for held-out products: one that lost its `query`
  listing but keeps two or more `gallery` listings gives the first (lowest id) to `query`; one left with
  only its `query` listing turns it into `gallery` (a query needs a listing of its product to find)."""
  by_product: dict[int, list[int]] = {}
  for i, l in enumerate(listings):
    if l.split in ("query", "gallery"):
      by_product.setdefault(l.true_product_id, []).append(i)
  out = list(listings)
  for members in by_product.values():
    if len(members) > 1 and not any(listings[i].split == "query" for i in members):
      first = min(members, key=lambda i: listings[i].listing_id)
      out[first] = dataclasses.replace(listings[first], split="query")
    elif len(members) == 1 and listings[members[0]].split == "query":
      out[members[0]] = dataclasses.replace(listings[members[0]], split="gallery")
  return out


def split_summary(rows) -> str:
  """One line: products and listings per split, e.g. `train 120 products / 480 listings; ...`."""
  parts = []
  for name in catalog_lib.SPLITS:
    members = [r for r in rows if r.split == name]
    if members:
      parts.append(f"{name} {len({r.product_id for r in members})} products / {len(members)} listings")
  return "; ".join(parts)


def read_manifest(path: str, *, categories: Sequence[str] | None = None, skip_bad_rows: bool = False,
                  check_images: bool = True, split_seed: int = 0, eval_share: float = 0.2) -> ManifestReport:
  """Reads and validates a JSONL or Parquet manifest (images: existence only; decoding happens in
  `load_image`). `categories` None takes them from the data; a sequence refuses any other category.
  Splits missing from every row are assigned with `split_seed` and `eval_share` (`assign_splits`)."""
  if not os.path.exists(path):
    raise ManifestError(f"manifest {path} does not exist")
  rows, skipped, seen = [], [], {}
  unknown: dict[str, int] = {}  # unknown field -> first row
  for row, obj, error in _decoded_rows(path):
    try:
      if error:
        raise ManifestError(error)
      if isinstance(obj, dict):
        for k in obj:
          if k not in KNOWN_FIELDS:
            unknown.setdefault(k, row)
      r = parse_row(obj, path, row, categories)
      if check_images and not os.path.isfile(r.image_path):
        raise ManifestError(f"{path}, row {row}: field 'image': file {r.image_path} does not exist")
      if r.listing_key in seen:  # 5 and "5" are one listing id: outputs write it as text
        raise ManifestError(f"{path}, row {row}: field 'listing_id': {r.listing_id!r} already used in row "
                            f"{seen[r.listing_key]}")
    except ManifestError as e:
      if not skip_bad_rows:
        raise
      skipped.append((row, str(e)))
      continue
    seen[r.listing_key] = row
    rows.append(r)
  ids = {"listing": _id_map(r.listing_id for r in rows),
         "product": _id_map(v for r in rows for v in (r.product_id, r.true_product_id)),
         "family": _id_map(r.family_id for r in rows)}
  for space in ("product", "family"):
    as_text = {}
    for v in ids[space]:
      if as_text.setdefault(str(v), v) != v:
        raise ManifestError(f"{path}: {space} id {as_text[str(v)]!r} and {v!r} differ only in type; write each "
                            f"{space} id one way (all numbers or all strings)")
  rows = [dataclasses.replace(r, listing_id=ids["listing"][r.listing_id], product_id=ids["product"][r.product_id],
                              true_product_id=ids["product"][r.true_product_id],
                              family_id=ids["family"][r.family_id]) for r in rows]
  splits_assigned = bool(rows) and all(r.split is None for r in rows)
  rows = assign_splits(rows, split_seed, eval_share)
  cats = tuple(categories) if categories is not None else tuple(sorted({r.category for r in rows}))
  keys = category_keys(rows, cats)
  schema.register_categories(keys)
  if unknown:
    names = sorted(unknown, key=unknown.get)
    warnings.warn(f"{path}: unknown field(s) {', '.join(repr(n) for n in names)} (first in row "
                  f"{unknown[names[0]]}) are not used; each row keeps them in ManifestRow.extra",
                  ManifestWarning, stacklevel=2)
  return ManifestReport(path, rows, skipped, categories=cats, category_keys=keys, ids=ids,
                        unknown_fields=tuple(names) if unknown else (), splits_assigned=splits_assigned)


def load_image(path: str, size: int, *, where: str = "") -> np.ndarray:
  """Decodes an image file to uint8 [size, size, 3]: padded to a square with white, then resized.

  Raises ManifestError naming `where` (file / row) if the file is missing or not a readable image.
  """
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
  except FileNotFoundError:
    raise ManifestError(f"{where}: field 'image': file {path} does not exist") from None
  except Exception as e:  # PIL raises several types for truncated / non-image files
    raise ManifestError(f"{where}: field 'image': cannot decode {path} ({type(e).__name__}: {e})") from None
  w, h = im.size
  if (w, h) != (size, size):
    side = max(w, h)
    if w != h:  # keep the aspect ratio: a product photo must not be squashed
      square = Image.new("RGB", (side, side), (255, 255, 255))
      square.paste(im, ((side - w) // 2, (side - h) // 2))
      im = square
    im = im.resize((size, size), Image.BICUBIC)
  return np.asarray(im)


def iter_listings(report: ManifestReport, image_size: int, *,
                  skip_bad_rows: bool = False) -> Iterator[catalog_lib.Listing]:
  """Listings of a read manifest, images decoded; corrupt images raise or (skip_bad_rows) are recorded in
  `report.skipped` and skipped."""
  for r in report.rows:
    try:
      image = load_image(r.image_path, image_size, where=f"{report.path}, row {r.row}")
    except ManifestError as e:
      if not skip_bad_rows:
        raise
      report.skipped.append((r.row, str(e)))
      continue
    yield catalog_lib.Listing(
        listing_id=r.listing_id, product_id=r.product_id, true_product_id=r.true_product_id,
        family_id=r.family_id, category=r.category, title=r.title, image=image,
        teacher_attributes=r.teacher_attributes, listing_attributes=r.attributes,
        product_attributes=r.attributes, split=r.split, listing_key=r.listing_key)


def catalog_from_manifest(path: str, image_size: int = 64, *, categories: Sequence[str] | None = None,
                          skip_bad_rows: bool = False, split_seed: int = 0, eval_share: float = 0.2
                          ) -> catalog_lib.Catalog:
  """The whole manifest (JSONL or Parquet) in memory as a Catalog (products carry the manifest's attribute
  strings; listings the user's listing id as `listing_key`).

  `catalog.report` is the `ManifestReport`: its `categories`, `category_keys`, `ids` and, with
  `skip_bad_rows`, the skipped rows (`catalog.report.skipped`, `catalog.report.summary()`).
  """
  report = read_manifest(path, categories=categories, skip_bad_rows=skip_bad_rows, split_seed=split_seed,
                         eval_share=eval_share)
  listings = list(iter_listings(report, image_size, skip_bad_rows=skip_bad_rows))
  if report.splits_assigned:
    listings = requery(listings)
  products = {}
  for l in listings:
    if l.product_id not in products:
      products[l.product_id] = catalog_lib.Product(
          l.product_id, l.true_product_id, l.family_id, l.category,
          dict(parse_attributes(l.product_attributes).pairs), l.split,
          l.product_id != l.true_product_id)
  return catalog_lib.Catalog(listings, products, None, report=report)


def write_manifest(catalog: catalog_lib.Catalog, directory: str, *, image_format: str = "png") -> str:
  """Writes `catalog` as `directory/manifest.jsonl` + `directory/images/<listing_id>.<ext>`; returns the path.

  The catalog's int ids are written (not `listing_key`), so reading it back gives the same ids."""
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  path = os.path.join(directory, MANIFEST_NAME)
  with open(path, "w") as f:
    for l in catalog.listings:
      rel = os.path.join("images", f"{l.listing_id}.{image_format}")
      Image.fromarray(l.image).save(os.path.join(directory, rel))
      f.write(json.dumps({
          "listing_id": l.listing_id, "product_id": l.product_id, "category": l.category, "title": l.title,
          "image": rel, "attributes": l.product_attributes, "teacher_attributes": l.teacher_attributes,
          "true_product_id": l.true_product_id, "family_id": l.family_id, "split": l.split}) + "\n")
  return path
