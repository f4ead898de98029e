"""Prompt construction for the representation model (query and candidate sides).

Token layout, left-padded to a fixed length `T` (the embedding is the last token's state, so the real
tokens end at position T-1 in every row):

    [pad ...] instruction <|vision_start|> <|image_pad|> x N <|vision_end|> text <|im_end|>

N = merged image tokens (`image_patches.num_image_tokens`). `text` is the title, optionally followed by
`\\nattributes: key: value; ...`; only the text is truncated (from its end) when the prompt is too long,
never the image tokens. An image-free prompt (the text side of `pair_mode='image_text'`) drops the three
vision parts.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from afmrl_jax.data import tokenizer as tokenizer_lib

QUERY_INSTRUCTION = "Find the identical product: "
CANDIDATE_INSTRUCTION = "Represent this product: "


def prompt_text(title: str, attributes: str | None = None) -> str:
  """The text part: title, plus the attribute string when given (and non-empty)."""
  return f"{title}\nattributes: {attributes}" if attributes else title


def min_length(num_image_tokens: int, *instructions: str) -> int:
  """The shortest `max_length` that holds each instruction, the image tokens, vision start/end and eos
  under any byte-level BPE tokenizer (ours, Qwen's: a token is at least one byte), so `build` never fails;
  the title then gets what is left. Config validation uses it before any tokenizer exists."""
  return num_image_tokens + 3 + max((len(i.encode("utf-8")) for i in instructions), default=0)


@dataclasses.dataclass
class PromptBuilder:
  """Tokenizes prompts to int32 [T] ids + mask. `tokenizer`: a HF fast tokenizer with the special tokens."""
  tokenizer: object
  num_image_tokens: int
  max_length: int

  def __post_init__(self):
    self.ids = tokenizer_lib.special_ids(self.tokenizer)
    self._text = tokenizer_lib.ThreadSafeEncoder(self.tokenizer)
    if self.max_length < self.num_image_tokens + 3:
      raise ValueError(f"prompt max_length={self.max_length} cannot hold {self.num_image_tokens} image tokens "
                       "plus vision start/end and eos; raise the max text length in the config")

  def build(self, instruction: str, text: str, *, with_image: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """-> (input_ids int32 [T], attention_mask int32 [T]), left-padded."""
    head = list(self._text.cached(instruction))
    if with_image:
      head += [self.ids["vision_start"]] + [self.ids["image_pad"]] * self.num_image_tokens + [self.ids["vision_end"]]
    budget = self.max_length - len(head) - 1
    if budget < 0:
      raise ValueError(f"prompt max_length={self.max_length} is shorter than the instruction + image tokens "
                       f"({len(head) + 1}); raise it or shorten the instruction {instruction!r}")
    body = self._text.encode(text)[:budget] if text else []
    toks = head + body + [self.ids["eos"]]
    ids = np.full(self.max_length, self.ids["pad"], np.int32)
    mask = np.zeros(self.max_length, np.int32)
    ids[self.max_length - len(toks):] = toks
    mask[self.max_length - len(toks):] = 1
    return ids, mask
