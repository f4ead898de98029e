"""The embedded default data: synthetic catalog + tokenizer + BM25 corpus statistics, built once and cached.

`default_catalog(cache_dir)` is what trainers call: the first call generates everything (about a minute
at the default size on 2 cores) into `cache_dir/default-<hash of the config>/`; later calls load it.
Building goes to a temporary folder renamed into place at the end, so an interrupted build is redone
rather than half-read, and concurrent processes (e.g. several hosts) agree on the result.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

from afmrl_jax.attributes.bm25 import CorpusStats
from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import tokenizer as tokenizer_lib

_FORMAT_VERSION = 1


@dataclasses.dataclass
class DefaultData:
  catalog: catalog_lib.Catalog
  tokenizer: object  # transformers.PreTrainedTokenizerFast
  stats: CorpusStats  # IDF over the training split's teacher attribute strings
  directory: str
  tokenizer_dir: str
  stats_path: str


def cache_key(config: catalog_lib.CatalogConfig, vocab_size: int) -> str:
  blob = json.dumps({"catalog": config.content_dict(), "vocab_size": vocab_size, "v": _FORMAT_VERSION},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _build(directory: str, config: catalog_lib.CatalogConfig, vocab_size: int) -> None:
  cat = catalog_lib.generate_catalog(config)
  cat.save(os.path.join(directory, "catalog"))
  train = cat.split("train")
  texts = [t for l in train for t in (l.title, l.teacher_attributes, l.product_attributes)]
  tokenizer_lib.default_tokenizer(texts, os.path.join(directory, "tokenizer"), vocab_size)
  CorpusStats.from_texts([l.teacher_attributes for l in train]).save(os.path.join(directory, "corpus_stats.json"))
  with open(os.path.join(directory, "DONE"), "w") as f:
    json.dump({"catalog": config.content_dict(), "vocab_size": vocab_size, "digest": cat.digest()}, f)


def default_catalog(cache_dir: str, config: catalog_lib.CatalogConfig = catalog_lib.CatalogConfig(), *,
                    vocab_size: int = 2048, rebuild: bool = False) -> DefaultData:
  """Generates (first call) or loads the default catalog, tokenizer and corpus stats under `cache_dir`."""
  directory = os.path.join(os.path.abspath(cache_dir), f"default-{cache_key(config, vocab_size)}")
  if rebuild and os.path.isdir(directory):
    shutil.rmtree(directory)
  if not os.path.isfile(os.path.join(directory, "DONE")):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=cache_dir)
    try:
      _build(tmp, config, vocab_size)
      try:
        os.rename(tmp, directory)
      except OSError:  # another process finished first: its result is identical
        if not os.path.isfile(os.path.join(directory, "DONE")):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  tok_dir = os.path.join(directory, "tokenizer")
  stats_path = os.path.join(directory, "corpus_stats.json")
  return DefaultData(catalog=catalog_lib.Catalog.load(os.path.join(directory, "catalog")),
                     tokenizer=tokenizer_lib.load_tokenizer(tok_dir), stats=CorpusStats.load(stats_path),
                     directory=directory, tokenizer_dir=tok_dir, stats_path=stats_path)
