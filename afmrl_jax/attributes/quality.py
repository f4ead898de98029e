"""Quality of generated attribute strings against reference strings: per-key precision / recall / F1.

For key k, a row's prediction is a true positive when both strings have k with the same canonical
value; precision_k = TP_k / rows predicting k, recall_k = TP_k / rows whose reference has k. `micro_*`
pool every key. `exact_match` is the share of rows whose canonical pair sets are equal, `malformed_rate`
the share the parser flags (`attributes.parse`), `mean_keys` the mean number of distinct keys predicted.
`group_agreement` says how consistent strings are within groups (a product's listings).
"""

from __future__ import annotations

from collections.abc import Sequence

from afmrl_jax.attributes.parse import parse_attributes


def _as_dict(pairs) -> dict[str, str]:
  out: dict[str, str] = {}
  for key, value in pairs:
    out.setdefault(key, value)  # the first value of a repeated key counts
  return out


def _ratio(num: float, den: float) -> float:
  return num / den if den else 0.0


def _f1(p: float, r: float) -> float:
  return 2 * p * r / (p + r) if p + r else 0.0


def attribute_quality(predicted: Sequence[str], reference: Sequence[str]) -> dict:
  """{'per_key': {key: {precision, recall, f1, support}}, micro_precision, micro_recall, micro_f1,
  exact_match, malformed_rate, mean_keys, num_rows} for row-aligned string lists."""
  if len(predicted) != len(reference):
    raise ValueError(f"attribute_quality: {len(predicted)} predictions for {len(reference)} references")
  counts: dict[str, list[int]] = {}  # key -> [tp, predicted, reference]
  exact = malformed = keys = 0
  for pred_text, ref_text in zip(predicted, reference):
    parsed = parse_attributes(pred_text)
    pred, ref = _as_dict(parsed.pairs), _as_dict(parse_attributes(ref_text).pairs)
    malformed += parsed.malformed
    exact += pred == ref
    keys += len(pred)
    for key in set(pred) | set(ref):
      c = counts.setdefault(key, [0, 0, 0])
      c[0] += key in pred and key in ref and pred[key] == ref[key]
      c[1] += key in pred
      c[2] += key in ref
  per_key = {}
  for key, (tp, n_pred, n_ref) in sorted(counts.items()):
    p, r = _ratio(tp, n_pred), _ratio(tp, n_ref)
    per_key[key] = {"precision": p, "recall": r, "f1": _f1(p, r), "support": n_ref}
  tp, n_pred, n_ref = (sum(c[i] for c in counts.values()) for i in range(3))
  mp, mr = _ratio(tp, n_pred), _ratio(tp, n_ref)
  n = len(predicted)
  return {"per_key": per_key, "micro_precision": mp, "micro_recall": mr, "micro_f1": _f1(mp, mr),
          "exact_match": _ratio(exact, n), "malformed_rate": _ratio(malformed, n),
          "mean_keys": _ratio(keys, n), "num_rows": n}


def group_agreement(texts: Sequence[str], groups: Sequence[int]) -> float:
  """Share of key values that agree between two strings of the same group (e.g. the listings of one
  product), over every pair within a group and the keys both strings name; 0 without such pairs.

  Retrieval needs it as much as accuracy: values that change from one listing of a product to the next
  pull the product's listings apart."""
  if len(texts) != len(groups):
    raise ValueError(f"group_agreement: {len(texts)} strings for {len(groups)} group ids")
  by_group: dict[int, list[dict[str, str]]] = {}
  for text, group in zip(texts, groups):
    by_group.setdefault(int(group), []).append(_as_dict(parse_attributes(text).pairs))
  agree = shared = 0
  for members in by_group.values():
    for i in range(len(members)):
      for j in range(i + 1, len(members)):
        keys = set(members[i]) & set(members[j])
        agree += sum(members[i][k] == members[j][k] for k in keys)
        shared += len(keys)
  return _ratio(agree, shared)
