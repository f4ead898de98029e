"""Decode benchmark: our KV-cache sampler (JAX) vs HF `generate` (PyTorch), same process, same weights.

"bench-small": Qwen2.5-VL, text hidden 256, 4 layers, 4 heads, 2 kv heads, intermediate 1024,
vocab 8192, M-RoPE sections [8, 12, 12], tied embeddings; vision depth 4, width 128, 4 heads,
intermediate 256, window 56, full-attention block 3; 112x112 images (8x8 patches, 16 merged image
tokens); batch 16, 32-token text prompt, 32 sampled new tokens (temperature 1, no EOS stop, so both
sides generate exactly 32 tokens per row).

Random HF weights are saved to a temporary directory and imported into our model, so both sides
run the same network. Reported per side: end-to-end generate time (prefill + decode), its
new-tokens/s, and decode-only tokens/s from (time(N new) - time(1 new)) / (N - 1) steps (medians
over `--repeats` rounds). Every round runs all four measurements (HF and ours, N and 1 new
tokens) back to back, so a shared machine's changing load hits both sides alike; the speed-ups
are reported as ratios of the medians and as the median of the per-round ratios.
Prints a markdown table and writes JSON (`--json`).

`--roofline` instead times our decode step alone on a bigger text decoder (default: Qwen2-VL-2B's
decoder, bfloat16, batch 64) and reports the fraction of the memory-bandwidth roofline: the bytes
one step must read (all parameters + the KV cache slots attended) over `--hbm_gbps` (H200: 4800),
divided by the measured step time. Meant for an accelerator; `--preset tiny` checks it on a CPU.

  python launch/bench_decode.py --json /tmp/bench_decode.json
  # both sides single-threaded (fairer on a busy machine, where 2-thread torch degrades badly):
  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python launch/bench_decode.py --torch_threads 1
  python launch/bench_decode.py --roofline --batch 64 --prompt_len 128 --new_tokens 128 --hbm_gbps 4800
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import bench_common  # launch/ (this script's folder) is on sys.path

IMAGE, VIDEO, V_START, V_END = 8000, 8001, 8002, 8003


def hf_bench_small(seed: int):
  """The random bench-small HF Qwen2.5-VL model (float32, eval mode)."""
  import torch
  import transformers as tf

  text = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6},
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
  vision = dict(depth=4, hidden_size=128, intermediate_size=256, out_hidden_size=256, num_heads=4,
                spatial_merge_size=2, window_size=56, fullatt_block_indexes=[3], patch_size=14,
                temporal_patch_size=2)
  config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                               video_token_id=VIDEO, vision_start_token_id=V_START,
                               vision_end_token_id=V_END, tie_word_embeddings=True)
  torch.manual_seed(seed)
  return tf.Qwen2_5_VLForConditionalGeneration(config).eval()


def inputs(batch: int, prompt_len: int, seed: int):
  """Prompts `<vision_start> 16 x <image_pad> <vision_end> text...` (left-padded) and 112x112 patches."""
  rng = np.random.default_rng(seed)
  grid = (1, 8, 8)
  n_img = 16
  t = prompt_len + n_img + 2
  ids = np.zeros((batch, t), np.int32)
  mask = np.zeros((batch, t), np.int32)
  for b in range(batch):
    text_len = prompt_len - (b % 4)  # a little left padding in some rows
    row = [V_START] + [IMAGE] * n_img + [V_END] + list(rng.integers(3, 7999, size=text_len))
    ids[b, t - len(row):] = row
    mask[b, t - len(row):] = 1
  pixels = rng.standard_normal((batch, int(np.prod(grid)), 3 * 2 * 14 * 14)).astype(np.float32)
  return ids, mask, pixels, grid


def _time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def hf_runner(model, ids, mask, pixels, grid, new_tokens: int):
  """A callable running HF `generate` once (sampling exactly `new_tokens` tokens per row)."""
  import torch

  kw = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            pixel_values=torch.tensor(pixels.reshape(-1, pixels.shape[-1])),
            image_grid_thw=torch.tensor([grid] * ids.shape[0]),
            mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))

  def run():
    with torch.no_grad():
      out = model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens
  return run


def ours_runner(model, ids, mask, pixels, grid, new_tokens: int):
  """A callable running our `generate` once (compiled on first call)."""
  from afmrl_jax.generate import sampling
  from afmrl_jax.generate.filters import SamplingConfig

  cfg = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens, eos_ids=())
  args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
  key = jax.random.key(0)

  def run():
    out = sampling.generate(model, *args, grid, rng=key, config=cfg)
    jax.block_until_ready(out)
    assert out.tokens.shape == (ids.shape[0], new_tokens)
  return run


ROOFLINE_PRESETS = {
    # Qwen2-VL-2B's text decoder (the representation model of the paper); tied embeddings.
    "2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, mrope_section=(16, 24, 24),
               tie_word_embeddings=True),
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                 tie_word_embeddings=True),
}


def roofline(args) -> dict:
  """Our decode step on a text decoder vs the memory-bandwidth bound (see module docstring)."""
  from flax import nnx

  from afmrl_jax import parallel
  from afmrl_jax.models import sharding
  from afmrl_jax.models.config import TextConfig, VLConfig
  from afmrl_jax.models.vl_model import VLModel

  text = TextConfig(**ROOFLINE_PRESETS[args.preset], eos_token_id=None)
  config = VLConfig(model_type="qwen2_vl", text=text, vision=None, dtype=args.dtype, param_dtype=args.dtype)
  mesh = parallel.make_mesh({"data": -1})
  model = sharding.create_sharded(lambda: VLModel(config, rngs=nnx.Rngs(0)), mesh)
  b, t, n = args.batch, args.prompt_len, args.new_tokens
  rng = np.random.default_rng(args.seed)
  batch = parallel.global_batch({"ids": rng.integers(3, text.vocab_size, (b, t)).astype(np.int32),
                                 "mask": np.ones((b, t), np.int32)}, mesh)

  def timed(new_tokens):
    from afmrl_jax.generate import sampling
    from afmrl_jax.generate.filters import SamplingConfig
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
    with jax.set_mesh(mesh):
      run = lambda: jax.block_until_ready(
          sampling.generate(model, batch["ids"], batch["mask"], rng=jax.random.key(0), config=cfg))
      run()
      return _time(run, args.repeats)

  step_s = (timed(n) - timed(1)) / (n - 1)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  itemsize = jnp.dtype(args.dtype).itemsize
  # Each step attends over all t + n cache slots (static shapes), k and v, every layer.
  kv_bytes = 2 * text.num_hidden_layers * b * (t + n) * text.num_key_value_heads * text.dim_per_head * itemsize
  bound_s = (param_bytes + kv_bytes) / (args.hbm_gbps * 1e9)
  result = {"preset": args.preset, "dtype": args.dtype, "batch": b, "prompt_tokens": t, "new_tokens": n,
            "device": str(jax.devices()[0].device_kind), "param_bytes": int(param_bytes),
            "kv_bytes_per_step": int(kv_bytes), "ms_per_decode_step": 1000 * step_s,
            "roofline_ms_per_step": 1000 * bound_s, "roofline_fraction": bound_s / step_s,
            "decode_tokens_per_s": b / step_s, "hbm_gbps": args.hbm_gbps}
  print("| preset | batch | ms / step | roofline ms / step | fraction of roofline | decode tokens/s |")
  print("|---|---|---|---|---|---|")
  print(f"| {args.preset} ({args.dtype}) | {b} | {1000 * step_s:.2f} | {1000 * bound_s:.3f} | "
        f"{bound_s / step_s:.1%} | {b / step_s:.0f} |")
  return result


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt_len", type=int, default=32, help="text tokens per prompt (plus 18 image tokens)")
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
  ap.add_argument("--json", default="", help="write the results here as JSON")
  ap.add_argument("--roofline", action="store_true", help="our decode step vs the bandwidth bound only")
  ap.add_argument("--preset", default="2b", choices=sorted(ROOFLINE_PRESETS))
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--hbm_gbps", type=float, default=4800.0, help="memory bandwidth, GB/s (H200: 4800)")
  args = ap.parse_args()
  if args.roofline:
    results = roofline(args)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    return

  import torch

  from afmrl_jax.models import hf_checkpoint

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  hf = hf_bench_small(args.seed)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    ours, _ = hf_checkpoint.load_hf_checkpoint(d)
  ids, mask, pixels, grid = inputs(args.batch, args.prompt_len, args.seed)
  n, b = args.new_tokens, args.batch

  results = {"config": "bench-small", "batch": b, "prompt_tokens": int(ids.shape[1]), "new_tokens": n,
             "devices": str(jax.devices()[0].device_kind), "torch_threads": torch.get_num_threads(),
             "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "load_average": os.getloadavg()[0]}
  sides = (("hf_generate", hf_runner, hf), ("afmrl_jax", ours_runner, ours))
  runners = {(name, k): make(model, ids, mask, pixels, grid, k) for name, make, model in sides for k in (n, 1)}
  measured = bench_common.interleaved(runners, args.repeats)
  times = measured["times"]
  results["load_per_round"] = measured["load"]
  for name, _, _ in sides:
    total, one = statistics.median(times[name, n]), statistics.median(times[name, 1])
    decode_s = max(total - one, 1e-9)
    results[name] = {"generate_s": total, "prefill_plus_1_s": one,
                     "tokens_per_s": b * n / total, "decode_tokens_per_s": b * (n - 1) / decode_s,
                     "ms_per_decode_step": 1000 * decode_s / (n - 1)}
  results["speedup_end_to_end"] = results["afmrl_jax"]["tokens_per_s"] / results["hf_generate"]["tokens_per_s"]
  results["speedup_decode"] = (results["afmrl_jax"]["decode_tokens_per_s"]
                               / results["hf_generate"]["decode_tokens_per_s"])
  # The same ratios within each round (both sides measured back to back), then their median:
  # less sensitive to load that changes over the run than the ratio of medians.
  decode = {name: np.array(times[name, n]) - np.array(times[name, 1]) for name, _, _ in sides}
  results["speedup_decode_paired_median"] = float(np.median(decode["hf_generate"] / np.maximum(decode["afmrl_jax"], 1e-9)))
  results["speedup_end_to_end_paired_median"] = float(
      np.median(np.array(times["hf_generate", n]) / np.array(times["afmrl_jax", n])))
  results["load_average_end"] = os.getloadavg()[0]

  print(f"bench-small: batch {b}, prompt {ids.shape[1]} tokens (16 image), {n} new tokens, "
        f"median of {args.repeats}; torch threads {results['torch_threads']}, "
        f"XLA_FLAGS={results['xla_flags']!r}, load average {results['load_average']:.1f}")
  print("| implementation | generate s | new tokens/s | decode-only tokens/s | ms / decode step |")
  print("|---|---|---|---|---|")
  for name in ("hf_generate", "afmrl_jax"):
    r = results[name]
    print(f"| {name} | {r['generate_s']:.3f} | {r['tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} | "
          f"{r['ms_per_decode_step']:.2f} |")
  line, ratio = bench_common.speedup_line("decode-only, median rounds", results["afmrl_jax"]["ms_per_decode_step"],
                                         results["hf_generate"]["ms_per_decode_step"], results["load_average"])
  if ratio is None:
    for key in ("speedup_end_to_end", "speedup_decode", "speedup_decode_paired_median",
                "speedup_end_to_end_paired_median"):
      results[key] = None
    print(line)
  else:
    print(f"speed-up (ratio of medians): end-to-end {results['speedup_end_to_end']:.2f}x, "
          f"decode-only {results['speedup_decode']:.2f}x; median of per-round ratios: end-to-end "
          f"{results['speedup_end_to_end_paired_median']:.2f}x, decode-only "
          f"{results['speedup_decode_paired_median']:.2f}x; load average at the end {results['load_average_end']:.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
