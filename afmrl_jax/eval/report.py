"""Evaluation report: metrics.json, a markdown table, PNG plots and an HTML page of sample queries.

Plots use matplotlib's Agg backend (no display); images are embedded in the HTML as base64 PNG so the
page is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

HIT, NEAR, MISS = "#1a9850", "#f39c12", "#b0b0b0"  # same product, same category only, other



def _k_of(name: str, prefix: str) -> int | None:
  m = re.fullmatch(re.escape(prefix) + r"@(\d+)", name)
  return int(m.group(1)) if m else None


def recall_curve(metrics: Mapping[str, float], prefix: str = "recall") -> tuple[list[int], list[float]]:
  """(ks, values) of the `<prefix>@k` entries, sorted by k."""
  pairs = sorted((k, v) for name, v in metrics.items() if (k := _k_of(name, prefix)) is not None)
  return [k for k, _ in pairs], [v for _, v in pairs]


def markdown_table(metrics: Mapping[str, float], recall_ks: tuple[int, ...]) -> str:
  """Two tables: the headline row (R@ks, mAP, classification, clustering) and the sizes."""
  head = [f"R@{k}" for k in recall_ks if f"recall@{k}" in metrics]
  vals = [metrics[f"recall@{k}"] for k in recall_ks if f"recall@{k}" in metrics]
  head += [f"group R@{k}" for k in recall_ks if f"group_recall@{k}" in metrics]
  vals += [metrics[f"group_recall@{k}"] for k in recall_ks if f"group_recall@{k}" in metrics]
  for name in sorted(metrics):
    if name.startswith("map@"):
      head.append(f"mAP@{name[4:]} (category)")
      vals.append(metrics[name])
  for name, label in (("knn_accuracy", "kNN acc"), ("centroid_accuracy", "centroid acc"),
                      ("nmi", "NMI"), ("ari", "ARI"), ("purity", "purity")):
    if name in metrics:
      head.append(label)
      vals.append(metrics[name])
  fmt = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(map(fmt, vals)) + " |"]
  sizes = (f"\n\n{int(metrics.get('num_queries', 0))} queries "
           f"({int(metrics.get('num_queries_without_positive', 0))} without a same-product listing in the "
           f"gallery, left out of the instance metrics), "
           f"{int(metrics.get('num_gallery', 0))} gallery listings.\n")
  return "\n".join(lines) + sizes


def skipped_note(info: Mapping[str, Any]) -> str:
  """metrics.md's note of the manifest rows skipped (`catalog_skipped`), or "" when none were."""
  count = int(info.get("catalog_skipped") or 0)
  if not count:
    return ""
  reasons = list(info.get("catalog_skipped_reasons") or ())
  more = [f"... and {count - len(reasons)} more"] if count > len(reasons) else []
  return (f"\n{count} manifest row(s) skipped (config.catalog.skip_bad_rows), not in training or "
          f"evaluation:" + "".join(f"\n- {r}" for r in reasons + more) + "\n")


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_recall_curve(metrics: Mapping[str, float], path: str) -> bool:
  """Instance Recall@K and group Recall@K against K (log-scaled K axis). False if nothing to plot."""
  ks, inst = recall_curve(metrics, "recall")
  gks, group = recall_curve(metrics, "group_recall")
  if not ks:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
  ax.plot(ks, inst, "o-", label="instance Recall@K (any hit)")
  ax.plot(gks, group, "s--", label="group Recall@K (share found)")
  ax.set_xscale("log")
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.minorticks_off()
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("K")
  ax.set_ylabel("recall")
  ax.set_title("Identical-product retrieval")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def load_train_losses(path: str | None, key: str = "loss") -> tuple[np.ndarray, np.ndarray] | None:
  """(steps, values of `key`) from a JSON-lines (or JSON list) file of {"step", "loss", ...} rows.

  Rows without a finite `key` (e.g. eval scalars) are skipped; after a resume a step may appear twice
  and the last row wins. None when the file is missing or holds no such value.
  """
  if not path or not os.path.isfile(path):
    return None
  with open(path) as f:
    text = f.read()
  try:
    rows = json.loads(text)
    rows = rows if isinstance(rows, list) else [rows]
  except json.JSONDecodeError:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  by_step = {}
  for row in rows:
    if isinstance(row, Mapping) and "step" in row and isinstance(row.get(key), (int, float)):
      if math.isfinite(row[key]):
        by_step[int(row["step"])] = float(row[key])
  if not by_step:
    return None
  steps = np.array(sorted(by_step))
  return steps, np.array([by_step[s] for s in steps])


def plot_loss_curve(train_metrics_path: str | None, path: str, key: str = "loss",
                    label: str = "training loss") -> bool:
  """`key` (default the training loss) against step, raw and a moving average. False when the file
  holds none."""
  data = load_train_losses(train_metrics_path, key)
  if data is None:
    return False
  steps, losses = data
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
  few = len(losses) < 30  # short runs: mark the logged points
  ax.plot(steps, losses, "o-" if few else "-", color="#3182bd" if few else "#9ecae1", lw=1, ms=3,
          label=key)
  window = len(losses) // 20
  if window >= 3:  # smoothing a handful of points only hides them
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, color="#08519c", lw=2, label=f"moving average ({window})")
  ax.set_xlabel("step")
  ax.set_ylabel(label)
  ax.set_title(label[0].upper() + label[1:])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def png_base64(image: np.ndarray) -> str:
  """uint8 (or [0, 1] float) [H, W, 3] -> base64 PNG."""
  from PIL import Image

  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")


def _field(record: Any, *names: str) -> Any:
  for name in names:
    value = record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)
    if value is not None:
      return value
  return None


def display_of(side: dict[str, Any], row: int, listings: Mapping[int, Any] | None) -> dict[str, Any]:
  """Title, attributes and image of one row: batch display fields first, then the listings record."""
  shown = {k: v[row] for k, v in side.get("display", {}).items()}
  if listings is not None:
    record = listings.get(int(side["listing_id"][row]))
    if record is not None:
      shown.setdefault("title", _field(record, "title"))
      shown.setdefault("attributes", _field(record, "attributes", "teacher_attributes", "listing_attributes"))
      shown.setdefault("image", _field(record, "image"))
      shown.setdefault("category", _field(record, "category"))
      shown.setdefault("listing_key", _field(record, "listing_key"))
  return shown


def choose_queries(first_hit: np.ndarray, count: int, seed: int) -> np.ndarray:
  """Up to `count` query rows, half (or as many as exist) with a miss at rank 1, the rest hits.

  first_hit: bool [Q], whether rank 1 is the same product. Deterministic in `seed`.
  """
  order = np.random.default_rng(seed).permutation(len(first_hit))
  misses = [int(q) for q in order if not first_hit[q]]
  hits = [int(q) for q in order if first_hit[q]]
  take_miss = min(len(misses), count // 2)
  chosen = misses[:take_miss] + hits[:count - take_miss]
  chosen += misses[take_miss:take_miss + count - len(chosen)]
  return np.array(chosen, dtype=np.int64)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:28px 0 8px}
table.m{border-collapse:collapse;font-size:13px} table.m td,table.m th{border:1px solid #ccc;padding:4px 8px;text-align:center}
table.m th{background:#f3f3f3}
.plots img{height:300px;margin-right:12px;border:1px solid #ddd}
.legend span{display:inline-block;padding:2px 8px;margin-right:8px;border-radius:3px;color:#fff;font-size:12px}
.row{display:flex;gap:14px;align-items:flex-start;border-top:1px solid #ddd;padding:12px 0}
.query{width:250px;flex:none;font-size:13px} .summary{margin-top:4px;font-size:12px} .results{display:flex;gap:10px}
.card{width:128px;font-size:11px;line-height:1.3}
.card img,.query img{width:120px;height:120px;object-fit:contain;image-rendering:pixelated;border:4px solid #ccc;border-radius:4px;background:#fafafa}
.query img{border-color:#333}
.noimg{width:120px;height:120px;border:4px solid #ccc;display:flex;align-items:center;justify-content:center;color:#999}
.title{font-weight:600;margin:4px 0 2px;word-wrap:break-word} .ids{color:#777}
.attrs{margin-top:4px} .attrs span{display:inline-block;background:#eef2f7;border-radius:3px;padding:1px 4px;margin:1px;font-size:11px}
.badge{font-weight:700}
"""


def _category(shown: Mapping[str, Any], category_id: int) -> str:
  return str(shown["category"]) if shown.get("category") else f"category {category_id}"


def _image_tag(image: Any, colour: str | None = None) -> str:
  style = f' style="border-color:{colour}"' if colour else ""
  if image is None:
    return f'<div class="noimg"{style}>no image</div>'
  return f'<img src="data:image/png;base64,{png_base64(image)}"{style}>'


def _attrs_html(text: Any) -> str:
  if not text:
    return ""
  parts = [p.strip() for p in re.split(r"[;\n]", str(text)) if p.strip()]
  return '<div class="attrs">' + "".join(f"<span>{html.escape(p)}</span>" for p in parts) + "</div>"


def queries_html(metrics: Mapping[str, float], table_md: str, plots: Mapping[str, str], query: dict[str, Any],
                 gallery: dict[str, Any], ranked_rows: np.ndarray, scores: np.ndarray,
                 listings: Mapping[int, Any] | None, chosen: np.ndarray, top: int,
                 exclude_self: bool = True) -> str:
  """The self-contained HTML page: metrics table, plots and one row per chosen query."""
  e = html.escape
  md_rows = [line for line in table_md.splitlines() if line.startswith("|") and "---" not in line]
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in md_rows]
  table = ""
  if len(cells) >= 2:
    table = ('<table class="m"><tr>' + "".join(f"<th>{e(c)}</th>" for c in cells[0]) + "</tr><tr>"
             + "".join(f"<td>{e(c)}</td>" for c in cells[1]) + "</tr></table>")
  sizes = e(table_md.split("\n\n", 1)[1].strip()) if "\n\n" in table_md else ""
  plot_html = "".join(
      f'<img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(open(p, "rb").read()).decode()}">'
      for name, p in plots.items())
  out = [f"<!doctype html><html><head><meta charset='utf-8'><title>afmrl_jax evaluation</title>"
         f"<style>{_CSS}</style></head><body>",
         "<h1>Retrieval evaluation</h1>", table, f"<p>{sizes}</p>",
         f'<div class="plots">{plot_html}</div>',
         f"<h2>Sample queries: top {top} results</h2>",
         f'<div class="legend"><span style="background:{HIT}">same product (hit)</span>'
         f'<span style="background:{NEAR}">same category</span>'
         f'<span style="background:{MISS}">other category</span></div>']
  for q in chosen:
    shown = display_of(query, int(q), listings)
    pid, cat = int(query["product_id"][q]), int(query["category_id"][q])
    same = gallery["product_id"] == pid
    if exclude_self:
      same &= gallery["listing_id"] != query["listing_id"][q]
    found = [r for r in range(ranked_rows.shape[1])
             if ranked_rows[q, r] >= 0 and gallery["product_id"][ranked_rows[q, r]] == pid]
    summary = (f"{int(same.sum())} same-product listing(s) in the gallery; "
               + (f"first found at #{found[0] + 1}" if found else f"none in the top {ranked_rows.shape[1]}"))
    out.append('<div class="row"><div class="query">' + _image_tag(shown.get("image"))
               + f'<div class="title">{e(str(shown.get("title") or ""))}</div>'
               + f'<div class="ids">listing {e(str(shown.get("listing_key") or int(query["listing_id"][q])))} · '
               + f'product {pid} · '
               + f'{e(_category(shown, cat))}</div>'
               + _attrs_html(shown.get("attributes")) + f'<div class="summary">{e(summary)}</div>'
               + '</div><div class="results">')
    for r in range(min(top, ranked_rows.shape[1])):
      g = int(ranked_rows[q, r])
      if g < 0:  # no result (an approximate index found fewer): the rest of the row is empty too
        break
      same_product = int(gallery["product_id"][g]) == pid
      colour = HIT if same_product else NEAR if int(gallery["category_id"][g]) == cat else MISS
      badge = "&#10003; hit" if same_product else "&#10007;"
      item = display_of(gallery, g, listings)
      out.append(f'<div class="card">{_image_tag(item.get("image"), colour)}'
                 f'<div><span class="badge" style="color:{colour}">#{r + 1} {badge}</span> '
                 f'score {float(scores[q, r]):.3f}</div>'
                 f'<div class="title">{e(str(item.get("title") or ""))}</div>'
                 f'<div class="ids">{"listing " + e(item["listing_key"]) + " · " if item.get("listing_key") else ""}'
                 f'product {int(gallery["product_id"][g])} · '
                 f'{e(_category(item, int(gallery["category_id"][g])))}</div></div>')
    out.append("</div></div>")
  out.append("</body></html>")
  return "\n".join(out)


def write_report(out_dir: str, metrics: Mapping[str, float], cfg: Any, *, query: dict[str, Any],
                 gallery: dict[str, Any], ranked_rows: np.ndarray, scores: np.ndarray,
                 listings: Mapping[int, Any] | None, train_metrics_path: str | None,
                 info: Mapping[str, Any] | None = None) -> dict[str, str]:
  """Writes metrics.md, recall_at_k.png, loss_curve.png (if a loss exists) and queries.html.

  `info`'s `catalog_skipped` / `catalog_skipped_reasons` (manifest rows skipped) are noted in metrics.md.

  Returns {name: path} of what was written.
  """
  written = {}
  table_md = markdown_table(metrics, tuple(cfg.recall_ks))
  written["metrics.md"] = os.path.join(out_dir, "metrics.md")
  with open(written["metrics.md"], "w") as f:
    f.write("# Retrieval evaluation\n\n" + table_md + skipped_note(info or {}))
  plots = {}
  path = os.path.join(out_dir, "recall_at_k.png")
  if plot_recall_curve(metrics, path):
    plots["recall_at_k.png"] = written["recall_at_k.png"] = path
  path = os.path.join(out_dir, "loss_curve.png")
  if plot_loss_curve(train_metrics_path, path):
    plots["loss_curve.png"] = written["loss_curve.png"] = path
  first_hit = (ranked_rows[:, 0] >= 0) & (gallery["product_id"][ranked_rows[:, 0]] == query["product_id"])
  chosen = choose_queries(first_hit, int(cfg.num_report_queries), int(cfg.seed))
  page = queries_html(metrics, table_md, plots, query, gallery, ranked_rows, scores, listings, chosen,
                      int(cfg.report_top), bool(cfg.exclude_self))
  written["queries.html"] = os.path.join(out_dir, "queries.html")
  with open(written["queries.html"], "w") as f:
    f.write(page)
  return written
