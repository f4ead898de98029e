"""The environment of RAR: a finished stage-1 run, frozen, with its gallery index and an enriched-query
encoder.

`Environment.load(run, workdir, mesh)` restores the stage-1 model of `run.rar.environment` (its own
`config.json` says how it was built and which attributes its listings carry), embeds the gallery split
on the candidate side exactly as that run's evaluation does, and builds the reward's index once, saved
under `<workdir>/rar_index` and reloaded on resume (with `reward.gallery_search='sharded'` each process
indexes its own gallery rows instead, rebuilt on resume). `score(listing_ids, texts, ended)` then appends each
sampled string to its query listing's title, embeds the query side with the frozen model and scores the
ranks (`rl.reward.RetrievalReward`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from afmrl_jax import parallel
from afmrl_jax.data import pipeline as pipeline_lib
from afmrl_jax.data import prompts
from afmrl_jax.data.table import ListingTable
from afmrl_jax.attributes.parse import parse_attributes
from afmrl_jax.retrieval import load_retriever
from afmrl_jax.rl.reward import RetrievalReward, malformed_flags
from afmrl_jax.train import model as builders, checkpointing
from afmrl_jax.config import schema
from afmrl_jax.stages.stage1 import data as stage1_data
from afmrl_jax.retrieval.sharded import OwnQueries
from afmrl_jax.eval.embed import embed_all
from afmrl_jax.eval.retrieval import index_gallery, make_index
from afmrl_jax.eval import embed as embed_lib

INDEX_DIR = "rar_index"


class Environment:
  """The frozen stage-1 model as a reward: enriched query -> embedding -> ranks in the gallery."""

  def __init__(self, run: schema.Run, data: stage1_data.Stage1Data, embed_fn, reward: RetrievalReward,
               query_table: ListingTable, batch_size: int):
    self.run, self.data, self.embed_fn, self.reward = run, data, embed_fn, reward
    self.batch_size = batch_size  # rows per embed_fn call
    self.table = query_table
    self.row_of = {int(lid): i for i, lid in enumerate(query_table.listing_id)}
    self.encoder = pipeline_lib.ListingEncoder(data.tokenizer, data.stats, data.pipeline)
    # The keys a well-formed string may use: those of the teacher's strings for these listings.
    self.known_keys = (frozenset(k for t in query_table.teacher_attributes for k, _ in parse_attributes(t).pairs)
                       if reward.options.strict_format else None)
    self._pixels: dict[int, np.ndarray] = {}

  @classmethod
  def load(cls, run: schema.Run, workdir: str, mesh, batch_size: int) -> "Environment":
    """The environment of `run.rar.environment`, embedding `batch_size` queries per call."""
    env_dir = run.rar.environment
    env_run = schema.load_saved(env_dir)
    if env_run.task != "representation":
      raise ValueError(f"config.rar.environment={env_dir} is a {env_run.task} run; it must be a stage-1 "
                       "(representation) workdir.")
    data = stage1_data.make(env_run, env_dir)
    model, step = builders.restore_model(env_run, checkpointing.checkpoint_dir(env_dir), data.tokenizer, mesh)
    logging.info("RAR environment: %s at step %d.", env_dir, step)
    parts = (model.graphdef, model.params, model.rest)
    embed_fn = embed_lib.make_embed_fn(parts, mesh, data.image_grid_thw, batch_size)

    # The gallery: embedded once on the candidate side, indexed, saved in the workdir.
    # The gallery index. Each process embeds its slice of the gallery; 'gathered': every process indexes
    # all of it and process 0 saves it (reloaded on resume); 'sharded': each indexes its own rows and the
    # processes' queries are searched in every shard (rebuilt on resume: the frozen model embeds the same).
    # Process 0 decides whether the saved index is loaded (`agree` is collective: nobody writes before).
    sharded = run.reward.gallery_search == "sharded"
    index_dir = os.path.join(workdir, INDEX_DIR)
    ids_path = os.path.join(index_dir, "gallery_ids.npz")
    saved = parallel.agree(not sharded and os.path.isfile(ids_path))
    if saved:
      retriever = load_retriever(index_dir)
      with np.load(ids_path) as z:
        gallery_listing, gallery_product = z["listing_id"], z["product_id"]
    else:
      gallery_fn = embed_lib.make_embed_fn(parts, mesh, data.image_grid_thw, env_run.pipeline.eval_batch_size)
      local = embed_all(gallery_fn, data.eval_batches(run.rar.gallery_split, "candidate"), "gallery")
      gallery, index, _ = index_gallery(local, make_index(env_run.eval, run.reward.retriever), sharded)
      gallery_listing, gallery_product = gallery["listing_id"], gallery["product_id"]
      retriever = OwnQueries(index) if sharded else index
      if not sharded and parallel.is_process_0():
        tmp = index_dir + ".tmp"
        retriever.save(tmp)
        np.savez(os.path.join(tmp, "gallery_ids.npz"), listing_id=gallery_listing, product_id=gallery_product)
        os.replace(tmp, index_dir)  # a half-written index is never loaded
    reward = RetrievalReward(retriever, gallery_listing, gallery_product, run.reward)
    table = ListingTable.from_catalog(data.catalog, run.rar.query_split)
    return cls(env_run, data, embed_fn, reward, table, batch_size)

  def _pixel_values(self, row: int) -> np.ndarray:
    if row not in self._pixels:
      self._pixels[row] = self.encoder.pixels(self.table.image(row))
    return self._pixels[row]

  def query_inputs(self, listing_ids: Sequence[int], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Query-side model inputs of `title + attributes: text` for each (listing, text):
    input_ids / attention_mask int32 [n, T], pixel_values float32 [n, P, Dp]."""
    instruction = self.data.pipeline.query_instruction
    ids, masks, pixels = [], [], []
    for lid, text in zip(listing_ids, texts):
      row = self.row_of[int(lid)]
      i, m = self.encoder.prompts.build(instruction, prompts.prompt_text(self.table.title[row], text))
      ids.append(i)
      masks.append(m)
      pixels.append(self._pixel_values(row))
    return {"input_ids": np.stack(ids), "attention_mask": np.stack(masks), "pixel_values": np.stack(pixels)}

  def product_ids(self, listing_ids: Sequence[int]) -> np.ndarray:
    """The true product id of each query listing (relisted duplicates count as the same product)."""
    return np.asarray([self.table.true_product_id[self.row_of[int(lid)]] for lid in listing_ids], np.int64)

  def score(self, listing_ids: Sequence[int], texts: Sequence[str], ended: Sequence[bool]
            ) -> tuple[np.ndarray, dict[str, float]]:
    """Rewards float32 [n] of the sampled strings `texts` for query listings `listing_ids` (this process's
    rows: every process calls it with as many rows), and their
    means (`rl.reward.RetrievalReward`) with the seconds spent embedding (`embed_s`: tokenize + frozen
    model) and searching and scoring (`search_s`)."""
    t0 = time.perf_counter()
    b = self.batch_size // jax.process_count()  # embed_fn's rows per process
    embeddings = np.concatenate([self.embed_fn(self.query_inputs(listing_ids[i:i + b], texts[i:i + b]))
                                 for i in range(0, len(texts), b)])
    t1 = time.perf_counter()
    rewards, info = self.reward(embeddings, np.asarray(listing_ids), self.product_ids(listing_ids),
                                malformed_flags(texts, ended, self.known_keys))
    return rewards, dict(info, embed_s=t1 - t0, search_s=time.perf_counter() - t1)
