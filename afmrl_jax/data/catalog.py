"""The embedded default catalog: a synthetic fine-grained product catalog, deterministic from a seed.

Structure (what makes identical-product retrieval hard in the way the method targets):
- a *family* is a set of sibling products that share every attribute but one (one varying key per
  family), so every sibling pair differs in exactly one attribute: the hard negatives;
- each product has several *listings* (photos of it under different views, with their own titles);
- a share of products is relisted by another seller under a new `product_id` (same `true_product_id`,
  same attributes, new listings): the unlabelled duplicates, i.e. false negatives in training;
- splits by family: `train`, evaluation families (per product: first listing `query`, the rest and all
  duplicates' listings `gallery`), and `heldout` families, which alone contain one attribute combination
  per category (e.g. `colour=pink` with `pattern=dots`) that no other split ever shows.

Every random draw comes from `np.random.default_rng([seed, stream, *ids])`, so the result does not depend
on the order or process the images are rendered in: same seed, same bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Sequence

import numpy as np

from afmrl_jax.data import render, schema, text
from afmrl_jax.fields import bounded, check, non_negative, positive

SPLITS = ("train", "gallery", "query", "heldout")
# rng stream tags: one independent stream per kind of draw.
_S_COMBO, _S_FAMILY, _S_PRODUCT, _S_LISTING, _S_NOISE, _S_FRESH = range(6)


@dataclasses.dataclass(frozen=True)
class CatalogConfig:
  """Knobs of the synthetic catalog. Everything but `num_workers` changes the content."""
  seed: int = 0
  categories: tuple[str, ...] = schema.CATEGORIES
  families_per_category: int = positive(250)
  siblings_per_family: int = bounded(4, 2)  # products per family (capped by the varying key's values)
  listings_per_product: int = bounded(4, 2)  # >= 2: a query needs another listing of its product
  image_size: int = bounded(64, 32, 448)
  detail_scale: float = positive(1.0)  # size of distinguishing details (0.5 hard .. 2 easy)
  augment_strength: float = non_negative(1.0)  # view augmentation (0 = clean centred photos)
  teacher_drop_rate: float = bounded(0.1, 0.0, 1.0)
  teacher_wrong_rate: float = bounded(0.05, 0.0, 1.0)
  duplicate_share: float = bounded(0.1, 0.0, 1.0)  # share of products relisted under a new product id
  title_reveal_share: float = bounded(0.5, 0.0, 1.0)  # probability that the title mentions an attribute
  title_noise_rate: float = bounded(0.5, 0.0, 1.0)  # probability of seller noise words in a title
  train_fraction: float = bounded(0.7, 0.0, 1.0)  # of families; the rest after heldout are evaluation
  heldout_fraction: float = bounded(0.1, 0.0, 1.0)
  num_workers: int = non_negative(2)  # render processes (0 = in this process); does not change the result

  def __post_init__(self):
    object.__setattr__(self, "categories", tuple(self.categories))
    extra = []
    unknown = [c for c in self.categories if c not in schema.SCHEMA]
    if unknown:
      extra.append(("categories", f"names unknown categories {unknown}; known: {', '.join(schema.CATEGORIES)}"))
    if not self.train_fraction + self.heldout_fraction < 1:
      extra.append(("train_fraction", "plus heldout_fraction must be < 1 (the rest are evaluation families)"))
    check(self, extra)

  def content_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("num_workers")
    d["categories"] = list(d["categories"])
    return d


@dataclasses.dataclass(frozen=True)
class Product:
  product_id: int
  true_product_id: int
  family_id: int
  category: str
  attributes: dict  # key -> value (ground truth)
  split_group: str  # 'train' | 'eval' | 'heldout'
  is_duplicate: bool


@dataclasses.dataclass(frozen=True)
class Listing:
  """One listing. `image` uint8 [H, W, 3]; attribute strings are `key: value; ...`."""
  listing_id: int
  product_id: int
  true_product_id: int
  family_id: int
  category: str
  title: str
  image: np.ndarray
  teacher_attributes: str
  listing_attributes: str
  product_attributes: str
  split: str
  listing_key: str = ""  # the user's listing id (manifests: "SKU-00123", "17"); "" in the synthetic catalog


def _meta(listing: Listing) -> dict:
  """A listing's fields but the image; `listing_key` only when set (a synthetic catalog's metadata has none)."""
  meta = dataclasses.asdict(listing)
  meta.pop("image")
  if not meta["listing_key"]:
    meta.pop("listing_key")
  return meta


@dataclasses.dataclass
class Catalog:
  listings: list[Listing]
  products: dict[int, Product]
  config: CatalogConfig | None = None
  report: object = None  # manifest.ManifestReport when read from a manifest (skipped rows)

  def __len__(self) -> int:
    return len(self.listings)

  def split(self, name: str) -> list[Listing]:
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; splits: {', '.join(SPLITS)}")
    return [l for l in self.listings if l.split == name]

  def images(self) -> np.ndarray:
    """uint8 [N, H, W, 3]."""
    return np.stack([l.image for l in self.listings])

  def texts(self) -> list[str]:
    """All titles and attribute strings (tokenizer training corpus)."""
    out = []
    for l in self.listings:
      out += [l.title, l.teacher_attributes, l.product_attributes]
    return out

  def digest(self) -> str:
    """sha256 over every field and image byte: equal digests mean identical catalogs."""
    h = hashlib.sha256()
    for l in self.listings:
      h.update(json.dumps(_meta(l), sort_keys=True).encode())
      h.update(np.ascontiguousarray(l.image).tobytes())
    return h.hexdigest()

  def save(self, directory: str) -> None:
    """`listings.jsonl` + `images.npy` (+ `products.jsonl`, `config.json`)."""
    os.makedirs(directory, exist_ok=True)
    first = self.listings[0].image
    # Written row by row (no stacked copy in memory): 20k listings at 448x448 are 12 GB.
    out = np.lib.format.open_memmap(os.path.join(directory, "images.npy"), mode="w+", dtype=np.uint8,
                                    shape=(len(self.listings),) + first.shape)
    for i, l in enumerate(self.listings):
      out[i] = l.image
    out.flush()
    del out
    with open(os.path.join(directory, "listings.jsonl"), "w") as f:
      for l in self.listings:
        f.write(json.dumps(_meta(l)) + "\n")
    with open(os.path.join(directory, "products.jsonl"), "w") as f:
      for p in self.products.values():
        f.write(json.dumps(dataclasses.asdict(p)) + "\n")
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(self.config.content_dict() if self.config else None, f)

  @classmethod
  def load(cls, directory: str) -> "Catalog":
    """Images stay on disk (memory-mapped, read-only) until used: large catalogs load instantly."""
    images = np.load(os.path.join(directory, "images.npy"), mmap_mode="r")
    with open(os.path.join(directory, "listings.jsonl")) as f:
      metas = [json.loads(line) for line in f]
    if len(metas) != len(images):
      raise ValueError(f"{directory}: listings.jsonl has {len(metas)} rows but images.npy {len(images)} images")
    listings = [Listing(image=img, **m) for m, img in zip(metas, images)]
    with open(os.path.join(directory, "products.jsonl")) as f:
      products = {p["product_id"]: Product(**p) for p in map(json.loads, f)}
    with open(os.path.join(directory, "config.json")) as f:
      cfg = json.load(f)
    config = None if cfg is None else CatalogConfig(**{**cfg, "categories": tuple(cfg["categories"])})
    return cls(listings, products, config)


def _rng(*ids: int) -> np.random.Generator:
  return np.random.default_rng([int(i) for i in ids])


def heldout_combo(seed: int, category: str) -> tuple[tuple[str, str], tuple[str, str]]:
  """The attribute combination reserved for the heldout split of `category`: ((colour, c), (key, v))."""
  rng = _rng(seed, _S_COMBO, schema.CATEGORIES.index(category))
  keys = schema.SCHEMA[category]
  other = [k for k in keys if k not in ("colour", "material")][0]  # pattern / shape / style ...
  colour = keys["colour"][int(rng.integers(len(keys["colour"])))]
  value = keys[other][int(rng.integers(len(keys[other])))]
  return ("colour", colour), (other, value)


def _has_combo(attrs: dict, combo) -> bool:
  return all(attrs[k] == v for k, v in combo)


def _family_products(cfg: CatalogConfig, category: str, family_id: int) -> tuple[str, list[dict]]:
  """Split group and the sibling attribute dicts of one family (all pairs differ in one varying key)."""
  rng = _rng(cfg.seed, _S_FAMILY, family_id)
  keys = schema.SCHEMA[category]
  combo = heldout_combo(cfg.seed, category)
  u = rng.random()
  group = ("heldout" if u < cfg.heldout_fraction else
           "train" if u < cfg.heldout_fraction + cfg.train_fraction else "eval")
  base = {k: v[int(rng.integers(len(v)))] for k, v in keys.items()}
  combo_keys = {k for k, _ in combo}
  if group == "heldout":
    base.update(dict(combo))
    candidates = [k for k in keys if k not in combo_keys]  # keep the combo in every sibling
  else:
    while _has_combo(base, combo):
      base = {k: v[int(rng.integers(len(v)))] for k, v in keys.items()}
    candidates = list(keys)
  vary = candidates[int(rng.integers(len(candidates)))]
  others = [v for v in keys[vary] if v != base[vary]]
  rng.shuffle(others)
  products = [base]
  for v in others:
    if len(products) >= cfg.siblings_per_family:
      break
    sib = {**base, vary: v}
    if group != "heldout" and _has_combo(sib, combo):
      continue
    products.append(sib)
  return group, products


def _render_task(args) -> np.ndarray:
  """Worker: all listings of one product -> uint8 [L, H, W, 3]."""
  category, attrs, size, detail, views, noise_seeds = args
  prod = render.downsample_product(render.render_product(category, attrs, size, detail), size)
  return np.stack([render.render_listing(prod, v, size, np.random.default_rng(s))
                   for v, s in zip(views, noise_seeds)])


def generate_catalog(config: CatalogConfig = CatalogConfig()) -> Catalog:
  """Builds the catalog (metadata in this process, images in `config.num_workers` processes)."""
  cfg = config
  products: dict[int, Product] = {}
  metas, tasks = [], []
  family_id = product_id = listing_id = 0
  for category in cfg.categories:
    for _ in range(cfg.families_per_category):
      group, sibs = _family_products(cfg, category, family_id)
      for attrs in sibs:
        dup = _rng(cfg.seed, _S_PRODUCT, product_id).random() < cfg.duplicate_share
        true_id = product_id
        for is_dup in ([False, True] if dup else [False]):
          products[product_id] = Product(product_id, true_id, family_id, category, attrs, group, is_dup)
          attr_str = schema.format_pairs(category, attrs)
          views, seeds = [], []
          for j in range(cfg.listings_per_product):
            rng = _rng(cfg.seed, _S_LISTING, product_id, j)
            split = ("train" if group == "train" else "heldout" if group == "heldout" else
                     "query" if (j == 0 and not is_dup) else "gallery")
            metas.append(dict(
                listing_id=listing_id, product_id=product_id, true_product_id=true_id, family_id=family_id,
                category=category,
                title=text.make_title(rng, category, attrs, cfg.title_reveal_share, cfg.title_noise_rate),
                teacher_attributes=text.teacher_attributes(rng, category, attrs, cfg.teacher_drop_rate,
                                                           cfg.teacher_wrong_rate),
                listing_attributes=attr_str, product_attributes=attr_str, split=split))
            views.append(render.sample_view(rng, cfg.augment_strength))
            seeds.append([cfg.seed, _S_NOISE, listing_id])
            listing_id += 1
          tasks.append((category, attrs, cfg.image_size, cfg.detail_scale, views, seeds))
          product_id += 1
      family_id += 1
  images = _run_tasks(tasks, cfg.num_workers)
  flat = [img for block in images for img in block]
  listings = [Listing(image=img, **m) for m, img in zip(metas, flat)]
  return Catalog(listings, products, cfg)


def _run_tasks(tasks: Sequence, num_workers: int) -> list[np.ndarray]:
  if num_workers <= 0 or len(tasks) < 200:
    return [_render_task(t) for t in tasks]
  # fork is fastest and needs no `__main__` guard in the caller's script, but copying a process that runs
  # JAX's threads can deadlock: then spawn.
  ctx = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
  with ctx.Pool(num_workers) as pool:
    return pool.map(_render_task, tasks, chunksize=max(len(tasks) // (8 * num_workers), 1))


def render_view(item: Listing | Product, seed: int, epoch: int, index: int, *, image_size: int = 64,
                detail_scale: float = 1.0, augment_strength: float = 1.0) -> np.ndarray:
  """A fresh photo of `item`'s product: uint8 [image_size, image_size, 3], deterministic from
  (seed, product, epoch, index), so training can see new views of its products every epoch."""
  if isinstance(item, Product):
    category, attrs = item.category, item.attributes
  else:
    category, attrs = item.category, schema.parse_pairs(item.product_attributes)
  prod = _cached_product(category, tuple(sorted(attrs.items())), image_size, detail_scale)
  rng = _rng(seed, _S_FRESH, item.true_product_id, epoch, index)
  return render.render_listing(prod, render.sample_view(rng, augment_strength), image_size, rng)


_PRODUCT_CACHE: dict = {}
_PRODUCT_CACHE_BYTES = 256 << 20


def _cached_product(category, attrs_items, size, detail):
  key = (category, attrs_items, size, detail)
  hit = _PRODUCT_CACHE.get(key)
  if hit is None:
    if len(_PRODUCT_CACHE) * size * size * 4 >= _PRODUCT_CACHE_BYTES:  # RGBA [size, size, 4] each
      _PRODUCT_CACHE.clear()
    hit = _PRODUCT_CACHE[key] = render.downsample_product(
        render.render_product(category, dict(attrs_items), size, detail), size)
  return hit
