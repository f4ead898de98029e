"""Benchmark: synthetic catalog generation (listings/s) and grain pipeline throughput (batches/s, listings/s).

    python launch/bench_data.py                      # default catalog size (~22k listings at 64x64), 2 workers
    python launch/bench_data.py --families=50 --steps=20   # quick

Prints one JSON object, then a table. The target: 20,000 listings at 64x64 in under 60 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import grain


def _cpu() -> float:
  """CPU seconds of this process and its finished children (render workers): contention-free cost."""
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--families", type=int, default=250, help="families per category (250 -> ~22k listings)")
  ap.add_argument("--image_size", type=int, default=64)
  ap.add_argument("--workers", type=int, default=2, help="render processes")
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--steps", type=int, default=50, help="pipeline batches to time (after 2 warm-up batches)")
  ap.add_argument("--threads", type=int, default=2, help="grain read threads")
  ap.add_argument("--json", default="", help="also write the results here")
  args = ap.parse_args()

  from afmrl_jax.attributes import CorpusStats
  from afmrl_jax.data import catalog as catalog_lib
  from afmrl_jax.data import pipeline, tokenizer
  from afmrl_jax.data.table import ListingTable

  cfg = catalog_lib.CatalogConfig(families_per_category=args.families, image_size=args.image_size,
                                  num_workers=args.workers)
  t0, c0 = time.perf_counter(), _cpu()
  cat = catalog_lib.generate_catalog(cfg)
  gen_s, gen_cpu = time.perf_counter() - t0, _cpu() - c0
  results = {"load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count(),
             "catalog": {"listings": len(cat), "products": len(cat.products), "image_size": args.image_size,
                         "workers": args.workers, "seconds": round(gen_s, 2), "cpu_seconds": round(gen_cpu, 2),
                         "listings_per_cpu_s": round(len(cat) / gen_cpu, 1),
                         "listings_per_s": round(len(cat) / gen_s, 1),
                         "seconds_per_20k": round(20000 * gen_s / len(cat), 2)}}

  train = cat.split("train")
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    tok = tokenizer.default_tokenizer([t for l in train for t in (l.title, l.teacher_attributes)], d)
    results["tokenizer_train_s"] = round(time.perf_counter() - t0, 2)
  stats = CorpusStats.from_texts([l.teacher_attributes for l in train])
  table = ListingTable.from_catalog(cat, "train")
  for name, extra in (("pipeline", {}), ("pipeline_fresh_views", {"fresh_views": True}),
                      ("pipeline_family_mixed", {"batching": "family_mixed"})):
    pcfg = pipeline.PipelineConfig(batch_size=args.batch_size, image_size=args.image_size, num_threads=args.threads,
                                   text_attributes="teacher", **extra)
    it = iter(pipeline.train_dataset(table, tok, stats, pcfg, shard_options=grain.sharding.NoSharding(),
                                     fresh_view_config=cfg))
    for _ in range(2):
      next(it)
    t0, c0 = time.perf_counter(), _cpu()
    for _ in range(args.steps):
      next(it)
    s, cpu = time.perf_counter() - t0, _cpu() - c0
    results[name] = {"batch_size": args.batch_size, "threads": args.threads, "batches_per_s": round(args.steps / s, 2),
                     "pairs_per_s": round(args.steps * args.batch_size / s, 1),
                     "pairs_per_cpu_s": round(args.steps * args.batch_size / cpu, 1)}
  print(json.dumps(results, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  print()
  c = results["catalog"]
  print(f"{'measure':32s} {'value':>12s}")
  print(f"{'catalog listings':32s} {c['listings']:12d}")
  print(f"{'catalog seconds':32s} {c['seconds']:12.2f}")
  print(f"{'catalog listings/s':32s} {c['listings_per_s']:12.1f}")
  print(f"{'catalog s per 20k (target <60)':32s} {c['seconds_per_20k']:12.2f}")
  print(f"{'catalog listings/cpu-s':32s} {c['listings_per_cpu_s']:12.1f}")
  for name in ("pipeline", "pipeline_fresh_views", "pipeline_family_mixed"):
    r = results[name]
    print(f"{name + ' batches/s':32s} {r['batches_per_s']:12.2f}")
    print(f"{name + ' pairs/s':32s} {r['pairs_per_s']:12.1f}")
    print(f"{name + ' pairs/cpu-s':32s} {r['pairs_per_cpu_s']:12.1f}")
  print(f"{'load average (1 min)':32s} {results['load_average_1min']:12.2f}")


if __name__ == "__main__":
  main()
