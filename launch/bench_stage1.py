"""Stage-1 training throughput: our jitted step vs an HF-PyTorch VLM2Vec-style step, same run, same model.

Model: the `bench-small` preset of configs/stage1.py (Qwen2-VL architecture: text hidden 256, 4 layers,
4 heads, 2 kv heads, intermediate 1024, M-RoPE [8, 12, 12], tied embeddings, vocab 8192; vision depth 4,
width 128, 4 heads, MLP 256; 112x112 images = 64 patches = 16 merged image tokens). Batch 32 pairs;
each side is `<vision_start> 16 x <image_pad> <vision_end>` + 32 text tokens.

Both sides do the same work per step: embed queries and candidates with the shared model (last-token
pooling, L2 norm), InfoNCE at tau 0.05 over the batch, backward, AdamW update.
  * ours: `train.loop.make_train_step` + `train.stage1_step.make_loss_fn` (InfoNCE), jitted with donated
    state, on the mesh of all local devices (pass --attributes to time the default AGCL);
  * HF: transformers' `Qwen2VLForConditionalGeneration` (random init from the same config), its
    `.model(...)` hidden states, torch.optim.AdamW, torch's default threads.
Two batches: `padded` (row b has b % 4 fewer text tokens, left padding, both sides get the mask) and
`unpadded` (every row full; HF gets no attention mask, its fastest path). Ours and HF alternate step by
step over --rounds rounds after a warm-up; reported per side: best and median round, pairs/s at the
best, our GFLOP/s from the compiled cost analysis, the load average before every round. The ratio is
withheld (a warning with the figures instead) when the load average at the start is above 1.0
(`launch/bench_common.py`). `launch/profile_stage1.py` splits the step into its parts.

  python launch/bench_stage1.py --json /tmp/bench_stage1.json
  python launch/bench_stage1.py --preset tiny --batch 64       # other presets / sizes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from launch import bench_common  # noqa: E402

VOCAB = 8192
PAD, V_START, V_END, IMAGE = 0, 8189, 8190, 8191


def model_config(preset: str):
  import configs.stage1 as stage1_configs
  from afmrl_jax.train import model as builders
  from afmrl_jax.config import schema
  config = stage1_configs.get_config(preset)
  config.model.arch.vocab_size = VOCAB
  config = schema.parse(config)
  arch = builders.hf_arch_dict(config.model)
  arch.update(image_token_id=IMAGE, vision_start_token_id=V_START, vision_end_token_id=V_END,
              pad_token_id=PAD)
  from afmrl_jax.models.config import VLConfig
  return config, VLConfig.from_hf_dict(arch)


def make_batch(batch: int, text_len: int, grid, seed: int, padded: bool = True) -> dict[str, np.ndarray]:
  """Both sides' inputs; `padded`: row b has `b % 4` fewer text tokens (left padding), else every row is full."""
  rng = np.random.default_rng(seed)
  n_img = int(np.prod(grid)) // 4
  t = text_len + n_img + 2
  out = {}
  for side in ("query", "candidate"):
    ids = np.full((batch, t), PAD, np.int32)
    mask = np.zeros((batch, t), np.int32)
    for b in range(batch):
      short = b % 4 if padded else 0
      row = [V_START] + [IMAGE] * n_img + [V_END] + list(rng.integers(1, V_START, size=text_len - short))
      ids[b, t - len(row):] = row
      mask[b, t - len(row):] = 1
    out[f"{side}_input_ids"] = ids
    out[f"{side}_attention_mask"] = mask
    out[f"{side}_pixel_values"] = rng.standard_normal((batch, int(np.prod(grid)), 1176)).astype(np.float32)
  return out


def ours_step(config, vl, batch_np, grid, attributes: bool):
  """(run, info): `run()` takes one jitted train step (state donated and carried) and waits for it."""
  from flax import nnx
  from afmrl_jax import parallel
  from afmrl_jax.losses import AGCLConfig
  from afmrl_jax.models.vl_model import VLModel
  from afmrl_jax.train import metrics_log as train_logging
  from afmrl_jax.train import loop as loop_lib
  from afmrl_jax.stages.stage1 import objective as stage1_step
  from afmrl_jax.train import state as state_lib
  from jax.sharding import NamedSharding, PartitionSpec

  batch_np = dict(batch_np)
  mesh = parallel.make_mesh({"data": -1})
  model = state_lib.create_sharded(lambda: VLModel(vl, rngs=nnx.Rngs(0)), mesh, nnx.Param)
  tx = state_lib.make_optimizer(config.optimizer, 1000)
  shardings = state_lib.state_shardings(tx, model, mesh)
  state = state_lib.init_train_state(tx, model, mesh, shardings)
  if attributes:
    agcl_cfg, idf = AGCLConfig(), np.linspace(0, 3, 64).astype(np.float32)
    rng = np.random.default_rng(1)
    for side in ("query", "candidate"):
      batch_np[f"{side}_terms"] = rng.integers(0, 64, size=(len(batch_np["query_input_ids"]), 16)).astype(np.int32)
  else:
    agcl_cfg, idf = AGCLConfig.infonce(), None
  strategy = "dense" if mesh.size == 1 else "all_gather"
  loss_fn = stage1_step.make_loss_fn(stage1_step.make_agcl(agcl_cfg, strategy, idf, 4.0), grid)
  step = loop_lib.make_train_step(model.graphdef, tx, loss_fn=loss_fn)
  jitted = jax.jit(step, in_shardings=(shardings, model.rest_shardings, None),
                   out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
  with jax.set_mesh(mesh), parallel.logical_rules():
    batch = parallel.global_batch(batch_np, mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, model.rest, batch).compile()
    compile_s = time.perf_counter() - t0
  carried = {"state": state}

  def run():
    with jax.set_mesh(mesh), parallel.logical_rules():
      carried["state"], metrics = compiled(carried["state"], model.rest, batch)
      jax.block_until_ready(metrics)
    return float(metrics["loss"])

  peak = train_logging.peak_flops(jax.devices()[0].device_kind)
  info = {"compile_s": compile_s, "flops_per_step_per_device": train_logging.compiled_flops(compiled),
          "devices": mesh.size, "device_kind": jax.devices()[0].device_kind, "peak_flops": peak}
  return run, info


def hf_model(vl):
  """The HF reference: transformers' Qwen2-VL of the same config, random init (torch seed 0), train mode."""
  import torch
  import transformers as tf
  torch.manual_seed(0)
  return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(**vl.to_hf_dict())).train()


def hf_step(vl, batch_np, grid, lr: float, padded: bool):
  """`run()`: one HF train step; `padded=False` passes no attention mask (the batch has no padding)."""
  import torch

  model = hf_model(vl)
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
  b = len(batch_np["query_input_ids"])
  sides = {}
  for side in ("query", "candidate"):
    ids = batch_np[f"{side}_input_ids"]
    sides[side] = dict(
        input_ids=torch.tensor(ids, dtype=torch.long),
        pixel_values=torch.tensor(batch_np[f"{side}_pixel_values"].reshape(-1, 1176)),
        image_grid_thw=torch.tensor([grid] * b),
        mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))
    if padded:
      sides[side]["attention_mask"] = torch.tensor(batch_np[f"{side}_attention_mask"], dtype=torch.long)

  def embed(kw):
    hidden = model.model(**kw).last_hidden_state  # [B, T, E]; left padding: the last token is real
    return torch.nn.functional.normalize(hidden[:, -1], dim=-1)

  def run():
    q, c = embed(sides["query"]), embed(sides["candidate"])
    logits = q @ c.T / 0.05
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(b))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())

  return run, {"torch_threads": torch.get_num_threads()}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="bench-small")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--text_len", type=int, default=32)
  ap.add_argument("--image_size", type=int, default=112)
  ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one step per side each)")
  ap.add_argument("--attributes", action="store_true", help="time the default AGCL instead of InfoNCE")
  ap.add_argument("--skip_hf", action="store_true", help="only our step (e.g. on an accelerator)")
  ap.add_argument("--json", default="")
  args = ap.parse_args()

  config, vl = model_config(args.preset)
  g = args.image_size // 14
  grid = (1, g, g)
  load_start = bench_common.load_average()
  results = {"preset": args.preset, "batch": args.batch, "image_size": args.image_size,
             "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_start": load_start}
  lines = []
  for padding in ("padded", "unpadded"):
    batch = make_batch(args.batch, args.text_len, grid, seed=0, padded=padding == "padded")
    runners = {}
    runners["ours"], info = ours_step(config, vl, batch, grid, args.attributes)
    if not args.skip_hf:
      runners["hf"], hf_info = hf_step(vl, batch, grid, config.optimizer.learning_rate, padding == "padded")
      info.update(hf_info)
    measured = bench_common.interleaved(runners, args.rounds)
    entry = {"tokens_per_side": int(batch["query_input_ids"].shape[1]), **info, "load_per_round": measured["load"]}
    for name, seconds in measured["times"].items():
      entry[name] = {**bench_common.spread(seconds), "rounds_s": seconds,
                     "pairs_per_s": args.batch / min(seconds)}
    o = entry["ours"]
    if o["min_s"] and info["flops_per_step_per_device"]:
      rate = info["flops_per_step_per_device"] / o["min_s"]
      entry["ours"]["gflops_per_s"] = rate / 1e9
      entry["ours"]["mfu"] = rate / info["peak_flops"] if info["peak_flops"] else None
    if "hf" in entry:
      line, ratio = bench_common.speedup_line(f"{padding} batch, best rounds", o["min_s"], entry["hf"]["min_s"],
                                              load_start)
      entry["speedup_best"] = ratio
      entry["speedup_median"] = (entry["hf"]["median_s"] / o["median_s"]) if ratio is not None else None
      lines.append(line)
    results[padding] = entry
  results["load_average_end"] = bench_common.load_average()

  print(f"\nstage-1 step, {args.preset}, batch {args.batch} pairs, {args.rounds} interleaved rounds; "
        f"load average {load_start:.2f} -> {results['load_average_end']:.2f}; {os.cpu_count()} CPUs, "
        f"XLA_FLAGS={results['xla_flags']!r}")
  print("| batch | side | best s | median s | pairs/s (best) | GFLOP/s |")
  print("|---|---|---|---|---|---|")
  for padding in ("padded", "unpadded"):
    e = results[padding]
    for name in ("ours", "hf"):
      if name in e:
        r = e[name]
        rate = f"{r['gflops_per_s']:.0f}" if name == "ours" and "gflops_per_s" in r else "-"
        label = "afmrl_jax (JAX)" if name == "ours" else f"HF PyTorch ({e.get('torch_threads')} threads)"
        print(f"| {padding} | {label} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['pairs_per_s']:.1f} | {rate} |")
  for line in lines:
    print(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
