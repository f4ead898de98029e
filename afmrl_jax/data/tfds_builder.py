"""tfds builder that materialises a catalog (the synthetic one or a JSONL / Parquet manifest) into array_record.

TensorFlow-free: images are stored as uint8 `Tensor`s (not `tfds.features.Image`, which needs TF to
encode), strings as `Text`, and the file format is array_record, read back with `tfds.data_source`
(random access, what grain wants). Example order is kept (`disable_shuffling`), so record i of a split
is the i-th listing of that split in the catalog.

    build_catalog_dataset(data_dir, CatalogBuilderConfig(name="default", catalog=CatalogConfig()))
    sources = tfds.data_source("afmrl_catalog/default", data_dir=data_dir)  # {'train': ..., 'query': ...}
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow_datasets as tfds

from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import manifest as manifest_lib

_INT_FIELDS = ("listing_id", "product_id", "true_product_id", "family_id")
_TEXT_FIELDS = ("category", "title", "teacher_attributes", "listing_attributes", "product_attributes", "split",
                "listing_key")  # listing_key: the manifest's own listing id ("" for the synthetic catalog)


@dataclasses.dataclass
class CatalogBuilderConfig(tfds.core.BuilderConfig):
  """Exactly one of `catalog` (synthetic) or `manifest` (path to a JSONL or `.parquet` manifest)."""
  catalog: catalog_lib.CatalogConfig | None = None
  manifest: str | None = None
  image_size: int = 64  # manifest images are padded to square and resized to this
  categories: tuple[str, ...] | None = None  # manifest: None = the manifest's own; a tuple refuses others
  skip_bad_rows: bool = False


class AfmrlCatalog(tfds.core.GeneratorBasedBuilder):
  """Listings of a product catalog; one tfds split per catalog split that has listings."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First version.", "1.1.0": "listing_key: the manifest's own listing id."}

  # Nothing is downloaded, so there are no checksums to look up. tfds would locate them next to this
  # module through `importlib_resources`, which is not installed with tfds on Python 3.11.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, config: CatalogBuilderConfig, **kwargs):
    if (config.catalog is None) == (config.manifest is None):
      raise ValueError("CatalogBuilderConfig: give exactly one of `catalog` (synthetic) or `manifest` (path)")
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, **kwargs)
    self.skipped: list[tuple[int, str]] = []
    self._listings: list[catalog_lib.Listing] | None = None

  def _image_size(self) -> int:
    cfg = self.builder_config
    return cfg.catalog.image_size if cfg.catalog is not None else cfg.image_size

  def _info(self) -> tfds.core.DatasetInfo:
    s = self._image_size()
    features = {f: tfds.features.Scalar(dtype=np.int64) for f in _INT_FIELDS}
    features.update({f: tfds.features.Text() for f in _TEXT_FIELDS})
    features["image"] = tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8)
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=tfds.features.FeaturesDict(features), disable_shuffling=True)

  def _load(self) -> list[catalog_lib.Listing]:
    cfg = self.builder_config
    if cfg.catalog is not None:
      return catalog_lib.generate_catalog(cfg.catalog).listings
    report = manifest_lib.read_manifest(cfg.manifest, categories=cfg.categories, skip_bad_rows=cfg.skip_bad_rows)
    listings = list(manifest_lib.iter_listings(report, cfg.image_size, skip_bad_rows=cfg.skip_bad_rows))
    self.skipped = report.skipped
    if report.skipped:
      logging.warning("%s", report.summary())
    return listings

  def _split_generators(self, dl_manager):
    del dl_manager
    listings = self._load()
    splits = {}
    for name in catalog_lib.SPLITS:
      part = [l for l in listings if l.split == name]
      if part:
        splits[name] = self._generate_examples(part)
    return splits

  def _generate_examples(self, listings):
    for l in listings:
      ex = {f: getattr(l, f) for f in _INT_FIELDS + _TEXT_FIELDS}
      ex["image"] = l.image
      yield l.listing_id, ex


def build_catalog_dataset(data_dir: str, config: CatalogBuilderConfig) -> AfmrlCatalog:
  """Generates (if needed) and returns the builder; read with `builder.as_data_source()` or
  `tfds.data_source(f"afmrl_catalog/{config.name}", data_dir=data_dir)`."""
  builder = AfmrlCatalog(config=config, data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def decode_record(rec: dict) -> dict:
  """A tfds record -> the listing dict the pipeline uses (Text fields arrive as bytes)."""
  out = {f: int(rec[f]) for f in _INT_FIELDS}
  for f in _TEXT_FIELDS:
    if f not in rec:  # listing_key: absent from records of version 1.0.0
      continue
    v = rec[f]
    out[f] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
  out["image"] = np.asarray(rec["image"], np.uint8)
  return out
