"""NNX models: Qwen2-VL / Qwen2.5-VL (and Llama / Qwen2 text) with HF checkpoint import/export.

  config.py         VLConfig / TextConfig / VisionConfig mirroring HF config.json
  rope.py           1-D RoPE, M-RoPE, HF get_rope_index, vision 2-D RoPE
  layers.py         dense with logical axes, RMSNorm / LayerNorm, MLPs, GQA attention
  vision.py         vision tower (patch embed, blocks, windows, patch merger)
  decoder.py        text decoder with KV cache
  vl_model.py       VLModel: image splicing, LM head
  heads.py          embed (last token, L2-normalised) and logits
  hf_checkpoint.py  streamed, sharded safetensors import / export
  sharding.py       logical axes -> shardings, sharded construction
"""
