"""Where the stage-1 training step's time goes on this machine: each part jitted and timed alone.

Same model and batch as `launch/bench_stage1.py` (bench-small, batch 32 pairs, 64 sequences of 50
tokens, 16 of them image tokens). Parts, each forward + backward where it has parameters:

  vision     the vision tower (+ patch merger) on both sides' images
  text       the text decoder on both sides' input embeddings (M-RoPE positions precomputed)
  loss       the whole loss with gradients (vision + splice + positions + text + pooling + InfoNCE)
  optimizer  the AdamW update of the parameters alone
  step       the jitted train step (loss + gradients + update), as the trainer runs it

and the machine's float32 matmul peak (a jitted 2048^3 matmul). Each part: the best of --repeats runs
after a warm-up, GFLOP from XLA's cost analysis, and the rate as a share of the matmul peak.

  python launch/profile_stage1.py --json /tmp/profile_stage1.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from launch.bench_stage1 import IMAGE, hf_model, make_batch, model_config  # noqa: E402


def best_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # warm-up (and compile)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def flops_of(jitted, *args) -> float | None:
  from afmrl_jax.train import metrics_log as train_logging
  return train_logging.compiled_flops(jitted.lower(*args).compile())


def matmul_peak(repeats: int, n: int = 2048) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  return 2 * n ** 3 / best_time(f, a, a, repeats=repeats)


def profile(preset: str, batch: int, repeats: int) -> dict:
  from flax import nnx
  from afmrl_jax import parallel
  from afmrl_jax.losses import AGCLConfig
  from afmrl_jax.models.vl_model import VLModel
  from afmrl_jax.train import loop as loop_lib
  from afmrl_jax.stages.stage1 import objective as stage1_step
  from afmrl_jax.train import state as state_lib

  config, vl = model_config(preset)
  g = 112 // 14
  grid = (1, g, g)
  batch_np = make_batch(batch, 32, grid, seed=0)
  mesh = parallel.make_mesh({"data": -1})
  model = state_lib.create_sharded(lambda: VLModel(vl, rngs=nnx.Rngs(0)), mesh, nnx.Param)
  tx = state_lib.make_optimizer(config.optimizer, 1000)
  shardings = state_lib.state_shardings(tx, model, mesh)
  state = state_lib.init_train_state(tx, model, mesh, shardings)
  graphdef, rest = model.graphdef, model.rest
  agcl = stage1_step.make_agcl(AGCLConfig.infonce(), "dense", None, 4.0)
  loss_fn = stage1_step.make_loss_fn(agcl, grid)
  both = {k: np.concatenate([batch_np[f"query_{k}"], batch_np[f"candidate_{k}"]])
          for k in ("input_ids", "attention_mask", "pixel_values")}

  def merged(params):
    return nnx.merge(graphdef, params, rest)

  def vision(params, pixels):
    return jnp.sum(merged(params).image_features(pixels, grid))

  def text(params, embeds, mask, positions):
    hidden, _ = merged(params).language_model(embeds, mask, positions)
    return jnp.sum(hidden[:, -1])

  def loss(params, b):
    return loss_fn(merged(params), b)[0]

  def optimizer(opt_state, params, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return opt_state, jax.tree.map(lambda p, u: p + u, params, updates)

  step = loop_lib.make_train_step(graphdef, tx, loss_fn=loss_fn)
  out: dict[str, dict] = {}
  with jax.set_mesh(mesh), parallel.logical_rules():
    params = state["params"]
    b = parallel.global_batch(batch_np, mesh)
    m = merged(params)
    embeds = jax.jit(lambda p, ids, px: merged(p).embed_inputs(ids, px, grid))(params, both["input_ids"],
                                                                               both["pixel_values"])
    positions, _ = jax.jit(lambda ids, mask: m.rope_index(ids, mask, grid))(both["input_ids"],
                                                                            both["attention_mask"])
    grads = jax.tree.map(jnp.zeros_like, params)
    parts = {
        "vision": (jax.jit(jax.value_and_grad(vision)), (params, both["pixel_values"])),
        "text": (jax.jit(jax.value_and_grad(text)), (params, embeds, both["attention_mask"], positions)),
        "loss": (jax.jit(jax.value_and_grad(loss)), (params, b)),
        "optimizer": (jax.jit(optimizer), (state["opt_state"], params, grads)),
        "step": (jax.jit(step, donate_argnums=(0,)), None),
    }
    for name, (fn, args) in parts.items():
      if name == "step":
        state_copy = jax.tree.map(jnp.copy, state)
        flops = flops_of(fn, state_copy, rest, b)
        holder = {"state": state_copy}

        def run_step():
          holder["state"], metrics = fn(holder["state"], rest, b)
          return metrics

        seconds = best_time(run_step, repeats=repeats)
      else:
        flops = flops_of(fn, *args)
        seconds = best_time(fn, *args, repeats=repeats)
      out[name] = {"seconds": seconds, "gflop": (flops or 0) / 1e9}
  return out


def profile_hf(preset: str, batch: int, repeats: int, padded: bool = True) -> dict:
  """The same parts of the HF PyTorch model (`transformers.Qwen2VLForConditionalGeneration`), same threads."""
  import torch
  config, vl = model_config(preset)
  g = 112 // 14
  grid = (1, g, g)
  batch_np = make_batch(batch, 32, grid, seed=0)
  model = hf_model(vl)
  ids = np.concatenate([batch_np["query_input_ids"], batch_np["candidate_input_ids"]])
  mask = np.concatenate([batch_np["query_attention_mask"], batch_np["candidate_attention_mask"]])
  pixels = np.concatenate([batch_np["query_pixel_values"], batch_np["candidate_pixel_values"]])
  n = len(ids)
  pixel_t = torch.tensor(pixels.reshape(-1, pixels.shape[-1]), requires_grad=False)
  grid_t = torch.tensor([grid] * n)
  inner = model.model
  with torch.no_grad():
    embeds = inner.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
    ids_t = torch.tensor(ids, dtype=torch.long)
    positions, _ = inner.get_rope_index(ids_t, (ids_t == IMAGE).long(), grid_t,
                                        attention_mask=torch.tensor(mask, dtype=torch.long))
  mask_t = torch.tensor(mask, dtype=torch.long) if padded else None

  def timed(fn) -> float:
    fn()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return min(times)

  def vision():
    out = inner.visual(pixel_t, grid_thw=grid_t)
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    out = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
    out.sum().backward()
    model.zero_grad(set_to_none=True)

  def text():
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=mask_t, position_ids=positions).last_hidden_state
    hidden[:, -1].sum().backward()
    model.zero_grad(set_to_none=True)

  return {"vision": {"seconds": timed(vision)}, "text": {"seconds": timed(text)},
          "torch_threads": torch.get_num_threads()}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="bench-small")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  load_before = os.getloadavg()[0]
  peak = matmul_peak(args.repeats)
  parts = profile(args.preset, args.batch, args.repeats)
  hf = profile_hf(args.preset, args.batch, args.repeats)
  result = {"preset": args.preset, "batch": args.batch, "matmul_peak_gflops": peak / 1e9, "parts": parts, "hf": hf,
            "load_average": [load_before, os.getloadavg()[0]], "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "cpu_count": os.cpu_count()}
  step = parts["step"]["seconds"]
  print(f"matmul peak {peak / 1e9:.0f} GFLOP/s; load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
  print("| part | s | share of step | GFLOP | GFLOP/s | share of peak | HF s | HF / ours |")
  print("|---|---|---|---|---|---|---|---|")
  for name, p in parts.items():
    rate = p["gflop"] / p["seconds"]
    h = hf.get(name, {}).get("seconds")
    ref = f"{h:.3f} | {h / p['seconds']:.2f}x" if h else "- | -"
    print(f"| {name} | {p['seconds']:.3f} | {p['seconds'] / step:.0%} | {p['gflop']:.1f} | {rate:.0f} | "
          f"{rate / (peak / 1e9):.0%} | {ref} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
