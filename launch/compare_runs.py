"""Whether two stage-1 workdirs hold bitwise the same results: logged losses, eval metrics, gallery embeddings.

  python launch/compare_runs.py /tmp/run_a /tmp/run_b       # exit 0 when all three are identical

Otherwise it also prints how far apart they are: the largest loss difference, the metric differences and
the largest embedding difference.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from afmrl_jax.eval.retrieval import load_gallery_embeddings


def _losses(workdir: str) -> list[tuple[int, float]]:
  with open(f"{workdir}/metrics.jsonl", encoding="utf-8") as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def main(a: str, b: str) -> int:
  metrics = [json.load(open(f"{w}/eval/metrics.json", encoding="utf-8"))["metrics"] for w in (a, b)]
  # One gallery_embeddings.npz, or the per-process shards of a sharded evaluation.
  emb = [load_gallery_embeddings(f"{w}/eval") for w in (a, b)]
  same = {
      "logged losses": _losses(a) == _losses(b),
      "eval metrics": metrics[0] == metrics[1],
      "gallery embeddings": sorted(emb[0]) == sorted(emb[1]) and all(np.array_equal(emb[0][k], emb[1][k])
                                                                     for k in emb[0]),
  }
  for name, ok in same.items():
    print(f"{name}: {'identical' if ok else 'DIFFERENT'}")
  print(f"R@1 {metrics[0]['recall@1']:.6f} vs {metrics[1]['recall@1']:.6f}; {len(_losses(a))} logged losses")
  # How far apart, when not identical: rounding-level changes show as small loss differences that grow
  # slowly with the steps, and at most a query or two changing rank.
  la, lb = dict(_losses(a)), dict(_losses(b))
  common = sorted(set(la) & set(lb))
  if common:
    diffs = [abs(la[s] - lb[s]) for s in common]
    worst = common[int(np.argmax(diffs))]
    print(f"largest loss difference {max(diffs):.3g} at step {worst} (first logged step: {diffs[0]:.3g})")
  deltas = {k: metrics[1][k] - metrics[0][k] for k in metrics[0] if isinstance(metrics[0][k], (int, float))
            and k in metrics[1]}
  print("metric differences (b - a): " + ", ".join(f"{k} {v:+.4f}" for k, v in sorted(deltas.items()) if v))
  for k in emb[0]:
    if k in emb[1] and emb[0][k].shape == emb[1][k].shape and emb[0][k].dtype.kind == "f":
      print(f"gallery embeddings '{k}': max |a - b| {np.max(np.abs(emb[0][k] - emb[1][k])):.3g}")
  return 0 if all(same.values()) else 1


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:3]))
