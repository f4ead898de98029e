"""Contact sheet of the synthetic catalog: one sibling family per row, each sibling's listings side by side.

    python -m afmrl_jax.data.contact_sheet --out=docs/contact_sheet.png

Lets a person check what the method must learn: siblings (columns groups, labelled with the one attribute
that differs) must be distinguishable, and listings of one product must vary.
"""
from __future__ import annotations

import argparse
import collections

from PIL import Image, ImageDraw

from afmrl_jax.data import catalog as catalog_lib


def contact_sheet(cat: catalog_lib.Catalog, *, per_product: int = 3, siblings: int = 4, zoom: int = 2,
                  families_per_category: int = 1) -> Image.Image:
  """PIL image: rows = families (first ones of each category with >= 3 siblings), columns = listings."""
  by_family = collections.defaultdict(lambda: collections.defaultdict(list))
  for l in cat.listings:
    if not cat.products[l.product_id].is_duplicate:
      by_family[(l.category, l.family_id)][l.product_id].append(l)
  rows, labels = [], []
  shown = collections.Counter()
  for (category, _), prods in by_family.items():
    if shown[category] >= families_per_category or len(prods) < min(3, siblings):
      continue
    shown[category] += 1
    pids = list(prods)[:siblings]
    attrs = [cat.products[p].attributes for p in pids]
    vary = next(k for k in attrs[0] if attrs[1][k] != attrs[0][k])
    labels.append([f"{category}: {vary}={a[vary]}" for a in attrs])
    rows.append([[l.image for l in prods[p][:per_product]] for p in pids])
  s = cat.listings[0].image.shape[0] * zoom
  gap, label_h = 8, 14
  width = siblings * (per_product * s + gap)
  sheet = Image.new("RGB", (width, len(rows) * (s + label_h + gap)), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for r, (row, lab) in enumerate(zip(rows, labels)):
    y = r * (s + label_h + gap)
    for g, (imgs, text) in enumerate(zip(row, lab)):
      x = g * (per_product * s + gap)
      draw.text((x + 2, y), text, fill=(0, 0, 0))
      for j, img in enumerate(imgs):
        tile = Image.fromarray(img).resize((s, s), Image.NEAREST)
        sheet.paste(tile, (x + j * s, y + label_h))
  return sheet


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="docs/contact_sheet.png")
  ap.add_argument("--families", type=int, default=2, help="families per category")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  cat = catalog_lib.generate_catalog(catalog_lib.CatalogConfig(seed=args.seed, families_per_category=6, num_workers=0))
  contact_sheet(cat, families_per_category=args.families).save(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
