"""grain pipelines: training pairs and evaluation batches, as dicts of NumPy arrays per process-local batch.

Training (`train_dataset`): each element is a query listing and a candidate, by default another listing
of the same product (`pair_mode='listing'`), or the listing's own text (`pair_mode='image_text'`: query =
image + instruction, candidate = text without image tokens, `candidate_pixel_values` zero). Keys:
  query_input_ids, query_attention_mask  int32 [B, T]      (left padding)
  query_pixel_values                     float32 [B, P, 1176]  (Qwen2-VL patches, temporal patch 2)
  candidate_*                            likewise
  query_terms, candidate_terms           int32 [B, K]      (BM25 term ids of the attribute strings, 0-padded)
  product_id, listing_id, true_product_id, family_id, category_id   int32 [B]  (query listing's)
  candidate_listing_id                   int32 [B]
  candidate_has_image                    int32 [B]         (0 only for image_text pairs)

Order: the *global* stream is planned per epoch from (seed, epoch) alone (a permutation of the split's
listings, or family-mixed batches), cut into global batches of `batch_size`; process p of n takes rows
[p*B/n, (p+1)*B/n) of every global batch, so the processes together see each global batch exactly once
and the result does not depend on the number of processes. Every random choice (candidate listing, fresh
view) is a function of (seed, epoch, global position), so iterator state is just grain's position:
`it.get_state()` / `it.set_state(state)` resume exactly.

Evaluation (`eval_dataset`): single listings of one split in order, side `query` or `candidate`
(instruction), same tokenization; padded to whole global batches, with `valid` int32 [B] marking padding.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import grain
import numpy as np
from PIL import Image

from afmrl_jax.data import catalog as catalog_lib
from afmrl_jax.data import image_patches, prompts
from afmrl_jax.data.table import ListingTable
from afmrl_jax.fields import Checked, bounded, choice, non_negative, positive

_S_PLAN, _S_CAND, _S_FAMILY = 101, 102, 103
PAIR_MODES = ("listing", "image_text")
BATCHINGS = ("random", "family_mixed")
ATTRIBUTE_SOURCES = ("none", "teacher", "true")


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Checked):
  """How listings become batches. `image_size`, `text_attributes` and `term_source` are set by the
  trainer from other config sections (the catalog's image size, the attribute options)."""
  batch_size: int = positive(32)  # global training batch (all processes together)
  eval_batch_size: int = positive(64)  # global batch of the evaluation passes
  image_size: int = positive(64)  # images are resized to this square before patching (static patch count)
  max_text_len: int = positive(64)  # T, tokens per prompt including the image tokens
  max_terms: int = positive(32)  # K, BM25 terms per attribute string
  pair_mode: str = choice("listing", PAIR_MODES)
  batching: str = choice("random", BATCHINGS)
  family_share: float = bounded(0.5, 0.0, 1.0)  # family_mixed: share of each batch made of whole families
  fresh_views: bool = False  # render new views of training products each epoch (synthetic catalog only)
  text_attributes: str = choice("none", ATTRIBUTE_SOURCES)  # attributes appended to the prompt text
  term_source: str = choice("teacher", ATTRIBUTE_SOURCES[1:])  # attribute string that gives the BM25 terms
  seed: int = 0  # order, candidate choice and fresh views are functions of (seed, epoch, position)
  train_fraction: float = bounded(1.0, 0.01, 1.0)  # share of the training products used (seeded, whole products)
  num_epochs: int = positive(1_000_000)  # length of the training stream (effectively endless by default)
  query_instruction: str = prompts.QUERY_INSTRUCTION
  candidate_instruction: str = prompts.CANDIDATE_INSTRUCTION
  num_threads: int = positive(2)  # grain read threads (the order of batches does not depend on it)
  prefetch_buffer_size: int = non_negative(4)
  worker_processes: int = non_negative(0)  # >0: grain mp_prefetch processes (same batches and state)



def image_grid_thw(config: PipelineConfig) -> np.ndarray:
  """int32 [3]: (t, h, w) patch grid shared by every image of this pipeline."""
  return np.asarray(image_patches.grid_thw(config.image_size, config.image_size), np.int32)


def num_patches(config: PipelineConfig) -> int:
  return int(np.prod(image_grid_thw(config)))


def _shard(shard_options, batch_size: int) -> tuple[int, int, int]:
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  p, n = shard_options.shard_index, shard_options.shard_count
  if batch_size % n:
    raise ValueError(f"PipelineConfig.batch_size={batch_size} (global) must be divisible by the number of "
                     f"processes/shards ({n})")
  return p, n, batch_size // n


class ListingEncoder:
  """Turns (image, text, attribute strings) into the arrays of one side of an element."""

  def __init__(self, tokenizer, stats, config: PipelineConfig):
    self.config = config
    self.stats = stats
    p = num_patches(config)
    self.patch_cfg = image_patches.PatchConfig()
    self.prompts = prompts.PromptBuilder(tokenizer, p // self.patch_cfg.merge_size ** 2, config.max_text_len)
    self.zero_pixels = np.zeros((p, self.patch_cfg.patch_dim), np.float32)

  def pixels(self, image: np.ndarray) -> np.ndarray:
    s = self.config.image_size
    if image.shape[:2] != (s, s):
      image = np.asarray(Image.fromarray(image).resize((s, s), Image.BICUBIC))
    return image_patches.patchify(image, self.patch_cfg)

  def side(self, instruction: str, image, title: str, attributes: str | None, terms_text: str) -> dict:
    with_image = image is not None
    text = prompts.prompt_text(title, attributes)
    ids, mask = self.prompts.build(instruction, text, with_image=with_image)
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": self.pixels(image) if with_image else self.zero_pixels,
            "terms": self.stats.encode(terms_text, self.config.max_terms)}


def listing_side(enc: ListingEncoder, table: ListingTable, i: int, side: str,
                 attributes_by_listing: Mapping[int, str] | None = None,
                 terms_by_listing: Mapping[int, str] | None = None) -> dict:
  """One side ('query' | 'candidate') of listing row `i` as stored (its own image, title and attribute
  strings): `input_ids`, `attention_mask` [T], `pixel_values` [P, Dp], `terms` [K]."""
  config = enc.config
  instruction = config.query_instruction if side == "query" else config.candidate_instruction
  attrs = None if config.text_attributes == "none" else attribute_text(table, i, config.text_attributes,
                                                               attributes_by_listing)
  terms = attribute_text(table, i, config.term_source, terms_by_listing)
  return enc.side(instruction, table.image(i), table.title[i], attrs, terms)


def attribute_text(table: ListingTable, i: int, source: str, override: Mapping[int, str] | None) -> str:
  """The attribute string of row `i` under `source` ('teacher' | 'true'), or its `override` when given."""
  if override is not None and int(table.listing_id[i]) in override:
    return override[int(table.listing_id[i])]
  return table.teacher_attributes[i] if source == "teacher" else table.product_attributes[i]


class _Plan:
  """The global order of query rows, per epoch; a pure function of (seed, epoch)."""

  def __init__(self, table: ListingTable, config: PipelineConfig):
    self.table, self.config = table, config
    self.batches_per_epoch = len(table) // config.batch_size
    if self.batches_per_epoch == 0:
      raise ValueError(f"split {table.name!r} has {len(table)} listings, fewer than one global batch "
                       f"({config.batch_size})")
    self._cache: dict[int, np.ndarray] = {}
    if config.batching == "family_mixed":
      fam = table.family_id
      self.families = [np.flatnonzero(fam == f) for f in np.unique(fam)]

  def epoch(self, e: int) -> np.ndarray:
    """int64 [batches_per_epoch, batch_size] of table rows."""
    plan = self._cache.get(e)
    if plan is None:  # grain threads may race here: both compute the same plan, either is kept
      plan = self._make(e)
      if len(self._cache) > 2:
        self._cache.clear()
      self._cache[e] = plan
    return plan

  def _make(self, e: int) -> np.ndarray:
    cfg, n_b, b = self.config, self.batches_per_epoch, self.config.batch_size
    rng = np.random.default_rng([cfg.seed, _S_PLAN, e])
    perm = rng.permutation(len(self.table))
    if cfg.batching == "random":
      return perm[:n_b * b].reshape(n_b, b)
    # family_mixed: the first `f` slots of each batch hold whole families (one listing per product),
    # the rest are random listings.
    f = int(round(cfg.family_share * b))
    fam_order = rng.permutation(len(self.families))
    by_product = self.table.rows_by_product()
    out = np.empty((n_b, b), np.int64)
    fi, ri = 0, 0
    for bi in range(n_b):
      rows: list[int] = []
      tries = 0
      while tries < len(self.families):
        fam_rows = self.families[fam_order[fi % len(fam_order)]]
        products = np.unique(self.table.product_id[fam_rows])
        if len(products) > f:  # never fits: skip it
          fi, tries = fi + 1, tries + 1
          continue
        if len(rows) + len(products) > f:
          break
        for p in products:
          opts = by_product[int(p)]
          rows.append(int(opts[rng.integers(len(opts))]))
        fi += 1
        tries += 1
      need = b - len(rows)
      take = perm[np.arange(ri, ri + need) % len(perm)]
      ri += need
      out[bi] = np.concatenate([np.asarray(rows, np.int64), take])
    return out


def train_dataset(table: ListingTable, tokenizer, stats, config: PipelineConfig = PipelineConfig(), *,
                  shard_options: grain.sharding.ShardOptions | None = None,
                  fresh_view_config: catalog_lib.CatalogConfig | None = None,
                  attributes_by_listing: Mapping[int, str] | None = None,
                  terms_by_listing: Mapping[int, str] | None = None) -> grain.IterDataset:
  """Endless (num_epochs) stream of process-local training batches; `iter(...)` gives a checkpointable
  iterator. `fresh_view_config` (the catalog's config) is needed for `fresh_views`; `attributes_by_listing`
  replaces the attribute strings of the prompt text (e.g. generated attributes in CIT) and
  `terms_by_listing` those that give the BM25 terms (listing_id -> `key: value; ...`)."""
  if config.fresh_views and fresh_view_config is None:
    raise ValueError("PipelineConfig.fresh_views needs fresh_view_config (the synthetic CatalogConfig)")
  p, _, local_b = _shard(shard_options, config.batch_size)
  plan = _Plan(table, config)
  enc = ListingEncoder(tokenizer, stats, config)
  by_product = table.rows_by_product()
  b = config.batch_size
  per_epoch = plan.batches_per_epoch

  def element(k: int) -> dict:
    gb, slot = divmod(int(k), local_b)
    epoch, bi = divmod(gb, per_epoch)
    pos = gb * b + p * local_b + slot  # global position: same element whatever the process count
    q = int(plan.epoch(epoch)[bi, p * local_b + slot])
    same = by_product[int(table.product_id[q])]
    others = same[same != q]
    rng = np.random.default_rng([config.seed, _S_CAND, pos])
    c = int(others[rng.integers(len(others))]) if len(others) else q
    if config.fresh_views:
      fv = fresh_view_config
      prod = table.product_row(q)
      kw = dict(image_size=fv.image_size, detail_scale=fv.detail_scale, augment_strength=fv.augment_strength)
      q_img = catalog_lib.render_view(prod, config.seed, epoch, 2 * pos, **kw)
      c_img = catalog_lib.render_view(prod, config.seed, epoch, 2 * pos + 1, **kw)
    else:
      q_img, c_img = table.image(q), table.image(c)
    text_attr = config.text_attributes
    qa = None if text_attr == "none" else attribute_text(table, q, text_attr, attributes_by_listing)
    ca = None if text_attr == "none" else attribute_text(table, c, text_attr, attributes_by_listing)
    q_terms = attribute_text(table, q, config.term_source, terms_by_listing)
    c_terms = attribute_text(table, c, config.term_source, terms_by_listing)
    if config.pair_mode == "listing":
      qs = enc.side(config.query_instruction, q_img, table.title[q], qa, q_terms)
      cs = enc.side(config.candidate_instruction, c_img, table.title[c], ca, c_terms)
      c_row = c
    else:  # image_text: the listing's image against its own text
      qs = enc.side(config.query_instruction, q_img, "", None, q_terms)
      cs = enc.side(config.candidate_instruction, None, table.title[q], qa, q_terms)
      c_row = q
    out = {f"query_{k}": v for k, v in qs.items()}
    out.update({f"candidate_{k}": v for k, v in cs.items()})
    for f in ("product_id", "listing_id", "true_product_id", "family_id", "category_id"):
      out[f] = np.int32(getattr(table, f)[q])
    out["candidate_listing_id"] = np.int32(table.listing_id[c_row])
    out["candidate_has_image"] = np.int32(config.pair_mode == "listing")
    return out

  total = config.num_epochs * per_epoch * local_b
  ds = grain.MapDataset.range(total).map(element).batch(local_b, drop_remainder=True)
  return _to_iter(ds, config)


def _to_iter(ds: grain.MapDataset, config: PipelineConfig) -> grain.IterDataset:
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                            prefetch_buffer_size=config.prefetch_buffer_size))
  if config.worker_processes > 0:
    from absl import flags  # grain's workers read absl flags; outside an absl app nothing parsed them
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_processes))
  return it


def steps_per_epoch(table: ListingTable, config: PipelineConfig) -> int:
  return len(table) // config.batch_size


def eval_dataset(table: ListingTable, tokenizer, stats, config: PipelineConfig = PipelineConfig(), *,
                 side: str = "query", shard_options: grain.sharding.ShardOptions | None = None,
                 attributes_by_listing: Mapping[int, str] | None = None,
                 terms_by_listing: Mapping[int, str] | None = None) -> grain.IterDataset:
  """One pass over `table` in order: process-local batches of `input_ids, attention_mask, pixel_values,
  terms`, the id columns and `valid` (0 for padding rows, which repeat row 0)."""
  if side not in ("query", "candidate"):
    raise ValueError(f"eval_dataset side must be 'query' or 'candidate', got {side!r}")
  p, _, local_b = _shard(shard_options, config.eval_batch_size)
  enc = ListingEncoder(tokenizer, stats, config)
  b = config.eval_batch_size
  n_global = -(-len(table) // b)

  def element(k: int) -> dict:
    gb, slot = divmod(int(k), local_b)
    pos = gb * b + p * local_b + slot
    valid = pos < len(table)
    i = pos if valid else 0
    out = listing_side(enc, table, i, side, attributes_by_listing, terms_by_listing)
    for f in ("product_id", "listing_id", "true_product_id", "family_id", "category_id"):
      out[f] = np.int32(getattr(table, f)[i])
    out["valid"] = np.int32(valid)
    return out

  ds = grain.MapDataset.range(n_global * local_b).map(element).batch(local_b, drop_remainder=True)
  return _to_iter(ds, config)
