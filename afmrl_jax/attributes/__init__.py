"""Attribute strings: parse/format, BM25 terms, corpus statistics and term-id encoding.

Pure Python + NumPy (no jax), so data pipelines and reward functions can use it anywhere.
"""
from afmrl_jax.attributes.bm25 import CorpusStats
from afmrl_jax.attributes.parse import ParsedAttributes, canonical, format_attributes, parse_attributes
from afmrl_jax.attributes.terms import attribute_terms

__all__ = [
    "CorpusStats",
    "ParsedAttributes",
    "attribute_terms",
    "canonical",
    "format_attributes",
    "parse_attributes",
]
