"""Embedded tokenizer: deterministic training, HF format, special tokens, offline loading."""
import hashlib
import json
import os

import pytest

from afmrl_jax.data import tokenizer

TEXTS = [f"{c} {p} {n} dress with {l} logo" for c in ("red", "navy", "pink", "beige") for p in ("striped", "plain")
         for n in ("v-neck", "round neck", "collared") for l in ("white", "black")] + ["colour: red; sleeve: long"] * 3


def _sha(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_training_is_deterministic_and_order_free(tmp_path):
  tokenizer.default_tokenizer(TEXTS, str(tmp_path / "a"), vocab_size=400)
  tokenizer.default_tokenizer(list(reversed(TEXTS)) + TEXTS[:5], str(tmp_path / "b"), vocab_size=400)
  assert _sha(tmp_path / "a" / "tokenizer.json") == _sha(tmp_path / "b" / "tokenizer.json")
  assert os.path.isfile(tmp_path / "a" / "tokenizer_config.json")


def test_special_tokens_and_round_trip(tmp_path):
  tok = tokenizer.default_tokenizer(TEXTS, str(tmp_path), vocab_size=400)
  ids = tokenizer.special_ids(tok)
  assert [ids[k] for k in ("pad", "im_start", "eos", "vision_start", "vision_end", "image_pad")] == list(range(6))
  assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
  text = "navy v-neck dress, ünïcode 🙂 <|image_pad|><|image_pad|>"
  enc = tok(text, add_special_tokens=False)["input_ids"]
  assert enc.count(ids["image_pad"]) == 2
  assert tok.decode(enc) == text
  # merges learnt from the corpus: a frequent word is a single token
  assert len(tok(" dress", add_special_tokens=False)["input_ids"]) == 1


def test_load_checks_directory_and_special_tokens(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenizer.load_tokenizer(str(tmp_path))
  from tokenizers import Tokenizer, models, pre_tokenizers
  bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  bare.pre_tokenizer = pre_tokenizers.Whitespace()
  bare.save(str(tmp_path / "tokenizer.json"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)
  with pytest.raises(ValueError, match="image_pad"):
    tokenizer.load_tokenizer(str(tmp_path))
