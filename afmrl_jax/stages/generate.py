"""The `generate` stage: a trained generator writes attributes for a whole catalog, resumably.

    python -m afmrl_jax.main --config=configs/generate.py:tiny --workdir=/tmp/gen \\
        --config.checkpoint.restore_dir=/tmp/sft

The generator is the latest checkpoint of `checkpoint.restore_dir` (an SFT workdir), or
`model.hf_checkpoint` as it is. The listings of `generation.splits`, in listing-id order, are cut into
shards of `generation.shard_size`; each shard is generated in batches and committed atomically (written
to a temporary file, then renamed) as `<workdir>/<output_dir>/shard-NNNNN.jsonl`. A rerun skips the
committed shards, so a run killed at any point (kill -9 included) continues where it stopped and never
writes a listing twice or loses one; with greedy decoding the result is byte-identical to an
uninterrupted run. With several processes (`jax.distributed`), process p generates shards p, p + P, ...
on its own devices and, once every process has committed its shards, process 0 joins them: the output
is the union, each listing exactly once, and the same bytes as one process (each shard's sampling key
depends on the shard, not on the process). The output folder must be shared by the processes. When
every shard is there they are joined into `<output_dir>/attributes.jsonl`:
one `{"listing_id", "attributes", "malformed"}` per line (plus `"listing_key"`, the user's own listing id,
for a manifest catalog), the file `config.attributes.source` takes.
A string without EOS by `max_new_tokens` is cut there and counted as malformed, never an exception.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import grain
import jax
import numpy as np

from afmrl_jax import parallel
from afmrl_jax.attributes.parse import parse_attributes
from afmrl_jax.data import generator_data
from afmrl_jax.data.table import ListingTable
from afmrl_jax.generate.sampling import sampling_for
from afmrl_jax.eval import attributes as attribute_eval
from afmrl_jax.train import model as builders
from afmrl_jax.config import schema
from afmrl_jax.stages import generator
from afmrl_jax.train import metrics_log as train_logging
from afmrl_jax.train import catalog as catalog_lib
from afmrl_jax.train.files import write_atomically

def shard_path(folder: str, k: int) -> str:
  return os.path.join(folder, f"shard-{k:05d}.jsonl")



def _rows(catalog, splits) -> tuple[ListingTable, np.ndarray]:
  """The chosen splits' listings and their rows in listing-id order."""
  bad = [x for x in splits if x not in generator_data.SPLITS]
  if bad:
    raise ValueError(f"config.generation.splits names unknown splits {bad}; splits: {list(generator_data.SPLITS)}.")
  table = ListingTable.from_catalog(catalog, tuple(splits))
  return table, np.argsort(table.listing_id, kind="stable")



def _shard_lines(model, tokenizer, table, rows, keys, data_cfg, mesh, sampling, rng_key) -> tuple[str, dict]:
  """The JSONL text of one shard's `rows` and its generation stats; `keys`: listing id -> the user's id."""
  # Each process generates whole shards on its own devices: its batches are the shard's, not a slice.
  batches = generator_data.prompt_batches(table, tokenizer, data_cfg, rows, with_answers=False,
                                          shard_options=grain.sharding.NoSharding())
  grid = generator_data.image_grid_thw(data_cfg)
  texts, cut, stats = attribute_eval.generate_strings(model, tokenizer, batches, grid, mesh, sampling, rng_key)
  lines = []
  for i in rows:
    lid = int(table.listing_id[i])
    malformed = parse_attributes(texts[lid]).malformed or lid in cut
    record = {"listing_id": lid, "attributes": texts[lid], "malformed": bool(malformed)}
    if keys.get(lid):
      record["listing_key"] = keys[lid]
    lines.append(json.dumps(record))
  return "".join(line + "\n" for line in lines), stats


def run_generation(run: schema.Run, workdir: str) -> dict[str, Any]:
  """The `generate` stage; returns a summary (counts, malformed rate, listings/s, the output path)."""
  opts = run.generation

  # Mesh: each process generates its own shards on its own devices (`mesh` is the per-process shape).
  mesh = parallel.make_mesh(run.mesh, devices=jax.local_devices())

  # Data and model.
  catalog, tokenizer, _ = catalog_lib.load_catalog(run, workdir)
  table, rows = _rows(catalog, opts.splits)
  keys = {l.listing_id: l.listing_key for l in catalog.listings}  # "" for the synthetic catalog
  data_cfg = generator.data_config(run)
  if opts.shard_size % data_cfg.eval_batch_size:
    raise ValueError(f"config.generation.shard_size={opts.shard_size} must be a multiple of "
                     f"config.generator.eval_batch_size={data_cfg.eval_batch_size}.")
  model = generator.load_generator(run, tokenizer, mesh)
  vl = builders.vl_config(run, tokenizer)
  sampling = sampling_for(vl, temperature=opts.temperature, top_p=opts.top_p, max_new_tokens=opts.max_new_tokens)

  # Shards: skip the committed ones, generate and commit the rest.
  folder = os.path.join(workdir, opts.output_dir)
  os.makedirs(folder, exist_ok=True)
  num_shards = -(-len(rows) // opts.shard_size)
  mine = range(jax.process_index(), num_shards, jax.process_count())
  mine_prefixes = tuple(os.path.basename(shard_path(folder, k)) + ".tmp-" for k in mine)
  for name in os.listdir(folder):  # this process's writes that a kill interrupted: never committed, never read
    if name.startswith(mine_prefixes):
      os.remove(os.path.join(folder, name))
  todo = [k for k in mine if not os.path.exists(shard_path(folder, k))]
  shard_rows = lambda k: rows[k * opts.shard_size:(k + 1) * opts.shard_size]
  my_rows = sum(len(shard_rows(k)) for k in mine)
  done_rows = my_rows - sum(len(shard_rows(k)) for k in todo)
  prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
  t0, made = time.perf_counter(), 0
  for k in todo:
    text, _ = _shard_lines(model, tokenizer, table, shard_rows(k), keys, data_cfg, mesh, sampling,
                           jax.random.key(opts.seed * 1_000_003 + k))
    write_atomically(shard_path(folder, k), text)
    made += len(shard_rows(k))
    rate = made / (time.perf_counter() - t0)
    left = my_rows - done_rows - made
    print(f"{prefix}shard {k + 1}/{num_shards} | {train_logging.progress_bar(done_rows + made, my_rows)} | "
          f"{rate:.1f} listings/s | ETA {train_logging.format_duration(left / rate)}", file=sys.stdout, flush=True)

  # Join (process 0, after every process committed its shards): one file, listing-id order, each listing once.
  # Every process returns only once it is there: the next stage (a CIT chain's stage1) reads it everywhere.
  parallel.barrier("generate_shards_committed")
  summary = {"generated_now": made, "shards": len(mine)}
  if parallel.is_process_0():
    text = "".join(open(shard_path(folder, k), encoding="utf-8").read() for k in range(num_shards))
    out = os.path.join(folder, "attributes.jsonl")
    write_atomically(out, text)
    records = [json.loads(line) for line in text.splitlines()]
    elapsed = time.perf_counter() - t0
    summary = {"output": out, "listings": len(records), "generated_now": made,
               "resumed_shards": len(mine) - len(todo),
               "malformed_rate": float(np.mean([r["malformed"] for r in records])),
               "listings_per_s": made / elapsed if made and elapsed > 0 else None}
  parallel.barrier("generate_joined")
  return summary
