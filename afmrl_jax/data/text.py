"""Listing text of the synthetic catalog: seller titles and noisy teacher attribute strings.

Titles mention only some attributes (the rest are visible only in the image), with synonyms and seller
noise words, as marketplace titles do. Teacher strings stand in for a large VLM's attribute output: the
true attributes with some keys dropped and some values wrong.
"""
from __future__ import annotations

import numpy as np

from afmrl_jax.data import schema

NOUNS = {
    "tops": ("top", "tee", "blouse", "shirt", "t-shirt"),
    "dresses": ("dress", "frock", "sundress", "gown"),
    "trousers": ("trousers", "pants", "slacks", "jeans"),
    "bags": ("bag", "handbag", "purse", "shoulder bag"),
    "shoes": ("shoes", "footwear", "kicks", "pumps"),
}

NOISE_WORDS = ("hot sale", "2026 new", "free shipping", "best seller", "limited", "official store", "in stock",
               "women's", "fashion", "trendy", "korean style", "clearance", "premium", "casual", "gift")

# value -> synonyms (any value not listed is written as is).
VALUE_SYNONYMS = {
    "red": ("red", "scarlet", "crimson"),
    "navy": ("navy", "dark blue", "navy blue"),
    "grey": ("grey", "gray", "charcoal"),
    "beige": ("beige", "camel", "sand"),
    "sky blue": ("sky blue", "light blue", "baby blue"),
    "pink": ("pink", "rose"),
    "solid": ("plain", "solid", "solid colour"),
    "stripes": ("striped", "stripe", "stripy"),
    "dots": ("polka dot", "dotted", "spotty"),
    "checks": ("checked", "plaid", "gingham"),
    "floral": ("floral", "flower print", "blossom"),
    "v-neck": ("v-neck", "v neck", "deep v"),
    "round": ("round", "crew"),
    "sleeveless": ("sleeveless", "tank"),
    "three-quarter": ("three-quarter", "3/4"),
}

# key -> phrase templates for the value (first `{v}` is the synonym). Values listed in `SPECIAL` override.
KEY_TEMPLATES = {
    "colour": ("{v}",),
    "pattern": ("{v}",),
    "sleeve": ("{v} sleeve", "{v}-sleeved"),
    "neckline": ("{v} neck", "{v} neckline", "{v} collar"),
    "material": ("{v}", "{v} fabric"),
    "logo colour": ("{v} logo", "with {v} logo"),
    "logo position": ("logo on {v}", "{v} logo"),
    "length": ("{v}", "{v} length"),
    "belt": ("{v} belt", "with {v} belt"),
    "fit": ("{v} fit", "{v}"),
    "pockets": ("{v} pockets",),
    "waistband": ("{v} waist", "{v} waistband"),
    "shape": ("{v}",),
    "handle": ("{v} handle",),
    "closure": ("{v} closure", "{v} top"),
    "hardware": ("{v} hardware", "{v}-tone"),
    "style": ("{v}", "{v} style"),
    "sole": ("{v} sole", "{v} outsole"),
    "laces": ("{v} laces", "{v} laced"),
    "toe": ("{v} toe", "{v}-toe"),
}
SPECIAL = {
    ("neckline", "collar"): ("collared", "shirt collar"),
    ("belt", "none"): ("beltless", "no belt"),
    ("pockets", "none"): ("no pockets", "pocketless"),
    ("handle", "none"): ("handle-free", "no handle"),
    ("handle", "long strap"): ("long strap", "crossbody strap"),
    ("laces", "none"): ("slip-on", "laceless"),
    ("closure", "open"): ("open top", "no closure"),
    ("logo position", "centre"): ("centre logo", "logo in the middle"),
    ("waistband", "belt loops"): ("belt loops", "with belt loops"),
}


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def phrase(rng: np.random.Generator, key: str, value: str) -> str:
  """One title phrase for `key: value`, with a random synonym / template."""
  if (key, value) in SPECIAL:
    return _pick(rng, SPECIAL[(key, value)])
  v = _pick(rng, VALUE_SYNONYMS.get(value, (value,)))
  return _pick(rng, KEY_TEMPLATES.get(key, ("{v} " + key,))).format(v=v)


def make_title(rng: np.random.Generator, category: str, attrs: dict[str, str], reveal_share: float,
               noise_rate: float) -> str:
  """Seller title mentioning each attribute with probability `reveal_share` (at least one), plus noise."""
  keys = [k for k in schema.SCHEMA[category] if k in attrs]
  shown = [k for k in keys if rng.random() < reveal_share]
  if not shown:
    shown = [keys[int(rng.integers(len(keys)))]]
  order = rng.permutation(len(shown))
  words = [phrase(rng, shown[i], attrs[shown[i]]) for i in order]
  words.append(_pick(rng, NOUNS[category]))
  if rng.random() < noise_rate:
    words.insert(0, _pick(rng, NOISE_WORDS))
  if rng.random() < noise_rate / 2:
    words.append(_pick(rng, NOISE_WORDS))
  return " ".join(words)


def teacher_attributes(rng: np.random.Generator, category: str, attrs: dict[str, str], drop_rate: float,
                       wrong_rate: float) -> str:
  """Noisy teacher output `key: value; ...`: keys dropped with `drop_rate`, values wrong with `wrong_rate`."""
  out = {}
  for key, values in schema.SCHEMA[category].items():
    if key not in attrs or rng.random() < drop_rate:
      continue
    value = attrs[key]
    if rng.random() < wrong_rate:
      others = [v for v in values if v != value]
      value = _pick(rng, others)
    out[key] = value
  return schema.format_pairs(category, out)
