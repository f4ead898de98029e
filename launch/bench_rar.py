"""RAR step benchmark: where one GRPO step's time goes, and ScaNN vs exact reward search at 1e5 listings.

    python launch/bench_rar.py [--preset=bench-small] [--steps=6] [--out=/tmp/bench_rar.json]

Part 1 (the real stage-2 loop): a `preset` SFT generator and stage-1 model are made (one training step
each: their weights do not change the cost), then RAR runs `--steps` steps, twice: with one rollout chunk
(phases in sequence, so each is timed alone) and with the default two (the host scores chunk 1 while the
device samples chunk 2). Per step, from the loop's own metrics (first step excluded: compilation):
sampling (waiting for tokens), embedding (tokenize + frozen stage-1 forward), retrieval (search + score),
decoding, and the update (the rest of the step: logprobs, gradients, optimizer). Reward share =
(decode + embed + search) / step time; the target is < 10%.

Part 2 (the index alone): the reward of Q x G enriched queries against a clustered gallery of
`--gallery` rows, ScaNN (tree + AH, the default above 20000 rows) vs exact NumPy search, the same thread
count; times alternate (best of `--repeats`) and the share of equal rewards is reported.

Prints a table and the load average; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_one_step(config, workdir):
  from afmrl_jax.stages.registry import run_stage
  config.train.num_steps = 1
  config.train.eval_at_end = False
  run_stage(config, workdir)


def rar_phases(preset: str, steps: int, root: str) -> dict:
  from configs import sft as sft_config, stage1 as stage1_config, stage2 as stage2_config
  from afmrl_jax.stages.registry import run_stage
  cache = os.path.join(root, "data_cache")
  for name, cfg in (("sft", sft_config.get_config(preset)), ("stage1", stage1_config.get_config(preset))):
    cfg.catalog.cache_dir = cache
    if name == "stage1":
      cfg.attributes.enrich_queries = True
    _train_one_step(cfg, os.path.join(root, name))
  out = {}
  for chunks in (1, 2):
    cfg = stage2_config.get_config(preset)
    cfg.catalog.cache_dir = cache
    cfg.rar.policy, cfg.rar.environment = os.path.join(root, "sft"), os.path.join(root, "stage1")
    cfg.rar.rollout_chunks = chunks
    cfg.train.num_steps = steps
    cfg.train.eval_at_end = False
    cfg.checkpoint.enabled = False
    workdir = os.path.join(root, f"rar_chunks{chunks}")
    run_stage(cfg, workdir)
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))][1:]  # step 1 compiles
    mean = lambda k: float(np.mean([r[k] for r in rows]))
    step = mean("step_time_s")
    reward = mean("reward_s")
    decode = reward - mean("embed_s") - mean("search_s")
    out[f"chunks{chunks}"] = {
        "rows_per_step": cfg.rar.queries_per_step * cfg.rar.group_size, "step_s": step,
        "sample_s": mean("sample_wait_s"), "embed_s": mean("embed_s"), "search_s": mean("search_s"),
        "decode_s": decode, "update_s": step - mean("rollout_s"), "reward_share": reward / step,
        "rollout_tokens_per_s": mean("rollout_tokens_per_s")}
  return out


class OneMatmul:
  """Exact search as one [Q, N] matmul + argpartition: the fastest exact reference for a small Q (the
  project's blockwise exact search bounds memory for any Q instead)."""

  def __init__(self, gallery: np.ndarray):
    self.gallery = gallery

  def search(self, queries: np.ndarray, k: int):
    scores = queries @ self.gallery.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    rows = np.take_along_axis(part, order, axis=1)
    return rows, np.take_along_axis(scores, rows, axis=1)


def index_speed(gallery_rows: int, queries: int, dim: int, repeats: int) -> dict:
  from afmrl_jax.retrieval import make_retriever
  from afmrl_jax.rl.reward import RetrievalReward, RewardOptions
  rng = np.random.default_rng(0)
  per_product = 4
  products = gallery_rows // per_product
  centre = (3 * rng.normal(size=(50, dim)))[rng.integers(0, 50, products)] + rng.normal(size=(products, dim))
  gallery = np.repeat(centre, per_product, axis=0) + 1.2 * rng.normal(size=(products * per_product, dim))
  gallery = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float32)
  product = np.repeat(np.arange(products), per_product)
  listing = np.arange(len(product))
  qi = rng.choice(len(product), queries, replace=False)
  q = (gallery[qi] + 0.02 * rng.normal(size=(queries, dim))).astype(np.float32)
  malformed = np.zeros(queries, bool)
  rewards, best, build = {}, {}, {}
  scorers = {}
  kinds = ("scann", "exact", "one_matmul")
  for kind in kinds:
    t0 = time.perf_counter()
    retriever = OneMatmul(gallery) if kind == "one_matmul" else make_retriever(kind).build(gallery)
    build[kind] = time.perf_counter() - t0
    scorers[kind] = RetrievalReward(retriever, listing, product, RewardOptions())
    scorers[kind](q, qi, product[qi], malformed)  # warm-up
  for _ in range(repeats):  # alternate, keep each one's best
    for kind in kinds:
      t0 = time.perf_counter()
      rewards[kind], _ = scorers[kind](q, qi, product[qi], malformed)
      best[kind] = min(best.get(kind, np.inf), time.perf_counter() - t0)
  exact = min(best["exact"], best["one_matmul"])
  return {"gallery": len(product), "queries": queries, "dim": dim, "scann_mode": scorers["scann"].retriever.mode,
          "scann_s": best["scann"], "exact_s": exact, "exact_blockwise_s": best["exact"],
          "exact_one_matmul_s": best["one_matmul"], "speedup": exact / best["scann"],
          "build_s": build, "same_reward_share": float(np.mean(np.isclose(rewards["scann"], rewards["exact"],
                                                                           atol=1e-6)))}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="bench-small")
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--gallery", type=int, default=100_000)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  import jax
  from configs import stage2 as stage2_config
  queries = stage2_config.get_config(args.preset).rar.queries_per_step * stage2_config.get_config(args.preset).rar.group_size
  with tempfile.TemporaryDirectory() as root:
    phases = rar_phases(args.preset, args.steps, root)
  index = index_speed(args.gallery, queries, args.dim, args.repeats)
  result = {"preset": args.preset, "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "phases": phases, "index": index}
  print(f"\nRAR step on {args.preset} ({jax.default_backend()}, load {os.getloadavg()[0]:.2f}), seconds per step:")
  print("| chunks | rows | step | sample | embed | search | decode | update | reward share |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, p in phases.items():
    print(f"| {name[-1]} | {p['rows_per_step']} | {p['step_s']:.3f} | {p['sample_s']:.3f} | {p['embed_s']:.3f} | "
          f"{p['search_s']:.4f} | {p['decode_s']:.4f} | {p['update_s']:.3f} | {p['reward_share']:.1%} |")
  print(f"\nReward search of {index['queries']} queries, gallery {index['gallery']} x {index['dim']} "
        f"(ScaNN {index['scann_mode']}): ScaNN {index['scann_s'] * 1e3:.1f} ms, exact {index['exact_s'] * 1e3:.1f} ms "
        f"(blockwise {index['exact_blockwise_s'] * 1e3:.1f}, one matmul {index['exact_one_matmul_s'] * 1e3:.1f}) "
        f"({index['speedup']:.1f}x), same reward for {index['same_reward_share']:.1%} of samples; "
        f"build ScaNN {index['build_s']['scann']:.1f} s.")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
