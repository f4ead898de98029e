"""`ListingTable`: random access to one split's listings, from memory or from a tfds array_record source.

The pipeline needs every listing's ids and texts up front (to pair listings of one product and to build
family batches) but images only on demand, so ids and texts live in NumPy columns / lists and images
are read from the source when an element is processed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import schema
from afmrl_jax.data import tfds_builder


class ListingTable:
  """Columns (all length N): `listing_id, product_id, true_product_id, family_id, category_id` int64;
  `category, title, teacher_attributes, product_attributes` lists of str. `image(i)` -> uint8 [H, W, 3]."""

  def __init__(self, metas: Sequence[dict], image_fn, categories: Sequence[str] = schema.CATEGORIES,
               name: str = "table"):
    self.name = name
    self.categories = tuple(categories)
    self._image_fn = image_fn
    for f in ("listing_id", "product_id", "true_product_id", "family_id"):
      setattr(self, f, np.asarray([m[f] for m in metas], np.int64))
    for f in ("category", "title", "teacher_attributes", "product_attributes"):
      setattr(self, f, [m[f] for m in metas])
    self.category_id = np.asarray([schema.category_id(c, self.categories) for c in self.category], np.int64)
    self._by_product: dict[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self.listing_id)

  def image(self, i: int) -> np.ndarray:
    return self._image_fn(int(i))

  def rows_by_product(self) -> dict[int, np.ndarray]:
    """product_id -> sorted row indices of its listings."""
    if self._by_product is None:
      order = np.argsort(self.product_id, kind="stable")
      ids, starts = np.unique(self.product_id[order], return_index=True)
      self._by_product = {int(p): rows for p, rows in zip(ids, np.split(order, starts[1:]))}
    return self._by_product

  def take(self, rows: Sequence[int], name: str | None = None) -> "ListingTable":
    """The table of `rows` (in that order); images are still read from this table's source."""
    rows = np.asarray(rows, np.int64)
    columns = ("listing_id", "product_id", "true_product_id", "family_id", "category", "title",
               "teacher_attributes", "product_attributes")
    metas = [{f: getattr(self, f)[i] for f in columns} for i in rows]
    return ListingTable(metas, lambda i: self._image_fn(int(rows[i])), self.categories, name=name or self.name)

  def product_share(self, fraction: float, seed: int) -> "ListingTable":
    """A seeded `fraction` of the products, with all of their listings (pairs stay whole)."""
    products = np.unique(self.product_id)
    keep = np.random.default_rng([seed, 211]).permutation(products)[:max(1, int(round(fraction * len(products))))]
    return self.take(np.flatnonzero(np.isin(self.product_id, keep)))

  def product_row(self, i: int) -> catalog_lib.Product:
    """The (synthetic) product of row i, for fresh views."""
    return catalog_lib.Product(int(self.product_id[i]), int(self.true_product_id[i]), int(self.family_id[i]),
                               self.category[i], schema.parse_pairs(self.product_attributes[i]), "", False)

  @classmethod
  def from_catalog(cls, catalog: catalog_lib.Catalog, split: str | Sequence[str],
                   categories: Sequence[str] = schema.CATEGORIES) -> "ListingTable":
    """In-memory table of the listings in `split` (a name or several), in catalog order."""
    splits = (split,) if isinstance(split, str) else tuple(split)
    for s in splits:
      if s not in catalog_lib.SPLITS:
        raise ValueError(f"unknown split {s!r}; splits: {', '.join(catalog_lib.SPLITS)}")
    listings = [l for l in catalog.listings if l.split in splits]
    if not listings:
      raise ValueError(f"catalog has no listings in split(s) {splits}")
    metas = [vars(l) for l in listings]
    return cls(metas, lambda i: listings[i].image, categories, name="+".join(splits))

  @classmethod
  def from_data_source(cls, source, categories: Sequence[str] = schema.CATEGORIES, name: str = "tfds",
                       chunk: int = 512) -> "ListingTable":
    """Table over a `tfds.data_source(...)[split]` (any random-access source of tfds records)."""
    n = len(source)
    metas = []
    for start in range(0, n, chunk):
      idx = list(range(start, min(start + chunk, n)))
      recs = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
      for rec in recs:
        m = tfds_builder.decode_record(rec)
        m.pop("image")
        metas.append(m)
    return cls(metas, lambda i: tfds_builder.decode_record(source[i])["image"], categories, name=name)
