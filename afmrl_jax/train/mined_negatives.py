"""Mined hard negatives in stage-1 batches (config section `mining`).

Every `mining.every` steps, and before the first, the current model embeds the training listings (query
side and candidate side, as evaluation does), `retrieval.mining.mine` keeps each listing's `num_mined`
nearest listings of *other* products (by `product_id`: the positives the pipeline pairs), and the
configured false-negative filter drops likely relistings of the same item. Each query of a batch then
brings `per_query` (h) of its kept neighbours, drawn without replacement from (seed, step, listing id),
as extra candidate columns of the loss: the batch gains `mined_input_ids`, `mined_attention_mask`
[B, h, T], `mined_pixel_values` [B, h, P, Dp], `mined_terms` [B, h, K] and `mined_listing_id` [B, h]
(a query with fewer than h kept neighbours is topped up with random listings of other products).

`MinedNegatives` is the `rollout` hook of `train.loop.run`: `(state, host_batch) -> (host_batch with the
mined columns, host metrics)`. The table and the step it was mined at are saved as
`<workdir>/mined/step_<N>.npz` at each refresh (the last `KEEP` of them). A resumed run takes the table of
the last refresh at or before its step (mining again when it resumes exactly at a refresh step, as the
uninterrupted run did), so it trains on the same batches. With several processes every process embeds
its slice of the listings, the embeddings are gathered, and each process mines the same table and extends
its own rows.

Each refresh appends a line to `<workdir>/mined/refreshes.jsonl`, and every logged step carries the
current table's figures: the time (`mining_s`), the entries mined and dropped by each rule and,
where the catalog knows the true item of each listing (`true_product_id`), how many mined neighbours are
relistings of the query's item and the filter's precision and recall against them. A table restored on
resume logs no figures until the next refresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from afmrl_jax.data import pipeline as pipeline_lib
from afmrl_jax.fields import Checked, choice, non_negative, positive
from afmrl_jax.retrieval import mining
from afmrl_jax.train import stage1_step
from afmrl_jax.train.evaluate import embed_all, gather_across_processes

FILTERS = ("none", "attribute", "score", "attribute+score")
FOLDER = "mined"
KEEP = 3  # tables kept on disk (a resume goes back at most to the oldest checkpoint kept)


@dataclasses.dataclass(frozen=True)
class MiningOptions(Checked):
  """Hard negatives mined with the current model and added to every query's candidates."""
  enabled: bool = False
  every: int = positive(100)  # steps between refreshes of the mined table (and one before the first step)
  num_mined: int = positive(8)  # M: neighbours of other products kept per training listing
  per_query: int = positive(1)  # h: mined negatives each query brings into the batch
  # False-negative filter at mining time: 'attribute' drops a neighbour whose attribute term set equals the
  # query's (likely the same item relisted); 'score' one more similar than the query's positives + margin.
  filter: str = choice("none", FILTERS)
  margin: float = 0.1  # the 'score' rule's margin over the mean similarity to the query's own product
  backend: str = choice("auto", mining.BACKENDS)  # 'auto': exact below 20,000 listings, ScaNN above
  seed: int = non_negative(0)  # which h of the kept neighbours each query draws at each step


def table_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, FOLDER, f"step_{step}.npz")


class MinedNegatives:
  """The `rollout` hook that mines (every `options.every` steps) and extends batches; module docstring."""

  def __init__(self, options: MiningOptions, data, model, mesh, workdir: str, eval_batch_size: int):
    self.options, self.data, self.mesh, self.workdir = options, data, mesh, workdir
    self.graphdef, self.rest = model.graphdef, model.rest
    self.eval_batch_size = eval_batch_size
    table = self.table = data.train_table
    self.row_of = {int(lid): i for i, lid in enumerate(table.listing_id)}
    self.product = np.asarray(table.product_id, np.int64)
    self.encoder = pipeline_lib.ListingEncoder(data.tokenizer, data.stats, data.pipeline)
    overrides = data.attribute_overrides
    self.terms = np.stack([self.data.stats.encode(pipeline_lib.attribute_text(table, i, data.pipeline.term_source, overrides),
                                                  data.pipeline.max_terms) for i in range(len(table))])
    self.mined: mining.MinedTable | None = None
    self.last_refresh: dict[str, float] = {}

  # -- mining ------------------------------------------------------------------------------------------

  def _embeddings(self, params, side: str) -> np.ndarray:
    """[N, D] embeddings of every training listing on `side`, in table-row order, on every process."""
    embed_fn = stage1_step.make_embed_fn((self.graphdef, params, self.rest), self.mesh, self.data.image_grid_thw,
                                         self.eval_batch_size)
    batches = pipeline_lib.eval_dataset(self.table, self.data.tokenizer, self.data.stats,
                                        dataclasses.replace(self.data.pipeline, eval_batch_size=self.eval_batch_size),
                                        side=side, attributes_by_listing=self.data.attribute_overrides,
                                        terms_by_listing=self.data.attribute_overrides)
    out = gather_across_processes(embed_all(embed_fn, batches, side))
    rows = np.asarray([self.row_of[int(lid)] for lid in out["listing_id"]])
    emb = np.zeros_like(out["embeddings"])
    emb[rows] = out["embeddings"]
    return emb

  def refresh(self, params, step: int) -> dict[str, float]:
    """Mines the table with `params` at `step`, filters it, saves it; returns the refresh's metrics."""
    o = self.options
    t0 = time.perf_counter()
    queries, cands = self._embeddings(params, "query"), self._embeddings(params, "candidate")
    n = len(self.product)
    mined = mining.mine(queries, cands, self.product, self.product, o.num_mined, backend=o.backend, step=step)
    rules = tuple(o.filter.split("+"))
    inputs = mining.FilterInputs(
        query_terms=self.terms, cand_terms=self.terms,
        positive_scores=(mining.positive_scores(queries, cands, self.product, self.product,
                                                query_rows=np.arange(n)) if "score" in rules else None))
    config = mining.FilterConfig(rules=rules, margin=o.margin)
    keep_by_rule = mining.rule_keep(mined, inputs, config)
    self.mined, counts = mining.apply_filter(mined, inputs, config)
    metrics = {"mining_s": time.perf_counter() - t0, "mined": float(counts["mined"]),
               "mined_dropped": float(counts["dropped"])}
    true_ids = np.asarray(self.table.true_product_id, np.int64)
    is_dup = mining.true_duplicates(mined.table, self.product, true_ids, self.product, true_ids)
    metrics["mined_true_duplicates"] = float(is_dup.sum())
    if o.filter != "none" and is_dup.any():
      keep = np.logical_and.reduce(list(keep_by_rule.values()))
      quality = mining.filter_quality({"filter": keep}, mined.valid, is_dup)["filter"]
      metrics["mined_filter_recall"] = quality["recall"]
      if quality["dropped"]:
        metrics["mined_filter_precision"] = quality["precision"]
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.workdir, FOLDER), exist_ok=True)
      self.mined.save(table_path(self.workdir, step))
      self._prune()
      with open(os.path.join(self.workdir, FOLDER, "refreshes.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    logging.info("Mined hard negatives at step %d: %s", step, metrics)
    return metrics

  def _prune(self) -> None:
    folder = os.path.join(self.workdir, FOLDER)
    steps = sorted(int(f[5:-4]) for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".npz"))
    for s in steps[:-KEEP]:
      os.remove(table_path(self.workdir, s))

  def _restore(self, step: int) -> bool:
    """Loads the table of the last refresh before `step` (a resumed run); False when it is not saved."""
    last = step // self.options.every * self.options.every
    path = table_path(self.workdir, last)
    if not os.path.isfile(path):
      return False
    self.mined = mining.MinedTable.load(path)
    return True

  # -- batches -----------------------------------------------------------------------------------------

  def _choose(self, row: int, step: int, listing_id: int) -> np.ndarray:
    """h table rows of mined negatives for the query at table row `row`: drawn without replacement from its
    kept neighbours, topped up with random listings of other products."""
    h = self.options.per_query
    kept = self.mined.table[row][self.mined.table[row] >= 0]
    rng = np.random.default_rng([self.options.seed, step, listing_id])
    if len(kept) >= h:
      return rng.choice(kept, h, replace=False)
    out = list(kept)
    while len(out) < h:
      other = int(rng.integers(len(self.product)))
      if self.product[other] != self.product[row] and other not in out:
        out.append(other)
    return np.asarray(out)

  def extend(self, host_batch: dict[str, Any], step: int) -> dict[str, Any]:
    """`host_batch` with the `mined_*` columns of its queries at `step`."""
    lids = np.asarray(host_batch["listing_id"]).astype(np.int64)
    chosen = np.stack([self._choose(self.row_of[int(l)], step, int(l)) for l in lids])  # [B, h]
    sides = [pipeline_lib.listing_side(self.encoder, self.table, int(r), "candidate",
                                       self.data.attribute_overrides, self.data.attribute_overrides)
             for r in chosen.ravel()]
    out = dict(host_batch)
    for key in sides[0]:
      stacked = np.stack([s[key] for s in sides])
      out[f"mined_{key}"] = stacked.reshape(chosen.shape + stacked.shape[1:])
    out["mined_listing_id"] = np.asarray(self.table.listing_id, np.int32)[chosen]
    return out

  def __call__(self, state: dict[str, Any], host_batch: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    step = int(jax.device_get(state["step"]))
    if step % self.options.every == 0 or (self.mined is None and not self._restore(step)):
      if self.mined is None and step % self.options.every:
        logging.warning("The mined table of step %d is not in %s: mining again with the parameters of "
                        "step %d.", step // self.options.every * self.options.every,
                        os.path.join(self.workdir, FOLDER), step)
      self.last_refresh = self.refresh(state["params"], step)
    # Every step logs the current table's figures (only some steps are logged); refreshes.jsonl has each.
    return self.extend(host_batch, step), dict(self.last_refresh)
