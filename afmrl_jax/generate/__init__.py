"""KV-cache generation for `models.vl_model.VLModel` and teacher-forced logprobs (for GRPO).

  filters.py   SamplingConfig; temperature / top-k / top-p / greedy; inverse-CDF sampling
  loop.py      model-agnostic decode loop (one compiled step in lax.while_loop, EOS per row)
  sampling.py  prefill + decode for VLModel: generate(...) -> GenerationOutput(tokens, logprobs, lengths)
  logprobs.py  completion_logprobs: per-token logprobs of given completions, teacher-forced
"""
