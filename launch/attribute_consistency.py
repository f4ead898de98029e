"""How generated attributes look to retrieval: accuracy on the key that tells siblings apart, and
agreement between the listings of one product (evaluation splits of the embedded catalog).

  python launch/attribute_consistency.py --catalog_cache /tmp/sft/data_cache \\
      --attributes /tmp/gen/generated/attributes.jsonl

Prints, for the teacher's strings and for the file's: the share of listing pairs of one product whose
values agree on the keys both name, the share of same-product and of sibling pairs with identical strings,
and (for the file) how often the value of the sibling-distinguishing key is right.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afmrl_jax.attributes.parse import parse_attributes  # noqa: E402
from afmrl_jax.config import schema  # noqa: E402
from afmrl_jax.train import catalog as catalog_lib


def _pairs(text: str) -> dict[str, str]:
  return dict(parse_attributes(text).pairs)


def _agreement(groups, source) -> tuple[float, float]:
  """(key-value agreement over shared keys, identical-string share) over all pairs within each group."""
  agree = keys = same = total = 0
  for group in groups:
    for a, b in itertools.combinations(group, 2):
      va, vb = _pairs(source(a)), _pairs(source(b))
      shared = set(va) & set(vb)
      agree += sum(va[k] == vb[k] for k in shared)
      keys += len(shared)
      same += va == vb
      total += 1
  return agree / max(keys, 1), same / max(total, 1)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--catalog_cache", required=True, help="catalog.cache_dir of the run that generated")
  ap.add_argument("--attributes", required=True, help="the generate stage's attributes.jsonl")
  ap.add_argument("--preset", default="tiny")
  args = ap.parse_args()
  import configs.stage1 as stage1_configs
  from afmrl_jax.stages.stage1 import data as stage1_data
  config = stage1_configs.get_config(args.preset)
  config.catalog.cache_dir = args.catalog_cache
  catalog, _, _ = catalog_lib.load_catalog(schema.parse(config), args.catalog_cache)
  generated = {r["listing_id"]: r["attributes"] for r in map(json.loads, open(args.attributes, encoding="utf-8"))}
  listings = [l for l in catalog.listings if l.split in ("query", "gallery")]
  by_product, by_family = collections.defaultdict(list), collections.defaultdict(dict)
  for l in listings:
    by_product[l.true_product_id].append(l)
    by_family[l.family_id].setdefault(l.true_product_id, l)
  siblings = [list(p) for fam in by_family.values() for p in itertools.combinations(fam.values(), 2)]
  sources = {"teacher": lambda l: l.teacher_attributes, "generated": lambda l: generated[l.listing_id]}
  result = {}
  for name, source in sources.items():
    agree, same_product = _agreement(by_product.values(), source)
    _, same_sibling = _agreement(siblings, source)
    result[name] = {"key_agreement_within_product": agree, "identical_within_product": same_product,
                    "identical_between_siblings": same_sibling}
  right = total = 0
  for a, b in siblings:
    ta, tb = _pairs(a.product_attributes), _pairs(b.product_attributes)
    for listing in (a, b):
      g, t = _pairs(generated[listing.listing_id]), _pairs(listing.product_attributes)
      for key in (k for k in ta if ta[k] != tb.get(k)):
        right += g.get(key) == t[key]
        total += 1
  result["generated"]["distinguishing_key_right"] = right / max(total, 1)
  result["sibling_cases"] = total
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
