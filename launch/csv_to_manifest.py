"""A CSV of product listings + a folder of images -> a manifest (docs/catalog.md, "Bring your own catalog").

    python launch/csv_to_manifest.py --csv=listings.csv --images=photos/ --out=data/manifest.jsonl \
        --attribute_columns=colour,material --teacher_attributes_column=attributes

One CSV row per listing (a photo of a product). Columns, renamed with the flags: `listing_id` (SKU, unique),
`product_id` (listings of one product share it), `category`, `title`, `image` (path relative to --images,
default the CSV's folder). Optional: each of --attribute_columns becomes a `column: value` pair of the
manifest's `attributes` (empty cells are left out); --teacher_attributes_column names a column already
holding `key: value; ...` strings (-> `teacher_attributes`); --family_column and --split_column are copied.

Output: JSONL, or Parquet when --out ends in .parquet (needs pyarrow). Image paths are written relative to
the manifest's folder. Rows that cannot be used (an empty required cell, a missing image file, a repeated
listing id) are reported and left out, with a count at the end; images are not decoded here (a corrupt file
is for the trainer's `--config.catalog.skip_bad_rows=True`). Exit status 1 when no row is usable.
"""
import argparse
import csv
import json
import os
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--csv", required=True, help="the listings CSV (header row required)")
  p.add_argument("--out", required=True, help="manifest path: .jsonl, or .parquet for Parquet")
  p.add_argument("--images", default=None, help="folder the image column is relative to (default: the CSV's)")
  for field in ("listing_id", "product_id", "category", "title", "image"):
    p.add_argument(f"--{field}_column", default=field, help=f"CSV column of the manifest's `{field}`")
  p.add_argument("--attribute_columns", default="", help="comma-separated columns -> `attributes` pairs")
  p.add_argument("--teacher_attributes_column", default="",
                 help="column holding `key: value; ...` strings -> `teacher_attributes`")
  p.add_argument("--family_column", default="", help="optional column -> `family_id`")
  p.add_argument("--split_column", default="", help="optional column -> `split` (train/gallery/query/heldout)")
  p.add_argument("--delimiter", default=",")
  return p.parse_args(argv)


def convert(args) -> tuple[list[dict], list[str]]:
  """(manifest rows, reasons for the CSV rows left out)."""
  images = os.path.abspath(args.images or os.path.dirname(os.path.abspath(args.csv)))
  out_dir = os.path.dirname(os.path.abspath(args.out))
  required = {f: getattr(args, f"{f}_column") for f in ("listing_id", "product_id", "category", "title", "image")}
  attr_cols = [c.strip() for c in args.attribute_columns.split(",") if c.strip()]
  optional = {"teacher_attributes": args.teacher_attributes_column, "family_id": args.family_column,
              "split": args.split_column}
  rows, bad, seen = [], [], {}
  with open(args.csv, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f, delimiter=args.delimiter)
    header = reader.fieldnames or []
    wanted = list(required.values()) + attr_cols + [c for c in optional.values() if c]
    missing = [c for c in wanted if c not in header]
    if missing:  # a wrong flag, not a bad row: stop
      sys.exit(f"{args.csv}: no column(s) {', '.join(missing)}; the header has {', '.join(header)}")
    for n, rec in enumerate(reader, start=2):  # line 1 is the header
      where = f"{args.csv}, line {n}"
      cells = {f: (rec.get(c) or "").strip() for f, c in required.items()}
      empty = [required[f] for f, v in cells.items() if not v and f != "title"]
      if empty:
        bad.append(f"{where}: empty {', '.join(empty)}")
        continue
      image = os.path.join(images, cells["image"])
      if not os.path.isfile(image):
        bad.append(f"{where}: image {image} does not exist")
        continue
      if cells["listing_id"] in seen:
        bad.append(f"{where}: listing id {cells['listing_id']!r} already used on line {seen[cells['listing_id']]}")
        continue
      seen[cells["listing_id"]] = n
      row = dict(cells, image=os.path.relpath(image, out_dir))
      pairs = [f"{c}: {(rec.get(c) or '').strip()}" for c in attr_cols if (rec.get(c) or "").strip()]
      if pairs:
        row["attributes"] = "; ".join(pairs)
      for field, column in optional.items():
        value = (rec.get(column) or "").strip() if column else ""
        if value:
          row[field] = value
      rows.append(row)
  return rows, bad


def write(rows: list[dict], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = list(dict.fromkeys(k for r in rows for k in r))  # a row without a field gets null
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in columns])), path)
  else:
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv=None) -> int:
  args = parse_args(argv)
  rows, bad = convert(args)
  for reason in bad:
    print(f"skipped: {reason}", file=sys.stderr)
  if rows:
    write(rows, args.out)
  products = len({r["product_id"] for r in rows})
  print(f"wrote {len(rows)} listings of {products} products to {args.out}; skipped {len(bad)} row(s)")
  return 0 if rows else 1


if __name__ == "__main__":
  sys.exit(main())
