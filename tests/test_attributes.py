"""Attribute parser (hypothesis property tests), terms, BM25 corpus statistics vs hand-computed values."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from afmrl_jax.attributes import CorpusStats, attribute_terms, canonical, format_attributes, parse_attributes

# Keys/values that can round-trip: no pair separators, no key/value separator inside keys.
_WORD = st.text(alphabet=st.characters(blacklist_characters=";:=\n\r", blacklist_categories=("Cs", "Zl", "Zp")),
                min_size=1, max_size=12).filter(lambda s: canonical(s) != "")
_VALUE = st.text(alphabet=st.characters(blacklist_characters=";\n\r", blacklist_categories=("Cs", "Zl", "Zp")),
                 min_size=1, max_size=12).filter(lambda s: canonical(s) != "")
_PAIRS = st.lists(st.tuples(_WORD, _VALUE), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises_on_any_string(text):
  parsed = parse_attributes(text)
  assert isinstance(parsed.malformed, bool)
  for key, value in parsed.pairs:
    assert key and value and key == canonical(key) and value == canonical(value)
  if parsed.malformed:
    assert parsed.problems


@settings(max_examples=50, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_parse_non_strings_is_malformed_not_an_exception(value):
  assert parse_attributes(value).malformed


@settings(max_examples=300, deadline=None)
@given(_PAIRS)
def test_format_parse_round_trip(pairs):
  text = format_attributes(pairs)
  parsed = parse_attributes(text)
  assert not parsed.malformed, parsed.problems
  expected = []
  for key, value in pairs:  # canonical, exact duplicates dropped, order kept
    pair = (canonical(key), canonical(value))
    if pair not in expected:
      expected.append(pair)
  assert list(parsed.pairs) == expected
  assert format_attributes(parsed.pairs) == format_attributes(expected)


@settings(max_examples=200, deadline=None)
@given(_PAIRS, st.sampled_from(["no separator here", " : value", "key :", ":", "=x"]))
def test_malformed_segment_is_flagged_and_good_pairs_kept(pairs, bad):
  text = format_attributes(pairs) + "; " + bad
  parsed = parse_attributes(text)
  assert parsed.malformed
  assert len(parsed.pairs) == len({(canonical(k), canonical(v)) for k, v in pairs})


@pytest.mark.parametrize("text", ["", "   ", ";;", "\n"])
def test_empty_is_malformed(text):
  parsed = parse_attributes(text)
  assert parsed.malformed and parsed.pairs == ()


def test_canonical_forms_and_separators():
  parsed = parse_attributes("Colour :  Dark   RED;\nsleeve= Long\tsleeve ; size: 3:4;")
  assert not parsed.malformed
  assert parsed.pairs == (("colour", "dark red"), ("sleeve", "long sleeve"), ("size", "3:4"))
  assert format_attributes(parsed.pairs) == "colour: dark red; sleeve: long sleeve; size: 3:4"


def test_format_rejects_unroundtrippable_pairs():
  for bad in [("a;b", "x"), ("k", "v;w"), ("k:x", "v"), ("", "v"), ("k", " ")]:
    with pytest.raises(ValueError, match="format_attributes"):
      format_attributes([bad])


def test_terms_pairs_first_then_words():
  assert attribute_terms([("Colour", "dark red"), ("pattern", "red dots")]) == [
      "colour=dark red", "pattern=red dots", "dark", "red", "red", "dots"]


CORPUS = ["colour: red; sleeve: long", "colour: blue", "colour: red; pattern: red dots", "broken text"]


def test_corpus_stats_hand_computed():
  stats = CorpusStats.from_texts(CORPUS)
  # Documents' terms: {colour=red, sleeve=long, red, long}, {colour=blue, blue},
  # {colour=red, pattern=red dots, red, red, dots}, {} (malformed, no pairs).
  assert stats.num_docs == 4
  assert stats.avg_doc_len == pytest.approx((4 + 2 + 5 + 0) / 4)
  expected_df = {"colour=red": 2, "sleeve=long": 1, "red": 2, "long": 1, "colour=blue": 1, "blue": 1,
                 "pattern=red dots": 1, "dots": 1}
  assert set(stats.term_to_id) == set(expected_df)
  assert sorted(stats.term_to_id.values()) == list(range(1, 9))  # 0 is padding
  assert stats.idf[0] == 0.0
  for term, df in expected_df.items():
    assert stats.idf[stats.term_to_id[term]] == pytest.approx(math.log(1 + (4 - df + 0.5) / (df + 0.5)), rel=1e-6)


def test_encode_pads_truncates_and_drops_unknown():
  stats = CorpusStats.from_texts(CORPUS)
  ids = stats.encode("colour: red; material: silk; sleeve: long", 3)
  assert ids.dtype == np.int32 and ids.shape == (3,)
  t = stats.term_to_id
  # terms: colour=red, material=silk (unknown), sleeve=long, red, silk (unknown), long -> first 3 known.
  assert list(ids) == [t["colour=red"], t["sleeve=long"], t["red"]]
  assert list(stats.encode([("colour", "blue")], 4)) == [t["colour=blue"], t["blue"], 0, 0]
  assert list(stats.encode("", 2)) == [0, 0]
  with pytest.raises(ValueError, match="max_terms"):
    stats.encode("colour: red", 0)


def test_save_load_round_trip(tmp_path):
  stats = CorpusStats.from_texts(CORPUS)
  path = tmp_path / "stats.json"
  stats.save(path)
  loaded = CorpusStats.load(path)
  assert loaded.term_to_id == stats.term_to_id
  np.testing.assert_array_equal(loaded.idf, stats.idf)
  assert (loaded.avg_doc_len, loaded.num_docs) == (stats.avg_doc_len, stats.num_docs)
  data = json.loads(path.read_text())
  del data["doc_freq"]
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="doc_freq"):
    CorpusStats.load(path)


def test_corpus_stats_feed_the_loss_bm25():
  """The encoded ids and statistics give the same BM25 on device as a by-hand sum over terms."""
  from afmrl_jax.losses import bm25_scores
  stats = CorpusStats.from_texts(CORPUS)
  q = stats.encode("colour: red", 6)[None]
  d = stats.encode("colour: red; pattern: red dots", 6)[None]
  k1, b, length = 1.2, 0.75, 5
  norm = k1 * (1 - b + b * length / stats.avg_doc_len)
  idf = stats.idf
  expected = (idf[stats.term_to_id["colour=red"]] * 1 * (k1 + 1) / (1 + norm)
              + idf[stats.term_to_id["red"]] * 2 * (k1 + 1) / (2 + norm))
  got = float(bm25_scores(q, d, stats.idf, stats.avg_doc_len)[0, 0])
  assert got == pytest.approx(expected, rel=1e-5)
