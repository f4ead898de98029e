"""On-disk catalogs: the JSONL manifest format (documented in docs/catalog.md), reader and writer.

One JSON object per line. Required: `listing_id` (int), `product_id` (int), `category` (str), `title` (str),
`image` (path, relative to the manifest's folder or absolute). Optional: `attributes` (`key: value; ...`
string or a {key: value} object: ground truth), `teacher_attributes` (same forms), `true_product_id` (int,
evaluation only), `family_id` (int), `split` (`train` | `gallery` | `query` | `heldout`, default `train`).

Bad rows (unreadable JSON, a missing or mistyped field, an unknown category, a missing or corrupt image)
raise `ManifestError` naming the file, the row (1-based line number) and the field; with
`skip_bad_rows=True` they are skipped and counted in the returned report instead.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from afmrl_jax.attributes.parse import parse_attributes
from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import schema
from afmrl_jax.errors import UserError

REQUIRED = {"listing_id": int, "product_id": int, "category": str, "title": str, "image": str}
OPTIONAL_INT = ("true_product_id", "family_id")
MANIFEST_NAME = "manifest.jsonl"


class ManifestError(UserError, ValueError):
  """A bad manifest row: the message names the file, the row and the field."""

  hint = "fix the row, or set config.catalog.skip_bad_rows=True to skip and count bad rows"


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  row: int  # 1-based line number in the manifest
  listing_id: int
  product_id: int
  true_product_id: int
  family_id: int
  category: str
  title: str
  image_path: str  # absolute
  attributes: str
  teacher_attributes: str
  split: str


@dataclasses.dataclass
class ManifestReport:
  path: str
  rows: list[ManifestRow]
  skipped: list[tuple[int, str]]  # (row, reason)

  def summary(self) -> str:
    head = f"{self.path}: {len(self.rows)} rows read, {len(self.skipped)} skipped"
    return head + "".join(f"\n  row {r}: {why}" for r, why in self.skipped[:20]) + (
        f"\n  ... and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else "")


def _attr_string(value, where: str, field: str) -> str:
  if value is None:
    return ""
  if isinstance(value, dict):
    return "; ".join(f"{k}: {v}" for k, v in value.items())
  if isinstance(value, str):
    return value
  raise ManifestError(f"{where}: field {field!r} must be a `key: value; ...` string or an object, "
                      f"got {type(value).__name__}")


def parse_row(obj, path: str, row: int, categories: Sequence[str]) -> ManifestRow:
  """Validates one decoded JSON row; raises ManifestError naming file, row and field."""
  where = f"{path}, row {row}"
  if not isinstance(obj, dict):
    raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  for field, typ in REQUIRED.items():
    if field not in obj or obj[field] is None:
      raise ManifestError(f"{where}: missing required field {field!r}")
    v = obj[field]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
      raise ManifestError(f"{where}: field {field!r} must be an integer, got {v!r}")
    if typ is str and not isinstance(v, str):
      raise ManifestError(f"{where}: field {field!r} must be a string, got {v!r}")
  for field in OPTIONAL_INT:
    v = obj.get(field)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
      raise ManifestError(f"{where}: field {field!r} must be an integer, got {v!r}")
  if obj["category"] not in categories:
    raise ManifestError(f"{where}: field 'category': unknown category {obj['category']!r}; "
                        f"known: {', '.join(categories)}")
  split = obj.get("split", "train")
  if split not in catalog_lib.SPLITS:
    raise ManifestError(f"{where}: field 'split' must be one of {', '.join(catalog_lib.SPLITS)}, got {split!r}")
  image = obj["image"]
  image_path = image if os.path.isabs(image) else os.path.join(os.path.dirname(os.path.abspath(path)), image)
  return ManifestRow(
      row=row, listing_id=obj["listing_id"], product_id=obj["product_id"],
      true_product_id=obj.get("true_product_id", obj["product_id"]),
      family_id=obj.get("family_id", obj["product_id"]), category=obj["category"], title=obj["title"],
      image_path=image_path, attributes=_attr_string(obj.get("attributes"), where, "attributes"),
      teacher_attributes=_attr_string(obj.get("teacher_attributes"), where, "teacher_attributes"),
      split=split)


def read_manifest(path: str, *, categories: Sequence[str] = schema.CATEGORIES, skip_bad_rows: bool = False,
                  check_images: bool = True) -> ManifestReport:
  """Reads and validates a manifest (images: existence only; decoding happens in `load_image`)."""
  if not os.path.exists(path):
    raise ManifestError(f"manifest {path} does not exist")
  rows, skipped, seen = [], [], {}
  with open(path) as f:
    for row, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ManifestError(f"{path}, row {row}: not valid JSON ({e.msg})") from None
        r = parse_row(obj, path, row, categories)
        if check_images and not os.path.isfile(r.image_path):
          raise ManifestError(f"{path}, row {row}: field 'image': file {r.image_path} does not exist")
        if r.listing_id in seen:
          raise ManifestError(f"{path}, row {row}: field 'listing_id': {r.listing_id} already used in row "
                              f"{seen[r.listing_id]}")
      except ManifestError as e:
        if not skip_bad_rows:
          raise
        skipped.append((row, str(e)))
        continue
      seen[r.listing_id] = row
      rows.append(r)
  return ManifestReport(path, rows, skipped)


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
        product_attributes=r.attributes, split=r.split)


def catalog_from_manifest(path: str, image_size: int = 64, *, categories: Sequence[str] = schema.CATEGORIES,
                          skip_bad_rows: bool = False) -> catalog_lib.Catalog:
  """The whole manifest in memory as a Catalog (products carry the manifest's attribute strings).

  With `skip_bad_rows`, the skipped rows are in `catalog.report.skipped` (`catalog.report.summary()`).
  """
  report = read_manifest(path, categories=categories, skip_bad_rows=skip_bad_rows)
  listings = list(iter_listings(report, image_size, skip_bad_rows=skip_bad_rows))
  products = {}
  for l in listings:
    if l.product_id not in products:
      products[l.product_id] = catalog_lib.Product(
          l.product_id, l.true_product_id, l.family_id, l.category,
          dict(parse_attributes(l.product_attributes).pairs), l.split,
          l.product_id != l.true_product_id)
  return catalog_lib.Catalog(listings, products, None, report=report)


def write_manifest(catalog: catalog_lib.Catalog, directory: str, *, image_format: str = "png") -> str:
  """Writes `catalog` as `directory/manifest.jsonl` + `directory/images/<listing_id>.<ext>`; returns the path."""
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
