"""Tokenizers: load any local HF tokenizer directory offline; train the embedded default one.

The default is a small byte-level BPE (GPT-2 / Qwen style pre-tokenisation, so any string round-trips)
trained with `tokenizers` on the catalog's own text. Training is deterministic: the corpus is sorted and
de-duplicated first and the BPE trainer breaks ties by token order. Special tokens come first (ids 0..5),
in Qwen2-VL's names, so prompts built here work with real Qwen2-VL tokenizers too.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
SPECIAL_TOKENS = (PAD, IM_START, EOS, VISION_START, VISION_END, IMAGE_PAD)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
  """Byte-level BPE on `texts` (order and duplicates do not matter)."""
  corpus = sorted(set(texts))
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                                min_frequency=2)
  tok.train_from_iterator(corpus, trainer=trainer)
  return tok


def default_tokenizer(catalog_texts: Iterable[str], directory: str, vocab_size: int = 2048
                      ) -> PreTrainedTokenizerFast:
  """Trains the embedded tokenizer on `catalog_texts`, saves it in HF format to `directory`
  (tokenizer.json + tokenizer_config.json + special_tokens_map.json) and returns it loaded from there."""
  tok = train_tokenizer(catalog_texts, vocab_size)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=None, unk_token=None,
      additional_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD], padding_side="left",
      model_max_length=4096)
  os.makedirs(directory, exist_ok=True)
  fast.save_pretrained(directory)
  return load_tokenizer(directory)


def load_tokenizer(directory: str) -> PreTrainedTokenizerFast:
  """Loads a local HF tokenizer directory (needs tokenizer.json) without network access.

  Checks that the special tokens the prompts use exist; pad defaults to `<|endoftext|>` and eos to
  `<|im_end|>` when the directory does not set them (Qwen2-VL's own tokenizer sets both).
  """
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer directory {directory!r} has no tokenizer.json (a HF fast tokenizer "
                            "directory is needed; build the default one with data.default_tokenizer)")
  tok = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
  vocab = tok.get_vocab()
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(f"tokenizer {directory!r} lacks the special tokens {missing} that image prompts need")
  if tok.pad_token is None:
    tok.pad_token = PAD
  if tok.eos_token is None:
    tok.eos_token = EOS
  tok.padding_side = "left"
  return tok


def special_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
  """{'pad', 'eos', 'im_start', 'vision_start', 'vision_end', 'image_pad'} -> id."""
  names = {"pad": tok.pad_token, "eos": tok.eos_token, "im_start": IM_START, "vision_start": VISION_START,
           "vision_end": VISION_END, "image_pad": IMAGE_PAD}
  return {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}


class ThreadSafeEncoder:
  """Text -> token ids through a private copy of a HF fast tokenizer's Rust backend.

  The copy has no truncation or padding, so encoding never mutates shared state and grain's reader
  threads may call it concurrently (the HF wrapper's `__call__` resets truncation on every call, which
  fails with "Already borrowed" across threads). `cached` memoises fixed strings (instructions).
  """

  def __init__(self, tokenizer):
    from tokenizers import Tokenizer
    self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    self._backend.no_truncation()
    self._backend.no_padding()
    self._cache: dict[str, list[int]] = {}

  def encode(self, text: str) -> list[int]:
    return self._backend.encode(text, add_special_tokens=False).ids

  def cached(self, text: str) -> list[int]:
    if text not in self._cache:
      self._cache[text] = self.encode(text)
    return self._cache[text]
