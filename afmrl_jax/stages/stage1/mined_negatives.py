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
`<workdir>/mined/step_<N>.npz` at each refresh (kept while a saved checkpoint may need it). A resumed run
takes the table of the last refresh at or before its step (mining again when it resumes exactly at a
refresh step, as the uninterrupted run did), so it trains on the same batches. With several processes every process embeds
its slice of the listings, the embeddings are gathered, each process mines, and all take process 0's table
(ScaNN builds can differ between machines) before extending their own rows.

Each refresh appends a line to `<workdir>/mined/refreshes.jsonl`, and every logged step carries the
current table's figures: the time (`mining_s`), the entries mined, dropped, and dropped by each rule and,
where the catalog knows the true item of each listing (`true_product_id`), how many mined neighbours are
relistings of the query's item and the filter's precision and recall against them. A table restored on
resume logs no figures until the next refresh.

Every query scores every mined column, so a mined listing of another query's product would be a false
negative for that query: the draw skips the products of the global batch's queries (with several
processes, each process's batch rows are gathered first), so a run draws the same mined columns with any
number of processes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from afmrl_jax import parallel
from afmrl_jax.data import pipeline as pipeline_lib
from afmrl_jax.config.sections import MiningOptions
from afmrl_jax.retrieval import mining
from afmrl_jax.train import checkpointing
from afmrl_jax.eval.embed import embed_all, gather_across_processes
from afmrl_jax.eval import embed as embed_lib

FOLDER = "mined"



def table_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, FOLDER, f"step_{step}.npz")


class MinedNegatives:
  """The `rollout` hook that mines (every `options.every` steps) and extends batches; module docstring."""

  def __init__(self, options: MiningOptions, data, model, mesh, workdir: str):
    self.options, self.data, self.mesh, self.workdir = options, data, mesh, workdir
    self.graphdef, self.rest = model.graphdef, model.rest
    table = self.table = data.train_table
    self.row_of = {int(lid): i for i, lid in enumerate(table.listing_id)}
    self.product = np.asarray(table.product_id, np.int64)
    self.encoder = pipeline_lib.ListingEncoder(data.tokenizer, data.stats, data.pipeline)
    overrides = data.attribute_overrides
    self.terms = np.stack([self.data.stats.encode(pipeline_lib.attribute_text(table, i, data.pipeline.term_source, overrides),
                                                  data.pipeline.max_terms) for i in range(len(table))])
    self.mined: mining.MinedTable | None = None
    self.last_refresh: dict[str, float] = {}
    self.step: int | None = None  # the next step, counted on the host (reading the state would wait)

  # -- mining ------------------------------------------------------------------------------------------

  def _embeddings(self, params, side: str) -> np.ndarray:
    """[N, D] embeddings of every training listing on `side`, in table-row order, on every process."""
    pipe = self.data.pipeline
    embed_fn = embed_lib.make_embed_fn((self.graphdef, params, self.rest), self.mesh, self.data.image_grid_thw,
                                         pipe.eval_batch_size)
    batches = pipeline_lib.eval_dataset(self.table, self.data.tokenizer, self.data.stats, pipe, side=side,
                                        attributes_by_listing=self.data.attribute_overrides,
                                        terms_by_listing=self.data.attribute_overrides)
    out = gather_across_processes(embed_all(embed_fn, batches, side))
    rows = np.asarray([self.row_of[int(lid)] for lid in out["listing_id"]])
    emb = np.zeros_like(out["embeddings"])
    emb[rows] = out["embeddings"]
    return emb

  def refresh(self, params, step: int) -> dict[str, float]:
    """Mines the table with `params` at `step`, filters it, saves it; returns the refresh's metrics."""
    o = self.options
    jax.block_until_ready(params)  # the step in flight is not the refresh's time
    t0 = time.perf_counter()
    queries, cands = self._embeddings(params, "query"), self._embeddings(params, "candidate")
    n = len(self.product)
    mined = mining.mine(queries, cands, self.product, self.product, o.num_mined, backend=o.backend, step=step)
    rules = tuple(o.filter.split("+"))
    inputs = mining.FilterInputs(
        query_terms=self.terms, cand_terms=self.terms,
        positive_scores=(mining.positive_scores(queries, cands, self.product, self.product,
                                                query_rows=np.arange(n)) if "score" in rules else None))
    filtered, counts = mining.apply_filter(mined, inputs, mining.FilterConfig(rules=rules, margin=o.margin))
    # Two ScaNN builds can differ between machines: every process trains on process 0's table.
    self.mined = mining.MinedTable.from_pytree(parallel.from_process_0(filtered.to_pytree()))
    metrics = {"mining_s": time.perf_counter() - t0, "mined": float(counts["mined"]),
               "mined_dropped": float(counts["dropped"]),
               **{f"mined_dropped_{rule}": float(counts[rule]) for rule in rules if rule != "none"},
               **self._duplicate_figures(mined, filtered)}
    if parallel.is_process_0():
      os.makedirs(os.path.join(self.workdir, FOLDER), exist_ok=True)
      self.mined.save(table_path(self.workdir, step))
      self._prune(step)
      with open(os.path.join(self.workdir, FOLDER, "refreshes.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    logging.info("Mined hard negatives at step %d: %s", step, metrics)
    return metrics

  def _duplicate_figures(self, mined: mining.MinedTable, filtered: mining.MinedTable) -> dict[str, float]:
    """How many `mined` entries are relistings of the query's item (same `true_product_id`, another product
    id) and, with a filter, its recall and precision against them (`filtered`: what the filter kept)."""
    true_ids = np.asarray(self.table.true_product_id, np.int64)
    is_dup = mining.true_duplicates(mined.table, self.product, true_ids, self.product, true_ids)
    out = {"mined_true_duplicates": float(is_dup.sum())}
    if self.options.filter != "none" and is_dup.any():
      # Which mined entries the filter kept: those still in their row of the filtered table ([Q, M, M]).
      kept = mined.valid & (mined.table[:, :, None] == np.where(filtered.valid, filtered.table, -2)[:, None, :]).any(-1)
      quality = mining.filter_quality({"filter": kept}, mined.valid, is_dup)["filter"]
      out["mined_filter_recall"] = quality["recall"]
      if quality["dropped"]:
        out["mined_filter_precision"] = quality["precision"]
    return out

  def _refresh_step(self, step: int) -> int:
    return step // self.options.every * self.options.every

  def _prune(self, step: int) -> None:
    """Deletes the tables no checkpoint on disk can need: those of refreshes before the oldest saved
    checkpoint's, and those after `step` (left by an abandoned longer run)."""
    folder = os.path.join(self.workdir, FOLDER)
    saved = checkpointing.saved_steps(self.workdir)
    oldest = self._refresh_step(min(saved[0], step) if saved else step)
    for name in os.listdir(folder):
      if name.startswith("step_") and name.endswith(".npz"):
        s = int(name[len("step_"):-len(".npz")])
        if s < oldest or s > step:
          os.remove(os.path.join(folder, name))

  def _restore(self, step: int) -> bool:
    """Loads the table of the last refresh at or before `step` (a resumed run); False when it is not saved.
    Process 0 decides, so that every process mines again, or none does."""
    path = table_path(self.workdir, self._refresh_step(step))
    if not parallel.agree(os.path.isfile(path)):
      return False
    self.mined = mining.MinedTable.load(path)
    return True

  # -- batches -----------------------------------------------------------------------------------------

  def _choose(self, row: int, step: int, listing_id: int, batch_products: np.ndarray) -> np.ndarray:
    """h table rows of mined negatives for the query at table row `row`: drawn without replacement from its
    kept neighbours of products not in the batch (`batch_products`: a listing of another query's product
    would be a false negative for that query), topped up with random such listings."""
    h = self.options.per_query
    kept = self.mined.table[row][self.mined.table[row] >= 0]
    kept = kept[~np.isin(self.product[kept], batch_products)]
    rng = np.random.default_rng([self.options.seed, step, listing_id])
    if len(kept) >= h:
      return rng.choice(kept, h, replace=False)
    others = np.flatnonzero(~np.isin(self.product, batch_products))
    others = others[~np.isin(others, kept)]
    if len(others) < h - len(kept):
      raise ValueError(f"config.mining.per_query={h}: fewer than {h} training listings are of products outside "
                       "the batch; lower it or the batch size.")
    return np.concatenate([kept, rng.choice(others, h - len(kept), replace=False)])

  def extend(self, host_batch: dict[str, Any], step: int) -> dict[str, Any]:
    """`host_batch` with the `mined_*` columns of its queries at `step`."""
    lids = np.asarray(host_batch["listing_id"]).astype(np.int64)
    rows = [self.row_of[int(l)] for l in lids]
    # The products of the global batch: every process's rows (the same count on each) are gathered.
    batch_products = np.unique(self.product[parallel.gather_processes(np.asarray(rows, np.int32))])
    chosen = np.stack([self._choose(r, step, int(l), batch_products) for r, l in zip(rows, lids)])  # [B, h]
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
    if self.step is None:  # the first call (a fresh or a resumed run): the state's step, read once
      self.step = int(jax.device_get(state["step"]))
    step, self.step = self.step, self.step + 1
    if step % self.options.every == 0:
      self.last_refresh = self.refresh(state["params"], step)
    elif self.mined is None and not self._restore(step):
      logging.warning("The mined table of step %d is not in %s: mining again with the parameters of step %d.",
                      self._refresh_step(step), os.path.join(self.workdir, FOLDER), step)
      self.last_refresh = self.refresh(state["params"], step)
    # Every step logs the current table's figures (only some steps are logged); refreshes.jsonl has each.
    return self.extend(host_batch, step), dict(self.last_refresh)
