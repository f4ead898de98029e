"""How the false-negative filters of hard-negative mining behave on the embedded catalog's training split.

  python launch/mining_filters.py --out /tmp/mining_filters.json            # preset `tiny`, pixel embedding
  python launch/mining_filters.py --workdir /tmp/stage1 --out ...          # a trained stage-1 model instead

Every training listing is a query and a candidate: it mines its `--num_mined` nearest listings of other
product ids (`afmrl_jax.retrieval.mining.mine`). Among those, the listings of the same *true* item under
another product id (the catalog's relisted duplicates) are the false negatives a filter should drop. For
each rule the table gives how many mined negatives it drops, how many of those are true duplicates
(precision) and how many of the mined true duplicates it drops (recall), plus the time of one mining pass.

Embeddings: without `--workdir`, a fixed Gaussian random projection of the mean-centred pixels (an
untrained stand-in: near neighbours are look-alike photos); with `--workdir`, the stage-1 model saved
there embeds each listing on the query side (queries) and on the candidate side (candidates). Attribute rules: `attribute` uses the teacher's strings
(what training reads, noisy: dropped and wrong values), `attribute_true` the ground-truth attributes (an
oracle). The `score` rule compares with the query's mean similarity to the other listings of its product.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pixel_embedding(images: np.ndarray, dim: int, seed: int) -> np.ndarray:
  """uint8 [N, H, W, 3] -> float32 [N, dim]: mean-centred pixels times a fixed Gaussian matrix."""
  x = images.reshape(len(images), -1).astype(np.float32) / 255.0
  x -= x.mean(axis=0, keepdims=True)
  proj = np.random.default_rng(seed).normal(size=(x.shape[1], dim)).astype(np.float32) / np.sqrt(dim)
  return x @ proj


def model_embedding(workdir: str, listing_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The stage-1 model saved in `workdir` embeds the training listings on the query side and on the
  candidate side (as the loss pairs them): two float32 [N, D] arrays in the order of `listing_ids`."""
  from afmrl_jax import parallel
  from afmrl_jax.train import model as builders, checkpointing
  from afmrl_jax.config import schema
  from afmrl_jax.eval import embed as embed_lib
  from afmrl_jax.train import catalog as catalog_lib
  from afmrl_jax.stages.stage1 import data as stage1_data, objective as stage1_step
  from afmrl_jax.eval.embed import embed_all
  run = schema.load_saved(workdir)
  mesh = parallel.make_mesh(run.mesh)
  data = stage1_data.make(run, workdir)
  model, step = builders.restore_model(run, checkpointing.checkpoint_dir(workdir), data.tokenizer, mesh)
  print(f"model: {workdir} at step {step}", flush=True)
  embed_fn = embed_lib.make_embed_fn((model.graphdef, model.params, model.rest), mesh, data.image_grid_thw,
                                       run.pipeline.eval_batch_size)
  sides = []
  for side in ("query", "candidate"):
    out = embed_all(embed_fn, data.eval_batches("train", side), f"train ({side})")
    row = {int(l): i for i, l in enumerate(out["listing_id"])}
    sides.append(out["embeddings"][[row[int(l)] for l in listing_ids]])
  return sides[0], sides[1]


def rule_rows(mined, inputs_by_source, positive, margins, mining):
  """{row name: keep mask [Q, M]} of every rule and combination the table reports."""
  rows = {"none": mining.keep_all(mined, None, None)}
  for source, inputs in inputs_by_source.items():
    rows[source] = mining.FILTERS["attribute"](mined, inputs, mining.FilterConfig(("attribute",)))
  for margin in margins:
    config = mining.FilterConfig(("score",), margin=margin)
    rows[f"score(margin={margin:g})"] = mining.FILTERS["score"](
        mined, mining.FilterInputs(positive_scores=positive), config)
  first = min(margins, key=abs)
  rows[f"attribute+score(margin={first:g})"] = rows["attribute"] & rows[f"score(margin={first:g})"]
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="tiny", help="configs/stage1.py preset whose catalog is read (no --workdir)")
  ap.add_argument("--cache_dir", default="", help="catalog cache (default: $TMPDIR/afmrl_mining_cache)")
  ap.add_argument("--workdir", default="", help="a trained stage-1 workdir: embed with its model")
  ap.add_argument("--num_mined", type=int, default=16)
  ap.add_argument("--dim", type=int, default=128, help="width of the random projection")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--margins", default="-0.1,0,0.05,0.1", help="margins of the score rule")
  ap.add_argument("--positive", default="mean", choices=("mean", "max"))
  ap.add_argument("--backend", default="auto", choices=("auto", "exact", "scann"))
  ap.add_argument("--out", default="", help="write the results as JSON here")
  args = ap.parse_args()

  import configs.stage1 as stage1_configs
  from afmrl_jax.attributes.bm25 import CorpusStats
  from afmrl_jax.retrieval import mining
  from afmrl_jax.config import schema
  from afmrl_jax.eval import embed as embed_lib
  from afmrl_jax.train import catalog as catalog_lib
  from afmrl_jax.stages.stage1 import data as stage1_data

  t0 = time.perf_counter()
  if args.workdir:  # the trained run's own catalog
    run, root, source = schema.load_saved(args.workdir), args.workdir, args.workdir
  else:
    config = stage1_configs.get_config(args.preset)
    config.catalog.cache_dir = args.cache_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "afmrl_mining_cache")
    run, root, source = schema.parse(config), config.catalog.cache_dir, f"preset {args.preset}"
  catalog, _, teacher_stats = catalog_lib.load_catalog(run, root)
  train = catalog.split("train")
  print(f"catalog ({source}): {len(train)} training listings, {time.perf_counter() - t0:.1f} s", flush=True)

  product = np.array([l.product_id for l in train], np.int64)
  true_product = np.array([l.true_product_id for l in train], np.int64)
  listing_ids = np.array([l.listing_id for l in train], np.int64)
  if args.workdir:
    q_emb, c_emb = model_embedding(args.workdir, listing_ids)
    embedding = f"stage-1 model ({args.workdir})"
  else:
    q_emb = c_emb = pixel_embedding(np.stack([l.image for l in train]), args.dim, args.seed)
    embedding = f"pixels->random projection [{args.dim}]"

  m = args.num_mined
  t0 = time.perf_counter()
  mined = mining.mine(q_emb, c_emb, product, product, m, backend=args.backend, step=0)
  mine_s = time.perf_counter() - t0
  backend = mining.choose_backend(args.backend, len(c_emb))
  recall_vs_exact = None
  if backend != "exact":  # how much of the exact table the approximate one finds
    exact = mining.mine(q_emb, c_emb, product, product, m, backend="exact").table
    recall_vs_exact = float(np.mean([len(set(a) & set(b) - {-1}) / max(len(set(b) - {-1}), 1)
                                     for a, b in zip(mined.table.tolist(), exact.tolist())]))

  max_terms = run.pipeline.max_terms
  true_stats = CorpusStats.from_texts([l.product_attributes for l in train])
  terms = {"attribute": teacher_stats.encode_batch([l.teacher_attributes for l in train], max_terms),
           "attribute_true": true_stats.encode_batch([l.product_attributes for l in train], max_terms)}
  inputs_by_source = {name: mining.FilterInputs(query_terms=t, cand_terms=t) for name, t in terms.items()}
  positive = mining.positive_scores(q_emb, c_emb, product, product, args.positive, query_rows=np.arange(len(c_emb)))
  margins = [float(x) for x in args.margins.split(",") if x.strip()]
  t0 = time.perf_counter()
  rows = rule_rows(mined, inputs_by_source, positive, margins, mining)
  filter_s = time.perf_counter() - t0

  dup = mining.true_duplicates(mined.table, product, true_product, product, true_product)
  quality = mining.filter_quality(rows, mined.valid, dup)
  # How many duplicate listings exist for the queries at all (same true item, other product id).
  own_true = mining.own_product_counts(true_product, true_product)
  own_product = mining.own_product_counts(product, product)
  existing = int((own_true - own_product).sum())
  valid = int(mined.valid.sum())

  result = {
      "catalog": source, "embedding": embedding, "backend": backend, "queries": len(q_emb),
      "candidates": len(c_emb), "num_mined": m, "mined": valid, "positive": args.positive,
      "mine_s": mine_s, "filters_s": filter_s, "recall_vs_exact": recall_vs_exact,
      "queries_with_duplicates": int(((own_true - own_product) > 0).sum()),
      "duplicate_pairs_existing": existing, "duplicates_mined": int(dup.sum()),
      "queries_with_mined_duplicate": int(dup.any(axis=1).sum()),
      "mean_positive_score": float(np.nanmean(positive)),
      "mean_mined_score": float(mined.scores[mined.valid].mean()),
      "rules": {name: dict(q, dropped_share=q["dropped"] / max(valid, 1)) for name, q in quality.items()},
  }
  print(f"\n{len(q_emb)} queries x {m} mined ({embedding}, {backend}): one mining pass {mine_s:.2f} s, "
        f"all filters {filter_s:.3f} s" + ("" if recall_vs_exact is None else
                                           f"; recall against exact mining {recall_vs_exact:.3f}"))
  print(f"{result['duplicates_mined']} of the {valid} mined negatives are relisted duplicates of their query "
        f"({result['queries_with_mined_duplicate']} queries; {existing} duplicate (query, listing) pairs exist)")
  print(f"\n| rule | dropped | share of mined | true duplicates dropped | precision | recall |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, q in result["rules"].items():
    print(f"| {name} | {q['dropped']} | {q['dropped_share']:.1%} | {q['true_dropped']} | "
          f"{q['precision']:.3f} | {q['recall']:.3f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
