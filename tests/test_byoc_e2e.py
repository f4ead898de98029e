"""Bring your own catalog, end to end through the CLI (docs/catalog.md): a folder of product photos and a
CSV -> `launch/csv_to_manifest.py` -> stage 1 training (`python -m afmrl_jax.main`, splits assigned by the
run, a corrupt image skipped and counted) -> the `eval` stage on the trained workdir."""
import csv
import json
import re
import os
import subprocess
import sys
import uuid

from PIL import Image, ImageDraw

from tests.test_main import ROOT, _env

COLOURS = {"red": (200, 40, 40), "navy": (30, 40, 110), "white": (235, 235, 230), "green": (40, 150, 70),
           "tan": (190, 150, 100), "black": (25, 25, 25), "pink": (230, 130, 170)}
MATERIALS = ("mesh", "leather", "canvas", "suede")


def _photo(path, category, colour, listing):
  """A 64x64 'product photo': a sneaker (sole + upper + laces) or a handbag (body + handle), shifted and on
  a slightly different background per listing."""
  bg = (245 - 6 * listing, 242, 238 + 4 * listing)
  im = Image.new("RGB", (64, 64), bg)
  d = ImageDraw.Draw(im)
  dx, dy = 3 * (listing % 3) - 3, 2 * (listing % 2)
  if category == "sneaker":
    d.polygon([(8 + dx, 40 + dy), (20 + dx, 24 + dy), (40 + dx, 26 + dy), (56 + dx, 40 + dy)], fill=colour)
    d.rectangle([6 + dx, 40 + dy, 58 + dx, 46 + dy], fill=(250, 250, 250), outline=(90, 90, 90))
    for x in (24, 29, 34):
      d.line([x + dx, 28 + dy, x + 3 + dx, 34 + dy], fill=(20, 20, 20))
  else:
    d.arc([20 + dx, 8 + dy, 44 + dx, 34 + dy], 180, 360, fill=(60, 40, 20), width=3)
    d.rectangle([14 + dx, 20 + dy, 50 + dx, 52 + dy], fill=colour, outline=(40, 40, 40))
    d.rectangle([29 + dx, 24 + dy, 35 + dx, 28 + dy], fill=(212, 175, 55))  # clasp
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.save(path, "PNG" if path.endswith(".png") else "JPEG", quality=90)


def _catalog(root):
  """images/<category>/<product>/<n>.{jpg,png} and listings.csv; returns (csv path, corrupt image path)."""
  rows, corrupt = [], None
  names = list(COLOURS)
  for p in range(14):
    category = ("sneaker", "handbag")[p % 2]
    pid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"shop.example/product/{p}"))
    colour, material = names[p % len(names)], MATERIALS[(p // 2) % len(MATERIALS)]
    strap = "" if category == "sneaker" else ("crossbody", "top handle")[p % 4 // 2]
    for j in range(3 + p % 2):  # 3-4 listings per product: 49 in all
      n = len(rows) + 17
      rel = f"images/{category}/{pid[:8]}/{j}.{'png' if n % 3 == 0 else 'jpg'}"
      if p == 5 and j == 1:  # garbage bytes with a .jpg name: the trainer must skip and count it
        rel = f"images/{category}/{pid[:8]}/broken.jpg"
        corrupt = os.path.join(root, rel)
        os.makedirs(os.path.dirname(corrupt), exist_ok=True)
        with open(corrupt, "wb") as f:
          f.write(b"\xff\xd8 not really a jpeg " * 8)
      else:
        _photo(os.path.join(root, rel), category, COLOURS[colour], j)
      teacher = f"colour: {colour}; material: {material}" + (f"; strap: {strap}" if strap else "")
      rows.append({"sku": f"SKU-{n:05d}", "product_id": pid, "category": category,
                   "title": f"{colour} {material} {category} #{j}", "image": rel, "colour": colour,
                   "material": material, "strap": strap,
                   "attributes": "" if (p, j) == (2, 0) else teacher})  # one empty attribute string
  path = os.path.join(root, "listings.csv")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path, corrupt


def _run(*args, timeout=240):
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, f"{args[:3]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


def _summary(stdout):
  """The JSON summary main prints last."""
  return json.loads(stdout[stdout.rindex("\n{") + 1:] if not stdout.startswith("{") else stdout)


def test_csv_to_manifest_to_stage1_to_eval(tmp_path):
  data = tmp_path / "shop"
  csv_path, corrupt = _catalog(str(data))
  manifest = str(tmp_path / "manifest" / "manifest.jsonl")
  conv = _run("launch/csv_to_manifest.py", f"--csv={csv_path}", f"--images={data}", f"--out={manifest}",
              "--listing_id_column=sku", "--attribute_columns=colour,material,strap",
              "--teacher_attributes_column=attributes")
  assert "wrote 49 listings of 14 products" in conv.stdout and "skipped 0 row(s)" in conv.stdout
  rows = [json.loads(line) for line in open(manifest)]
  assert rows[0]["listing_id"] == "SKU-00017" and rows[0]["attributes"].startswith("colour: ")
  assert sum("teacher_attributes" not in r for r in rows) == 1  # the empty attribute string

  work, work2 = tmp_path / "W", tmp_path / "W2"
  train = _run("-m", "afmrl_jax.main", "--config=configs/stage1.py:ci", f"--workdir={work}",
               f"--config.catalog.manifest={manifest}", "--config.catalog.skip_bad_rows=True",
               "--config.catalog.eval_share=0.3",
               "--config.pipeline.batch_size=8", "--config.pipeline.eval_batch_size=8",
               "--config.train.num_steps=4", "--config.eval.retriever=exact")
  assert f"catalog {manifest}: train " in train.stdout and "; query " in train.stdout
  summary = _summary(train.stdout)
  assert summary["step"] == 4
  assert summary["catalog_skipped"] == 1
  [reason] = summary["catalog_skipped_reasons"]
  assert "broken.jpg" in reason and "cannot decode" in reason
  assert 0.0 <= summary["eval"]["recall@1"] <= 1.0

  ev = _run("-m", "afmrl_jax.main", "--config=configs/eval.py:ci", f"--workdir={work2}",
            f"--config.checkpoint.restore_dir={work}")
  summary2 = _summary(ev.stdout)
  assert summary2["step"] == 4 and summary2["catalog_skipped"] == 1
  out = work2 / "eval" / "step_4"  # the eval stage writes under the evaluated step
  metrics = json.load(open(out / "metrics.json"))
  assert 0.0 <= metrics["metrics"]["recall@1"] <= 1.0 and metrics["metrics"]["num_queries"] >= 1
  assert metrics["catalog_skipped"] == 1 and "broken.jpg" in metrics["catalog_skipped_reasons"][0]
  md = open(out / "metrics.md").read()
  assert "1 manifest row(s) skipped" in md and "broken.jpg" in md
  assert re.search(r"listing SKU-\d{5} · product", open(out / "queries.html").read())  # the user's ids
  trained = json.load(open(work / "eval" / "metrics.json"))
  assert trained["catalog_skipped"] == 1


def test_csv_to_manifest_reports_unusable_rows_and_writes_parquet(tmp_path):
  from afmrl_jax.data import manifest as manifest_lib
  _photo(str(tmp_path / "img" / "a.jpg"), "sneaker", (200, 40, 40), 0)
  _photo(str(tmp_path / "img" / "b.png"), "handbag", (30, 40, 110), 1)
  lines = ["sku,pid,category,title,image,colour,attrs",
           "SKU-1,p-1,sneaker,red runner,a.jpg,red,upper: mesh",
           "SKU-2,p-2,handbag,navy tote,b.png,,",
           "SKU-3,p-2,handbag,navy tote,missing.jpg,navy,",  # no such image
           ",p-3,handbag,no sku,b.png,navy,",  # empty listing id
           "SKU-1,p-1,sneaker,repeat,a.jpg,red,"]  # repeated listing id
  (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
  out = str(tmp_path / "m" / "manifest.parquet")
  proc = _run("launch/csv_to_manifest.py", f"--csv={tmp_path / 'l.csv'}", f"--images={tmp_path / 'img'}",
              f"--out={out}", "--listing_id_column=sku", "--product_id_column=pid",
              "--attribute_columns=colour", "--teacher_attributes_column=attrs")
  assert "wrote 2 listings of 2 products" in proc.stdout and "skipped 3 row(s)" in proc.stdout
  assert "line 4: image" in proc.stderr and "line 5: empty sku" in proc.stderr
  assert "line 6: listing id 'SKU-1' already used on line 2" in proc.stderr
  report = manifest_lib.read_manifest(out)
  assert [r.listing_key for r in report.rows] == ["SKU-1", "SKU-2"] and not report.skipped
  assert report.rows[0].attributes == "colour: red" and report.rows[0].teacher_attributes == "upper: mesh"
  assert report.rows[1].attributes == "" and report.categories == ("handbag", "sneaker")
  bad = subprocess.run([sys.executable, "launch/csv_to_manifest.py", f"--csv={tmp_path / 'l.csv'}",
                        f"--out={out}", "--category_column=kind"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 1 and "no column(s) listing_id, product_id, kind; the header has sku" in bad.stderr
