"""Generation-stage benchmark: our greedy KV-cache generation (what `configs/generate.py` runs per batch)
vs HF `generate` (PyTorch), same process, same weights, the same prompts.

bench-small generator (the Qwen2.5-VL model of `launch/bench_decode.py`, random weights imported into
ours), a batch of `--batch` listings (the generate stage's batch), prompts of 16 image tokens + text,
greedy decoding of exactly `--new_tokens` tokens (no EOS stop, so both sides do the same work). Each
round times, back to back: HF and ours with `--new_tokens` and with 1 new token (prefill + one step);
the prefill share is time(1) / time(N). Reported: listings/s and new tokens/s (medians), the speed-ups
as ratio of medians and median of per-round ratios, the thread settings and the load average at the
start and the end. When the load average is above 1.0 at the start the ratio is printed with a warning:
a loaded machine slows torch's threads more than XLA's.

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python launch/bench_generate.py --torch_threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_common  # noqa: E402  (interleaved timing, the load gate)
import bench_decode  # noqa: E402  (the shared HF model and prompts)


def hf_greedy(model, ids, mask, pixels, grid, new_tokens: int):
  import torch
  kw = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            pixel_values=torch.tensor(pixels.reshape(-1, pixels.shape[-1])),
            image_grid_thw=torch.tensor([grid] * ids.shape[0]),
            mm_token_type_ids=torch.tensor((ids == bench_decode.IMAGE).astype(np.int64)))

  def run():
    with torch.no_grad():
      out = model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens
  return run


def ours_greedy(model, ids, mask, pixels, grid, new_tokens: int):
  import jax
  import jax.numpy as jnp
  from afmrl_jax.generate import sampling
  from afmrl_jax.generate.filters import SamplingConfig
  cfg = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens, eos_ids=())
  args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))

  def run():
    out = sampling.generate(model, *args, grid, config=cfg)
    jax.block_until_ready(out)
  return run


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--prompt_len", type=int, default=48, help="text tokens per prompt (plus 18 image tokens)")
  ap.add_argument("--new_tokens", type=int, default=48)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  import jax
  import torch
  from afmrl_jax.models import hf_checkpoint
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  load_start = os.getloadavg()[0]
  hf = bench_decode.hf_bench_small(0)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    ours, _ = hf_checkpoint.load_hf_checkpoint(d)
  ids, mask, pixels, grid = bench_decode.inputs(args.batch, args.prompt_len, 0)
  b, n = args.batch, args.new_tokens
  sides = (("hf_generate", hf_greedy, hf), ("afmrl_jax", ours_greedy, ours))
  runners = {(name, k): make(model, ids, mask, pixels, grid, k) for name, make, model in sides for k in (n, 1)}
  measured = bench_common.interleaved(runners, args.repeats)
  times = measured["times"]
  results = {"config": "bench-small generator, greedy", "batch": b, "prompt_tokens": int(ids.shape[1]),
             "new_tokens": n, "device": str(jax.devices()[0].device_kind), "torch_threads": torch.get_num_threads(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_count": os.cpu_count(),
             "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
             "load_per_round": measured["load"]}
  for name, _, _ in sides:
    total, one = statistics.median(times[name, n]), statistics.median(times[name, 1])
    results[name] = {"generate_s": total, "listings_per_s": b / total, "tokens_per_s": b * n / total,
                     "prefill_share": one / total, "min_generate_s": min(times[name, n])}
  results["speedup"] = results["afmrl_jax"]["tokens_per_s"] / results["hf_generate"]["tokens_per_s"]
  results["speedup_paired_median"] = float(np.median(np.array(times["hf_generate", n])
                                                     / np.array(times["afmrl_jax", n])))
  print(f"bench-small generator: batch {b}, prompt {ids.shape[1]} tokens (16 image), {n} greedy new tokens, "
        f"median of {args.repeats} alternating rounds; torch threads {results['torch_threads']}, "
        f"XLA_FLAGS={results['xla_flags']!r}; load average {load_start:.2f} -> {results['load_average_end']:.2f}")
  print("| implementation | generate s (median / min) | listings/s | new tokens/s | prefill share |")
  print("|---|---|---|---|---|")
  for name in ("hf_generate", "afmrl_jax"):
    r = results[name]
    print(f"| {name} | {r['generate_s']:.3f} / {r['min_generate_s']:.3f} | {r['listings_per_s']:.1f} | "
          f"{r['tokens_per_s']:.0f} | {r['prefill_share']:.2f} |")
  line, ratio = bench_common.speedup_line("generation, median rounds", results["afmrl_jax"]["generate_s"],
                                         results["hf_generate"]["generate_s"], load_start)
  if ratio is None:
    results["speedup"] = results["speedup_paired_median"] = None
  else:
    line += f"; median of per-round ratios {results['speedup_paired_median']:.2f}x"
  print(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
