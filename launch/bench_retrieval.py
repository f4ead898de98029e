"""Retrieval benchmark: ScaNN (brute force and tree + AH) vs exact top-k (NumPy and JAX) on one gallery.

Product-like synthetic embeddings (listings scattered around product centres, L2-normalised), so the
tree has structure to use, as real embeddings do. Prints build / search times, queries per second and
recall@10 of each index against the exact top-10 on the same embeddings.

  python launch/bench_retrieval.py --gallery 100000 --queries 2000 --dim 128
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from afmrl_jax.vectors import l2_normalize
from afmrl_jax.retrieval.exact import ExactRetriever
from afmrl_jax.retrieval.scann_index import ScannRetriever


def _data(n: int, q: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  products = max(2, n // 8)
  centres = rng.normal(size=(products, d))
  gallery = l2_normalize(centres[rng.integers(0, products, n)] + 0.5 * rng.normal(size=(n, d)))
  queries = l2_normalize(centres[rng.integers(0, products, q)] + 0.5 * rng.normal(size=(q, d)))
  return gallery, queries


ROWS: list[dict] = []  # one per index, for --json


def _run(name: str, make, gallery: np.ndarray, queries: np.ndarray, k: int, exact_ids: np.ndarray | None):
  t0 = time.perf_counter()
  r = make().build(gallery)
  build = time.perf_counter() - t0
  r.search(queries[:8], k)  # warm-up (JAX compilation, ScaNN thread pool)
  t0 = time.perf_counter()
  ids, _ = r.search(queries, k)
  search = time.perf_counter() - t0
  recall = 1.0 if exact_ids is None else float(
      np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids)]))
  print(f"| {name:<28} | {build:8.2f} | {search:8.3f} | {len(queries) / search:10.0f} | {recall:.4f} |",
        flush=True)
  ROWS.append({"index": name, "build_s": build, "search_s": search, "queries_per_s": len(queries) / search,
               "recall_at_k_vs_exact": recall})
  return ids


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--gallery", type=int, default=100_000)
  ap.add_argument("--queries", type=int, default=2_000)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--k", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default="", help="write the rows here as JSON")
  args = ap.parse_args()
  load_start = os.getloadavg()[0]
  gallery, queries = _data(args.gallery, args.queries, args.dim, args.seed)
  print(f"gallery {args.gallery} x {args.dim}, {args.queries} queries, k={args.k}")
  print("| index                        | build s  | search s | queries/s  | recall@k vs exact |")
  print("|---|---|---|---|---|")
  exact_ids = _run("exact (numpy, blockwise)", ExactRetriever, gallery, queries, args.k, None)
  _run("exact (jax, blockwise)", lambda: ExactRetriever(backend="jax"), gallery, queries, args.k, exact_ids)
  _run("scann brute force", lambda: ScannRetriever(brute_force_below=args.gallery + 1), gallery, queries,
       args.k, exact_ids)
  _run("scann tree+AH (defaults)", lambda: ScannRetriever(brute_force_below=0), gallery, queries, args.k,
       exact_ids)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"gallery": args.gallery, "queries": args.queries, "dim": args.dim, "k": args.k,
                 "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
                 "cpu_count": os.cpu_count(), "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
  main()
