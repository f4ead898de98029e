"""Attribute schema of the embedded synthetic catalog.

Every category has an ordered set of attribute keys, each with 3-10 values. Every value is drawn in the
image by `data.render` (some only as small details, which is the point: siblings that differ in a logo
colour or a neckline are the hard negatives the method targets). Titles mention only some of them.
"""
from __future__ import annotations

import types

# Colour names -> RGB. Shared by garment colour, logo colour, sole colour, ...
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 40),
    "navy": (25, 40, 110),
    "black": (25, 25, 28),
    "white": (240, 240, 236),
    "green": (40, 140, 60),
    "yellow": (235, 200, 40),
    "pink": (240, 140, 180),
    "beige": (210, 185, 145),
    "grey": (130, 130, 135),
    "sky blue": (110, 170, 230),
}

# Which garment colours exist (all ten).
_GARMENT = tuple(COLOURS)
_ACCENT = ("white", "black", "red", "yellow", "sky blue")
_PATTERNS = ("solid", "stripes", "dots", "checks", "floral")
_MATERIALS = ("cotton", "denim", "knit", "leather", "silk")

# category -> {key -> values}. Key order is the canonical order used in attribute strings.
SCHEMA: types.MappingProxyType = types.MappingProxyType({
    "tops": {
        "colour": _GARMENT,
        "pattern": _PATTERNS,
        "sleeve": ("sleeveless", "short", "three-quarter", "long"),
        "neckline": ("round", "v-neck", "square", "collar"),
        "material": ("cotton", "knit", "silk"),
        "logo colour": _ACCENT,
        "logo position": ("left chest", "centre", "right chest"),
    },
    "dresses": {
        "colour": _GARMENT,
        "pattern": _PATTERNS,
        "sleeve": ("sleeveless", "short", "long"),
        "neckline": ("round", "v-neck", "square"),
        "length": ("mini", "knee", "midi", "maxi"),
        "belt": ("none", "thin", "wide"),
        "material": ("cotton", "knit", "silk"),
    },
    "trousers": {
        "colour": _GARMENT,
        "pattern": ("solid", "stripes", "checks"),
        "length": ("shorts", "cropped", "full"),
        "fit": ("skinny", "straight", "wide"),
        "pockets": ("none", "side", "patch"),
        "material": ("cotton", "denim", "knit"),
        "waistband": ("plain", "drawstring", "belt loops"),
    },
    "bags": {
        "colour": _GARMENT,
        "shape": ("tote", "satchel", "clutch", "bucket"),
        "handle": ("none", "short", "long strap", "chain"),
        "closure": ("zip", "flap", "buckle", "open"),
        "hardware": ("gold", "silver", "black"),
        "material": ("leather", "cotton", "denim"),
        "logo colour": _ACCENT,
    },
    "shoes": {
        "colour": _GARMENT,
        "style": ("sneaker", "boot", "heel", "loafer"),
        "sole": ("white", "black", "gum"),
        "laces": ("none", "white", "black"),
        "toe": ("round", "pointed", "square"),
        "material": ("leather", "cotton", "knit"),
        "logo colour": _ACCENT,
    },
})

CATEGORIES: tuple[str, ...] = tuple(SCHEMA)

# Metal finishes and sole colours not in COLOURS.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "gold": (212, 175, 55),
    "silver": (192, 192, 200),
    "gum": (170, 110, 60),
}


def rgb(name: str) -> tuple[int, int, int]:
  """RGB of a colour / finish name used anywhere in the schema."""
  if name in COLOURS:
    return COLOURS[name]
  return EXTRA_COLOURS[name]


# Categories of on-disk manifests that are not in SCHEMA: name -> attribute keys. `data.manifest` registers
# them when it reads a manifest, so that code holding only a category name (the generator's instruction,
# `ListingTable`'s category ids under the default category list) knows them. Process-local.
_USER_CATEGORIES: dict[str, tuple[str, ...]] = {}


def register_categories(keys_by_category) -> None:
  """Registers manifest categories ({name: keys}); SCHEMA's own are left as they are. A name registered
  again keeps its id and takes the new keys."""
  for name, keys in keys_by_category.items():
    if name not in SCHEMA:
      _USER_CATEGORIES[name] = tuple(keys)


def category_keys(category: str) -> tuple[str, ...]:
  """Attribute keys of a category: SCHEMA's, a registered manifest category's, else ()."""
  if category in SCHEMA:
    return tuple(SCHEMA[category])
  return _USER_CATEGORIES.get(category, ())


def category_id(category: str, categories: tuple[str, ...] = CATEGORIES) -> int:
  """Integer id of a category; raises naming the unknown category and the known ones.

  Under the default list (`CATEGORIES`), registered manifest categories follow the synthetic five in
  the order they were first registered (ids are labels: same category, same id)."""
  categories = tuple(categories)
  if category in categories:
    return categories.index(category)
  if categories == CATEGORIES and category in _USER_CATEGORIES:
    return len(CATEGORIES) + list(_USER_CATEGORIES).index(category)
  raise ValueError(f"unknown category {category!r}; known categories: {', '.join(categories)}")


def format_pairs(category: str, attrs: dict[str, str]) -> str:
  """`key: value; key: value` in the schema's canonical key order (keys not in the schema go last)."""
  order = list(SCHEMA.get(category, {}))
  keys = [k for k in order if k in attrs] + sorted(k for k in attrs if k not in order)
  return "; ".join(f"{k}: {attrs[k]}" for k in keys)


def parse_pairs(text: str) -> dict[str, str]:
  """Inverse of `format_pairs` for strings this package wrote (strict; use attributes.parse for any text)."""
  out = {}
  for part in text.split(";"):
    part = part.strip()
    if not part:
      continue
    key, sep, value = part.partition(":")
    if not sep:
      raise ValueError(f"not a `key: value` pair: {part!r} in {text!r}")
    out[key.strip()] = value.strip()
  return out


def _check_schema() -> None:
  for cat, keys in SCHEMA.items():
    assert len(keys) >= 5, cat
    for key, values in keys.items():
      assert 3 <= len(values) <= 10, (cat, key)
      assert len(set(values)) == len(values), (cat, key)


_check_schema()
