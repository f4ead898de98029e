"""Attribute-quality metrics on hand-made strings (values worked out by hand in the comments)."""

import pytest

from afmrl_jax.attributes.quality import attribute_quality


def test_per_key_precision_recall_f1_exact_and_malformed():
  predicted = [
      "colour: red; neckline: v-neck",    # colour right, neckline wrong
      "colour: Blue ; sleeve: long",      # both right (canonicalised), `neckline` missing
      "colour red",                        # malformed: no pair at all
      "colour: green; neckline: round",   # exact match
  ]
  truth = [
      "colour: red; neckline: round",
      "colour: blue; sleeve: long; neckline: square",
      "colour: black",
      "neckline: round; colour: green",
  ]
  q = attribute_quality(predicted, truth)
  # colour: predicted in rows 0, 1, 3 (3), right in 0, 1, 3 (3), in the truth of all 4 rows.
  assert q["per_key"]["colour"] == pytest.approx({"precision": 1.0, "recall": 0.75, "f1": 6 / 7, "support": 4})
  # neckline: predicted in rows 0, 3 (2), right in 3 (1), in the truth of rows 0, 1, 3 (3).
  assert q["per_key"]["neckline"] == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4, "support": 3})
  assert q["per_key"]["sleeve"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1})
  # micro: TP 3 + 1 + 1 = 5 of 6 predicted and 8 reference pairs.
  assert q["micro_precision"] == pytest.approx(5 / 6)
  assert q["micro_recall"] == pytest.approx(5 / 8)
  assert q["micro_f1"] == pytest.approx(2 * (5 / 6) * (5 / 8) / (5 / 6 + 5 / 8))
  assert q["exact_match"] == pytest.approx(0.25)
  assert q["malformed_rate"] == pytest.approx(0.25)
  assert q["mean_keys"] == pytest.approx((2 + 2 + 0 + 2) / 4)


def test_empty_and_misaligned_inputs():
  q = attribute_quality([], [])
  assert q["micro_f1"] == 0.0 and q["num_rows"] == 0
  with pytest.raises(ValueError, match="2 predictions for 1 references"):
    attribute_quality(["a: b", "c: d"], ["a: b"])


def test_group_agreement_counts_shared_keys_within_groups():
  from afmrl_jax.attributes.quality import group_agreement
  texts = ["colour: red; size: m", "colour: red; size: l", "colour: blue", "colour: green; fit: slim"]
  # group 0: one pair, shared keys colour (agree) and size (differ) -> 1 of 2; group 1: one pair, shared
  # key colour (differ) -> 0 of 1. Total 1 of 3.
  assert group_agreement(texts, [0, 0, 1, 1]) == pytest.approx(1 / 3)
  assert group_agreement(texts, [0, 1, 2, 3]) == 0.0
