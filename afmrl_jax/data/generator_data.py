"""Examples for the attribute generator: image + title -> `key: value; ...` (SFT targets and prompts).

Token layout, the one `generate.sampling` decodes into and `generate.logprobs` scores:

    prompt  [Tp], left-padded:  [pad ...] instruction(keys) <|vision_start|> <|image_pad|> x N
                                <|vision_end|> title "\\nattributes:"
    answer  [Ta], right-padded: attribute string <|im_end|> [pad ...]      (SFT only)

The instruction names the category's attribute keys, so the generator knows what to describe. Only the
title is truncated when the prompt is too long (never the image tokens); an answer longer than Ta is cut
and keeps no EOS (`answer_length` counts what is kept).

Batches (process-local, grain): `prompt_ids`, `prompt_mask` int32 [B, Tp], `pixel_values` float32
[B, P, 1176], `answer_ids` int32 [B, Ta], `answer_length` int32 [B] (SFT), `listing_id`, `category_id`
int32 [B], `valid` int32 [B] (evaluation passes: 0 on padding rows).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import grain
import numpy as np

from afmrl_jax.data import image_patches, schema
from afmrl_jax.data import tokenizer as tokenizer_lib
from afmrl_jax.data.table import ListingTable
from afmrl_jax.fields import Checked, bounded, choice, non_negative, positive

ANSWER_SOURCES = ("teacher", "true")
SPLITS = ("train", "gallery", "query", "heldout")
_S_ORDER = 201


ANSWER_CUE = "\nattributes:"  # ends every prompt: the answer follows it


def instruction(category: str) -> str:
  """The generator's instruction for a listing of `category` (names the keys to describe)."""
  keys = ", ".join(schema.category_keys(category)) or "the product's attributes"
  return f"{category} attributes ({keys}):"


def min_prompt_len(num_image_tokens: int) -> int:
  """A floor for `max_prompt_len`: the image tokens, vision start/end and the answer cue (at most a token per
  byte under a byte-level BPE tokenizer). The instruction comes on top: its tokens depend on the category's
  keys and the tokenizer (a manifest's categories come from its rows), so it is not counted."""
  return num_image_tokens + 2 + len(ANSWER_CUE.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class GeneratorDataConfig(Checked):
  """Shapes and sources of the generator's examples."""
  batch_size: int = positive(32)  # global training batch
  eval_batch_size: int = positive(32)  # global batch of generation passes
  image_size: int = positive(56)  # images are resized to this square before patching
  max_prompt_len: int = positive(64)  # Tp, prompt tokens including the image tokens
  max_answer_len: int = positive(48)  # Ta, answer tokens including EOS
  answer_source: str = choice("teacher", ANSWER_SOURCES)  # SFT targets: the teacher's or the true attributes
  seed: int = 0  # order of the training stream: a function of (seed, epoch) only
  num_epochs: int = positive(1_000_000)
  num_threads: int = positive(2)
  prefetch_buffer_size: int = 4


@dataclasses.dataclass(frozen=True)
class GenerationOptions(Checked):
  """What the generate stage covers and how it samples."""
  splits: tuple[str, ...] = SPLITS  # catalog splits to cover
  shard_size: int = positive(256)  # listings per committed shard (a multiple of generator.eval_batch_size)
  temperature: float = non_negative(0.0)  # 0 = greedy
  top_p: float = bounded(1.0, 0.0, 1.0)
  max_new_tokens: int = positive(48)
  seed: int = 0  # sampling: shard k draws from key(seed, k)
  output_dir: str = "generated"  # relative to the workdir


def image_grid_thw(config: GeneratorDataConfig) -> tuple[int, int, int]:
  """(t, h, w) patch grid shared by every image of these examples."""
  return tuple(int(g) for g in image_patches.grid_thw(config.image_size, config.image_size))


class GeneratorEncoder:
  """Turns (category, image, title[, answer]) into the arrays of one example."""

  def __init__(self, tokenizer, config: GeneratorDataConfig):
    self.config = config
    self.ids = tokenizer_lib.special_ids(tokenizer)
    self._text = tokenizer_lib.ThreadSafeEncoder(tokenizer)
    self.patch_cfg = image_patches.PatchConfig()
    self.image_grid_thw = image_grid_thw(config)
    self.num_image_tokens = int(np.prod(self.image_grid_thw)) // self.patch_cfg.merge_size ** 2

  def prompt(self, category: str, title: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_ids, prompt_mask) int32 [Tp], left-padded."""
    tp = self.config.max_prompt_len
    head = (self._text.cached(instruction(category)) + [self.ids["vision_start"]]
            + [self.ids["image_pad"]] * self.num_image_tokens + [self.ids["vision_end"]])
    tail = self._text.cached(ANSWER_CUE)
    budget = tp - len(head) - len(tail)
    if budget < 0:
      raise ValueError(f"GeneratorDataConfig.max_prompt_len={tp} cannot hold the instruction and "
                       f"{self.num_image_tokens} image tokens ({len(head) + len(tail)} needed); raise it")
    toks = head + self._text.encode(title)[:budget] + tail
    ids = np.full(tp, self.ids["pad"], np.int32)
    mask = np.zeros(tp, np.int32)
    ids[tp - len(toks):], mask[tp - len(toks):] = toks, 1
    return ids, mask

  def answer(self, text: str) -> tuple[np.ndarray, int]:
    """(answer_ids int32 [Ta] right-padded, kept length incl. EOS when it fits)."""
    ta = self.config.max_answer_len
    toks = (self._text.encode(" " + text) + [self.ids["eos"]])[:ta]
    ids = np.full(ta, self.ids["pad"], np.int32)
    ids[:len(toks)] = toks
    return ids, len(toks)

  def pixels(self, image: np.ndarray) -> np.ndarray:
    s = self.config.image_size
    if image.shape[:2] != (s, s):
      from PIL import Image
      image = np.asarray(Image.fromarray(image).resize((s, s), Image.BICUBIC))
    return image_patches.patchify(image, self.patch_cfg)

  def example(self, table: ListingTable, i: int, answer: str | None) -> dict[str, np.ndarray]:
    ids, mask = self.prompt(table.category[i], table.title[i])
    out = {"prompt_ids": ids, "prompt_mask": mask, "pixel_values": self.pixels(table.image(i)),
           "listing_id": np.int32(table.listing_id[i]), "category_id": np.int32(table.category_id[i])}
    if answer is not None:
      out["answer_ids"], length = self.answer(answer)
      out["answer_length"] = np.int32(length)
    return out


def _answer(table: ListingTable, i: int, source: str) -> str:
  return table.teacher_attributes[i] if source == "teacher" else table.product_attributes[i]


def _process_slice(batch_size: int, shard_options) -> tuple[int, int]:
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  p, n = shard_options.shard_index, shard_options.shard_count
  if batch_size % n:
    raise ValueError(f"generator batch_size={batch_size} (global) must be divisible by the {n} processes")
  return p, batch_size // n


def sft_dataset(table: ListingTable, tokenizer, config: GeneratorDataConfig, *,
                shard_options: grain.sharding.ShardOptions | None = None,
                answers_by_listing: Mapping[int, str] | None = None) -> grain.IterDataset:
  """Endless stream of process-local SFT batches; `iter(...)` is checkpointable (get/set_state).

  Epoch e is a permutation of the table drawn from (seed, e); process p takes its slice of every global
  batch, so the batches do not depend on the number of processes. `answers_by_listing` overrides the
  target strings (listing_id -> text).
  """
  enc = GeneratorEncoder(tokenizer, config)
  p, local_b = _process_slice(config.batch_size, shard_options)
  b = config.batch_size
  per_epoch = len(table) // b
  if per_epoch == 0:
    raise ValueError(f"split {table.name!r} has {len(table)} listings, fewer than one batch ({b})")

  @functools.lru_cache(maxsize=4)
  def order(epoch: int) -> np.ndarray:
    return np.random.default_rng([config.seed, _S_ORDER, epoch]).permutation(len(table))

  def element(k: int) -> dict:
    gb, slot = divmod(int(k), local_b)
    epoch, bi = divmod(gb, per_epoch)
    i = int(order(epoch)[bi * b + p * local_b + slot])
    lid = int(table.listing_id[i])
    answer = (answers_by_listing or {}).get(lid) or _answer(table, i, config.answer_source)
    return enc.example(table, i, answer)

  total = config.num_epochs * per_epoch * local_b
  ds = grain.MapDataset.range(total).map(element).batch(local_b, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                              prefetch_buffer_size=config.prefetch_buffer_size))


def prompt_batches(table: ListingTable, tokenizer, config: GeneratorDataConfig, rows: np.ndarray | None = None,
                   *, shard_options: grain.sharding.ShardOptions | None = None, with_answers: bool = True):
  """One ordered pass over `rows` of `table` (default all) in process-local batches of
  `eval_batch_size / processes`; the last global batch is padded (`valid` = 0) by repeating a row."""
  enc = GeneratorEncoder(tokenizer, config)
  p, local_b = _process_slice(config.eval_batch_size, shard_options)
  b = config.eval_batch_size
  rows = np.arange(len(table)) if rows is None else np.asarray(rows)
  n_global = -(-len(rows) // b)

  def element(k: int) -> dict:
    gb, slot = divmod(int(k), local_b)
    pos = gb * b + p * local_b + slot
    valid = pos < len(rows)
    i = int(rows[pos if valid else 0])
    out = enc.example(table, i, _answer(table, i, config.answer_source) if with_answers else None)
    out["valid"] = np.int32(valid)
    return out

  ds = grain.MapDataset.range(n_global * local_b).map(element).batch(local_b, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                              prefetch_buffer_size=config.prefetch_buffer_size))
