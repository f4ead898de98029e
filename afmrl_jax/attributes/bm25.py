"""BM25 corpus statistics over attribute texts, and term-id encoding for the on-device BM25.

Id 0 is padding (idf 0). Ids 1.. are the corpus terms in sorted order, so the same corpus always gives
the same ids. IDF is the BM25 (Lucene) form, always positive:
  idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5)).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable

import numpy as np

from afmrl_jax.attributes.terms import terms_of

_FORMAT_VERSION = 1


def bm25_idf(num_docs: int, doc_freq: np.ndarray) -> np.ndarray:
  """BM25 idf for document frequencies `doc_freq` [V] in a corpus of `num_docs` documents."""
  doc_freq = np.asarray(doc_freq, np.float64)
  return np.log1p((num_docs - doc_freq + 0.5) / (doc_freq + 0.5))


@dataclasses.dataclass
class CorpusStats:
  """Term vocabulary and BM25 statistics of an attribute corpus.

  term_to_id: term -> id, ids 1..V-1 (0 = padding).
  idf: float32 [V], idf[0] = 0.
  avg_doc_len: mean number of terms per document (repeats counted).
  num_docs: number of documents.
  doc_freq: int64 [V], documents containing each term (doc_freq[0] = 0).
  """
  term_to_id: dict[str, int]
  idf: np.ndarray
  avg_doc_len: float
  num_docs: int
  doc_freq: np.ndarray

  @property
  def vocab_size(self) -> int:
    """V, padding included."""
    return len(self.term_to_id) + 1

  @classmethod
  def from_texts(cls, texts: Iterable) -> "CorpusStats":
    """Statistics of attribute strings (or sequences of (key, value) pairs), one per document."""
    doc_terms = [terms_of(text) for text in texts]
    if not doc_terms:
      raise ValueError("CorpusStats.from_texts: empty corpus (no attribute texts given)")
    vocabulary = sorted({term for terms in doc_terms for term in terms})
    term_to_id = {term: index + 1 for index, term in enumerate(vocabulary)}
    doc_freq = np.zeros(len(vocabulary) + 1, np.int64)
    for terms in doc_terms:
      for term in set(terms):
        doc_freq[term_to_id[term]] += 1
    num_docs = len(doc_terms)
    idf = bm25_idf(num_docs, doc_freq).astype(np.float32)
    idf[0] = 0.0
    avg_doc_len = float(np.mean([len(terms) for terms in doc_terms]))
    return cls(term_to_id, idf, avg_doc_len, num_docs, doc_freq)

  def encode(self, text_or_pairs, max_terms: int) -> np.ndarray:
    """Term ids int32 [max_terms], 0-padded.

    Unknown terms map to padding; they are dropped before truncation so they do not use up slots.
    Truncation keeps the first `max_terms` known terms (pair terms before words, see terms.py).
    """
    if max_terms <= 0:
      raise ValueError(f"CorpusStats.encode: max_terms must be positive, got {max_terms}")
    ids = [self.term_to_id[t] for t in terms_of(text_or_pairs) if t in self.term_to_id][:max_terms]
    out = np.zeros(max_terms, np.int32)
    out[:len(ids)] = ids
    return out

  def encode_batch(self, texts: Iterable, max_terms: int) -> np.ndarray:
    """int32 [len(texts), max_terms]."""
    return np.stack([self.encode(text, max_terms) for text in texts])

  def to_json_dict(self) -> dict:
    terms = [None] * self.vocab_size
    for term, index in self.term_to_id.items():
      terms[index] = term
    return {
        "format_version": _FORMAT_VERSION,
        "terms": terms[1:],
        "doc_freq": [int(x) for x in self.doc_freq[1:]],
        "num_docs": int(self.num_docs),
        "avg_doc_len": float(self.avg_doc_len),
    }

  @classmethod
  def from_json_dict(cls, data: dict, source: str = "<dict>") -> "CorpusStats":
    for field in ("terms", "doc_freq", "num_docs", "avg_doc_len"):
      if field not in data:
        raise ValueError(f"{source}: corpus statistics lack the field {field!r}")
    if data.get("format_version", _FORMAT_VERSION) != _FORMAT_VERSION:
      raise ValueError(f"{source}: format_version {data['format_version']} is not {_FORMAT_VERSION}")
    if len(data["terms"]) != len(data["doc_freq"]):
      raise ValueError(f"{source}: 'terms' and 'doc_freq' differ in length")
    term_to_id = {term: index + 1 for index, term in enumerate(data["terms"])}
    doc_freq = np.asarray([0] + list(data["doc_freq"]), np.int64)
    idf = bm25_idf(int(data["num_docs"]), doc_freq).astype(np.float32)
    idf[0] = 0.0
    avg = float(data["avg_doc_len"])
    if not math.isfinite(avg) or avg < 0:
      raise ValueError(f"{source}: avg_doc_len {avg} is not a non-negative number")
    return cls(term_to_id, idf, avg, int(data["num_docs"]), doc_freq)

  def save(self, path) -> None:
    """Write JSON (terms in id order, document frequencies, counts); idf is recomputed on load."""
    with open(path, "w", encoding="utf-8") as f:
      json.dump(self.to_json_dict(), f, ensure_ascii=False)

  @classmethod
  def load(cls, path) -> "CorpusStats":
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
      raise ValueError(f"{path}: cannot read corpus statistics: {error}") from error
    return cls.from_json_dict(data, str(path))
