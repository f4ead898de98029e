"""Attribute-quality evaluation of a generator: greedy decode on held-out listings, score the strings.

Writes `<workdir>/<output_dir>/metrics.json` (against the ground truth and against the teacher),
`metrics.md` (one row per key, the keys the title never reveals marked) and `examples.html` (image,
title, generated, truth).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from typing import Any

import jax
import numpy as np

from afmrl_jax import parallel
from afmrl_jax.attributes.quality import attribute_quality, group_agreement
from afmrl_jax.config.sections import AttributeEvalOptions




def generate_strings(model, tokenizer, batches, image_grid_thw, mesh, sampling, rng=None
                     ) -> tuple[dict[int, str], set[int], dict]:
  """(listing_id -> generated string, ids cut at max_new_tokens without EOS, timing {'seconds',
  'new_tokens', 'rows', 'no_eos'}) over `batches` (data.generator_data.prompt_batches: this process's
  slices; with several processes the result holds every process's rows, the same on each).

  rng: the sampling key (batch i draws from fold_in(rng, i)); unused when greedy."""
  from afmrl_jax.generate import sampling as sampling_lib
  eos = tuple(sampling.eos_ids)
  rng = jax.random.key(0) if rng is None else rng
  out: dict[int, str] = {}
  cut: set[int] = set()
  stats = {"seconds": 0.0, "new_tokens": 0, "rows": 0, "no_eos": 0}
  for i, batch in enumerate(batches):
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), parallel.logical_rules():
      arrays = parallel.global_batch({k: np.asarray(batch[k]) for k in ("prompt_ids", "prompt_mask",
                                                                         "pixel_values", "listing_id", "valid")},
                                     mesh)
      gen = sampling_lib.generate(model, arrays["prompt_ids"], arrays["prompt_mask"], arrays["pixel_values"],
                                  image_grid_thw, rng=jax.random.fold_in(rng, i), config=sampling)
      # A mesh over several processes: every process decodes every row, the ids travel with their rows.
      tokens, lengths = parallel.gather_rows(gen.tokens), parallel.gather_rows(gen.lengths)
      ids, valid = parallel.gather_rows(arrays["listing_id"]), parallel.gather_rows(arrays["valid"])
    stats["seconds"] += time.perf_counter() - t0
    for lid, ok, toks, n in zip(ids, valid, tokens, lengths):
      if not ok:
        continue
      text, ended = sampling_lib.decode_text(tokenizer, toks, int(n), eos)
      out[int(lid)] = text
      if not ended:
        cut.add(int(lid))
      stats["new_tokens"] += int(n)
      stats["rows"] += 1
      stats["no_eos"] += not ended
  return out, cut, stats


def title_revealed_keys(titles: list[str], truths: list[str]) -> dict[str, float]:
  """key -> share of rows whose title contains the key's true value (what the text alone can tell)."""
  from afmrl_jax.attributes.parse import parse_attributes
  seen: dict[str, list[int]] = {}
  for title, truth in zip(titles, truths):
    low = title.lower()
    for key, value in parse_attributes(truth).pairs:
      c = seen.setdefault(key, [0, 0])
      c[0] += value in low
      c[1] += 1
  return {k: a / b for k, (a, b) in seen.items()}


def headline(metrics: dict[str, Any]) -> dict[str, float]:
  """The few numbers of `evaluate_generator`'s metrics worth a console summary."""
  truth = metrics["vs_truth"]
  return {"f1_vs_truth": truth["micro_f1"], "f1_vs_teacher": metrics["vs_teacher"]["micro_f1"],
          "teacher_f1_vs_truth": metrics["teacher_vs_truth"]["micro_f1"], "exact_match": truth["exact_match"],
          "malformed_rate": truth["malformed_rate"], "no_eos_rate": metrics["no_eos_rate"],
          "mean_keys": truth["mean_keys"], "product_agreement": metrics["product_agreement"],
          "teacher_product_agreement": metrics["teacher_product_agreement"],
          "tokens_per_s": metrics["tokens_per_s"], "rows": metrics["rows"]}


def _image_tag(image: np.ndarray) -> str:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" width="96">'


def write_reports(out_dir: str, metrics: dict[str, Any], examples: list[dict[str, Any]]) -> None:
  """metrics.json, metrics.md (per-key table) and examples.html."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1, sort_keys=True)
  truth, revealed = metrics["vs_truth"], metrics["title_reveals"]
  lines = ["| key | precision | recall | F1 | support | title shows it |", "|---|---|---|---|---|---|"]
  for key, m in sorted(truth["per_key"].items(), key=lambda kv: -kv[1]["f1"]):
    lines.append(f"| {key} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} | "
                 f"{revealed.get(key, 0.0):.2f} |")
  head = (f"Against the ground truth: micro F1 {truth['micro_f1']:.3f}, exact match {truth['exact_match']:.3f}, "
          f"malformed {truth['malformed_rate']:.3f}, mean keys {truth['mean_keys']:.2f}; against the teacher: "
          f"micro F1 {metrics['vs_teacher']['micro_f1']:.3f}. Values agreeing between listings of one product: "
          f"{metrics['product_agreement']:.3f} (teacher {metrics['teacher_product_agreement']:.3f}). "
          f"{metrics['rows']} listings, "
          f"{metrics['tokens_per_s']:.0f} generated tokens/s.\n\n")
  with open(os.path.join(out_dir, "metrics.md"), "w", encoding="utf-8") as f:
    f.write(head + "\n".join(lines) + "\n")
  rows = "".join(
      f"<tr><td>{_image_tag(e['image'])}</td><td>{html.escape(e['title'])}</td>"
      f"<td>{html.escape(e['generated'])}</td><td>{html.escape(e['truth'])}</td></tr>" for e in examples)
  with open(os.path.join(out_dir, "examples.html"), "w", encoding="utf-8") as f:
    f.write("<html><body><table border=1><tr><th>image</th><th>title</th><th>generated</th><th>truth</th></tr>"
            f"{rows}</table></body></html>")


def evaluate_generator(model, tokenizer, table, data_config, options: AttributeEvalOptions, mesh, workdir: str,
                       sampling) -> dict[str, Any]:
  """Greedy-decodes the first `options.num_rows` listings of `table` and scores them; see the module."""
  from afmrl_jax.data import generator_data
  rows = np.arange(len(table) if not options.num_rows else min(options.num_rows, len(table)))
  batches = generator_data.prompt_batches(table, tokenizer, data_config, rows, with_answers=False)
  generated, _, timing = generate_strings(model, tokenizer, batches, generator_data.image_grid_thw(data_config),
                                          mesh, sampling)
  ids = [int(table.listing_id[i]) for i in rows]
  predicted = [generated[i] for i in ids]
  truths = [table.product_attributes[i] for i in rows]
  metrics = {
      "vs_truth": attribute_quality(predicted, truths),
      "vs_teacher": attribute_quality(predicted, [table.teacher_attributes[i] for i in rows]),
      "teacher_vs_truth": attribute_quality([table.teacher_attributes[i] for i in rows], truths),
      "title_reveals": title_revealed_keys([table.title[i] for i in rows], truths),
      # Do the listings of one product get the same values? (teacher for reference)
      "product_agreement": group_agreement(predicted, [table.true_product_id[i] for i in rows]),
      "teacher_product_agreement": group_agreement([table.teacher_attributes[i] for i in rows],
                                                   [table.true_product_id[i] for i in rows]),
      "rows": len(rows),
      "no_eos_rate": timing["no_eos"] / max(timing["rows"], 1),
      "tokens_per_s": timing["new_tokens"] / max(timing["seconds"], 1e-9),
      "listings_per_s": timing["rows"] / max(timing["seconds"], 1e-9),
  }
  if parallel.is_process_0():
    examples = [dict(image=table.image(i), title=table.title[i], generated=generated[int(table.listing_id[i])],
                     truth=table.product_attributes[i]) for i in rows[:options.num_examples]]
    write_reports(os.path.join(workdir, options.output_dir), metrics, examples)
  return metrics
