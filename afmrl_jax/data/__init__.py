"""Catalogs (synthetic default, JSONL manifests), tfds builder, tokenizer, Qwen2-VL patches, grain pipelines.

Names below are imported lazily so that `import afmrl_jax.data` stays cheap (transformers, tfds and grain
load only when used). See docs/catalog.md and docs/interfaces.md.
"""
import importlib

_EXPORTS = {
    "Catalog": "catalog", "CatalogConfig": "catalog", "Listing": "catalog", "Product": "catalog",
    "generate_catalog": "catalog", "render_view": "catalog", "SPLITS": "catalog",
    "DefaultData": "defaults", "default_catalog": "defaults",
    "load_tokenizer": "tokenizer", "default_tokenizer": "tokenizer",
    "ListingTable": "table",
    "PipelineConfig": "pipeline", "train_dataset": "pipeline", "eval_dataset": "pipeline",
    "image_grid_thw": "pipeline",
    "ManifestError": "manifest", "read_manifest": "manifest", "write_manifest": "manifest",
    "catalog_from_manifest": "manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"afmrl_jax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'afmrl_jax.data' has no attribute {name!r}")
