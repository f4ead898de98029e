"""How much learning signal each retrieval reward leaves: the share of groups whose G rewards are equal.

    python launch/reward_signal.py --policy=/tmp/sft --environment=/tmp/stage1 [--queries=128] [--out=F.json]

Samples G strings for each of Q query listings with the policy (the SFT generator, temperature 1), embeds
the enriched queries with the frozen stage-1 model once, searches the top 50 once, and scores the same
ranks with every reward kind and k. A group whose rewards are all equal has zero advantage: it teaches
nothing. Prints a table (mean reward, reward std within groups, equal-group share) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--policy", required=True, help="finished SFT workdir")
  ap.add_argument("--environment", required=True, help="finished stage-1 workdir")
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--queries", type=int, default=128)
  ap.add_argument("--group_size", type=int, default=8)
  ap.add_argument("--ks", default="1,5,10,20,50")
  ap.add_argument("--out", default="")
  args = ap.parse_args()

  import jax
  from configs import stage2 as stage2_config
  from afmrl_jax.rl import reward as reward_lib
  from afmrl_jax.config import schema
  from afmrl_jax.stages.stage2 import run as stage2

  config = stage2_config.get_config(args.preset)
  config.rar.policy, config.rar.environment = args.policy, args.environment
  config.rar.group_size = args.group_size
  config.rar.queries_per_step = args.queries
  config.reward.k = max(int(k) for k in args.ks.split(","))
  with tempfile.TemporaryDirectory() as workdir:
    parts = stage2.build(schema.parse(config), workdir)
    with jax.set_mesh(parts.mesh):
      state = {"step": jax.numpy.zeros((), jax.numpy.int32), "params": parts.model.params}
    # One rollout with the policy as it is; scored once, then re-scored under every reward kind.
    captured = {}
    score = parts.environment.score

    def capture(listing_ids, texts, ended):
      embeddings = parts.environment.embed_fn(parts.environment.query_inputs(listing_ids, texts))
      env = parts.environment
      hits, positives = env.reward.ranked_hits(embeddings, np.asarray(listing_ids), env.product_ids(listing_ids))
      captured.setdefault("hits", []).append(hits)
      captured.setdefault("positives", []).append(positives)
      captured.setdefault("malformed", []).append(reward_lib.malformed_flags(texts, ended))
      return score(listing_ids, texts, ended)

    parts.environment.score = capture
    parts.rollout(state, next(parts.queries))
  hits = np.concatenate(captured["hits"])
  positives = np.concatenate(captured["positives"])
  malformed = np.concatenate(captured["malformed"])
  g = args.group_size
  rows = []
  for kind in reward_lib.REWARD_KINDS:
    for k in (int(k) for k in args.ks.split(",")):
      r = np.where(malformed, -0.1, reward_lib.rank_scores(hits, positives, kind, k)).reshape(-1, g)
      rows.append({"kind": kind, "k": k, "mean": float(r.mean()), "within_group_std": float(r.std(axis=1).mean()),
                   "equal_group_share": reward_lib.equal_group_share(r)})
  print(f"{len(hits) // g} queries x {g} samples, malformed {malformed.mean():.3f}, "
        f"mean positives per query {positives.mean():.2f}")
  print("| reward | k | mean | std within group | equal-reward groups |\n|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['kind']} | {row['k']} | {row['mean']:.3f} | {row['within_group_std']:.3f} | "
          f"{row['equal_group_share']:.3f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"queries": len(hits) // g, "group_size": g, "malformed_rate": float(malformed.mean()),
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
