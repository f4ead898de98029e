"""Benchmark the AGCL loss strategies on 8 simulated CPU devices (compile-time memory, fwd+bwd time),
GradCache memory against the global batch, and a PyTorch (VLM2Vec-style) reference on the CPU.

  .venv/bin/python launch/bench_agcl.py [--sizes 1024,4096,16384,65536] [--time_budget_s 60]
      [--parts strategies,gradcache,torch] [--json_out bench_agcl.json]

Per-device temporary memory comes from `jax.jit(...).lower(...).compile().memory_analysis()` (no
allocation, so every size is measured). Wall-clock fwd+bwd time is measured only where the time
predicted from the previous size (quadratic in the batch) fits `--time_budget_s` per call; the rest are
reported as skipped. Prints one JSON object, then a table.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from afmrl_jax.losses import AGCLConfig, agcl_loss, grad_cache  # noqa: E402

EMBED, TERMS, VOCAB, AVG_LEN = 256, 16, 2000, 12.0
CONFIG = AGCLConfig()  # the default: self-normalised BM25 bias on negatives, bias scale 4, tau 0.05


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


def _loss_step(strategy, mesh):
  def fn(q, c, qt, ct, idf):
    return agcl_loss(q, c, qt, ct, idf, AVG_LEN, CONFIG, strategy=strategy,
                     axis_names=("data",) if strategy != "dense" else (), mesh=mesh)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


def _specs(n, sharding):
  return (jax.ShapeDtypeStruct((n, EMBED), jnp.float32, sharding=sharding),) * 2 + (
      jax.ShapeDtypeStruct((n, TERMS), jnp.int32, sharding=sharding),) * 2 + (
      jax.ShapeDtypeStruct((VOCAB,), jnp.float32),)


def _inputs(n, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, EMBED)).astype(np.float32)
  c = (q + rng.normal(size=(n, EMBED))).astype(np.float32)
  # Zipf-ish term ids with padding, so many pairs share terms as real attribute sets do.
  terms = np.minimum(rng.zipf(1.3, size=(2, n, TERMS)), VOCAB - 1).astype(np.int32)
  terms[:, :, 12:] *= rng.random((2, n, 4)) < 0.5
  idf = rng.uniform(0.1, 5.0, size=VOCAB).astype(np.float32)
  idf[0] = 0.0
  return q, c, terms[0], terms[1], idf


def _time(fn, args, reps=2):
  """Seconds per call of an already compiled fn: the first call if it is long, else the mean of reps."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  if first > 5.0:
    return first
  start = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / reps


def bench_strategies(sizes, budget):
  mesh = _mesh()
  sharded = NamedSharding(mesh, P("data"))
  results, last_time = [], {}
  for n in sizes:
    for strategy in ("dense", "all_gather", "ring"):
      row = {"global_batch": n, "strategy": strategy}
      # dense: one device (a replicated sharding would make all 8 devices compute it).
      sharding = sharded if strategy != "dense" else jax.sharding.SingleDeviceSharding(jax.devices()[0])
      if strategy == "dense" and n > 16384:
        row["skipped"] = "dense reference: [N, N] on one device, not measured above 16k"
        results.append(row)
        continue
      step = _loss_step(strategy, mesh)
      t0 = time.perf_counter()
      compiled = step.lower(*_specs(n, sharding)).compile()
      row["compile_s"] = round(time.perf_counter() - t0, 2)
      memory = compiled.memory_analysis()
      row["temp_bytes_per_device"] = int(memory.temp_size_in_bytes)
      previous = last_time.get(strategy)
      predicted = None if previous is None else previous[1] * (n / previous[0]) ** 2
      if predicted is not None and predicted > budget:
        row["time_skipped"] = f"predicted {predicted:.0f} s > budget {budget:.0f} s"
      else:
        args = [jax.device_put(x, sharding) for x in _inputs(n)[:4]] + [jnp.asarray(_inputs(n)[4])]
        (loss, _), _ = compiled(*args)
        row["loss"] = float(loss)
        row["fwd_bwd_s"] = _time(compiled, args)
        last_time[strategy] = (n, row["fwd_bwd_s"])
      results.append(row)
      print(json.dumps(row), flush=True)
  return results


def bench_gradcache(sizes, chunk=256, seq=32, hidden=1024):
  """Compile-time per-device memory of one encoder+loss step on the 8-device mesh (batch sharded over
  'data', ring loss): GradCache vs direct autodiff, and the loss step alone for reference."""
  mesh = _mesh()
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(EMBED, hidden)) * 0.05, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(hidden, EMBED)) * 0.05, jnp.float32)}

  def encode(p, batch):  # a token-level MLP over [chunk, seq, EMBED], mean-pooled: big activations
    h = jnp.tanh(batch["x"] @ p["w1"])
    return jnp.mean(h @ p["w2"], axis=1)

  def loss_fn(q, c, qt, ct, idf):
    return agcl_loss(q, c, qt, ct, idf, AVG_LEN, CONFIG, strategy="ring", axis_names=("data",))

  out = []
  with jax.set_mesh(mesh):
    sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    p_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)
    for n in sizes:
      batch = {"x": jax.ShapeDtypeStruct((n, seq, EMBED), jnp.float32, sharding=sharded)}
      terms = jax.ShapeDtypeStruct((n, TERMS), jnp.int32, sharding=sharded)
      emb = jax.ShapeDtypeStruct((n, EMBED), jnp.float32, sharding=sharded)
      idf = jax.ShapeDtypeStruct((VOCAB,), jnp.float32, sharding=replicated)
      gc = jax.jit(grad_cache(encode, loss_fn, chunk))
      gc_mem = gc.lower(p_spec, (batch, batch), terms, terms, idf).compile().memory_analysis().temp_size_in_bytes

      def direct(p, qb, cb, qt, ct, idf):
        return jax.value_and_grad(lambda p: loss_fn(encode(p, qb), encode(p, cb), qt, ct, idf), has_aux=True)(p)
      direct_mem = jax.jit(direct).lower(p_spec, batch, batch, terms, terms, idf).compile().memory_analysis().temp_size_in_bytes
      loss_only = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)).lower(
          emb, emb, terms, terms, idf).compile().memory_analysis().temp_size_in_bytes
      row = {"global_batch": n, "chunk": chunk, "gradcache_temp_bytes": int(gc_mem),
             "direct_temp_bytes": int(direct_mem), "loss_only_temp_bytes": int(loss_only),
             "gradcache_minus_loss_bytes": int(gc_mem - loss_only)}
      out.append(row)
      print(json.dumps(row), flush=True)
  return out


def _torch_step(torch, q, c, qt, ct, idf):
  """VLM2Vec-style loss in PyTorch: gather (identity on one process), logits + BM25 bias, CE."""
  q = q.detach().requires_grad_(True)
  c = c.detach().requires_grad_(True)
  qn = torch.nn.functional.normalize(q, dim=-1)
  cn = torch.nn.functional.normalize(c, dim=-1)
  gathered = cn  # torch.distributed.all_gather in VLM2Vec; one process here
  logits = qn @ gathered.T / CONFIG.tau
  with torch.no_grad():
    # BM25 with the same algorithm as the JAX default (term-count table @ scattered doc weights).
    valid = ct != 0
    tf = ((ct[:, :, None] == ct[:, None, :]) & valid[:, None, :]).sum(-1).float()
    norm = CONFIG.k1 * (1 - CONFIG.b + CONFIG.b * valid.sum(-1).float() / AVG_LEN)
    u = torch.where(valid, idf[ct] * (CONFIG.k1 + 1) / (tf + norm[:, None]), 0.0)
    counts = torch.zeros(len(qt), VOCAB).scatter_add_(1, qt, torch.ones_like(qt, dtype=torch.float32))
    counts[:, 0] = 0
    table = torch.zeros(VOCAB, len(ct)).index_put_((ct.T, torch.arange(len(ct)).expand(ct.shape[1], -1)),
                                                   u.T, accumulate=True)
    bm25 = counts @ table
    diag = torch.diagonal(bm25)
    ratio = torch.where(diag[:, None] > 0, bm25 / diag.clamp_min(1e-30)[:, None], 0.0)
    bias = CONFIG.bias_scale * torch.tanh(2 * ratio.clamp(0, 1))
    bias.fill_diagonal_(0.0)
    mask = torch.zeros_like(bias, dtype=torch.bool)  # mask 'none' (the default); applied as VLM2Vec would
  logits = (logits + bias).masked_fill(mask, float("-inf"))
  loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(q)))
  loss.backward()
  return loss.detach(), q.grad, c.grad


def bench_torch(sizes, budget, jax_rows):
  try:
    import torch
  except ImportError:
    return [{"skipped": "torch not installed"}]
  torch.set_num_threads(2)
  out, last = [], None
  for n in sizes:
    if n > 16384 or (last and last[1] * (n / last[0]) ** 2 > budget):
      out.append({"global_batch": n, "skipped": "torch dense [N, N] reference: too slow/large on 2 cores"})
      continue
    q, c, qt, ct, idf = (torch.from_numpy(x) for x in _inputs(n))
    qt, ct = qt.long(), ct.long()
    _torch_step(torch, q, c, qt, ct, idf)  # warm-up
    start = time.perf_counter()
    loss, _, _ = _torch_step(torch, q, c, qt, ct, idf)
    seconds = time.perf_counter() - start
    last = (n, seconds)
    row = {"global_batch": n, "torch_fwd_bwd_s": seconds, "torch_loss": float(loss.detach())}
    for r in jax_rows:
      if r["global_batch"] == n and "fwd_bwd_s" in r:
        row[f"torch_over_jax_{r['strategy']}"] = seconds / r["fwd_bwd_s"]
        row[f"loss_abs_diff_vs_{r['strategy']}"] = abs(float(loss) - r["loss"])
    out.append(row)
    print(json.dumps(row), flush=True)
  return out


def _mib(x):
  return f"{x / 2**20:9.1f}" if isinstance(x, (int, float)) else f"{'-':>9}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1024,4096,16384,65536")
  parser.add_argument("--gradcache_sizes", default="1024,4096,16384")
  parser.add_argument("--parts", default="strategies,gradcache,torch")
  parser.add_argument("--time_budget_s", type=float, default=60.0)
  parser.add_argument("--json_out", default="")
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  assert jax.device_count() == 8, jax.devices()
  parts = args.parts.split(",")
  strategies = bench_strategies(sizes, args.time_budget_s) if "strategies" in parts else []
  gradcache = bench_gradcache([int(s) for s in args.gradcache_sizes.split(",")]) if "gradcache" in parts else []
  torch_rows = bench_torch(sizes, args.time_budget_s, strategies) if "torch" in parts else []
  report = {"config": {"embed": EMBED, "terms": TERMS, "vocab": VOCAB, "devices": 8, "ring_tile": 1024,
                       "cpu_load_note": "2 shared cores; other jobs ran at the same time, times are noisy",
                       "loss": str(CONFIG)},
            "strategies": strategies, "gradcache": gradcache, "torch": torch_rows}
  print(json.dumps(report, indent=1))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(report, f, indent=1)

  print("\nAGCL loss, 8 simulated CPU devices, embed 256, 16 terms (per-device temp memory, fwd+bwd time)")
  print(f"{'N':>6} {'strategy':>10} {'temp MiB':>9} {'ring/ag':>8} {'time s':>9}  note")
  by = {(r["global_batch"], r["strategy"]): r for r in strategies}
  for r in strategies:
    ag = by.get((r["global_batch"], "all_gather"), {}).get("temp_bytes_per_device")
    ratio = f"{r['temp_bytes_per_device'] / ag:8.3f}" if r["strategy"] == "ring" and ag else f"{'':>8}"
    t = f"{r['fwd_bwd_s']:9.3f}" if "fwd_bwd_s" in r else f"{'-':>9}"
    print(f"{r['global_batch']:>6} {r['strategy']:>10} {_mib(r.get('temp_bytes_per_device'))} {ratio} {t}  "
          f"{r.get('time_skipped', r.get('skipped', ''))}")
  if gradcache:
    print(f"\nGradCache (chunk {gradcache[0]['chunk']}, ring loss) vs direct autodiff, 8 devices, temp MiB per device")
    print(f"{'N':>6} {'gradcache':>9} {'direct':>9} {'loss only':>9} {'gc-loss':>9}")
  for r in gradcache:
    print(f"{r['global_batch']:>6} {_mib(r['gradcache_temp_bytes'])} {_mib(r['direct_temp_bytes'])} "
          f"{_mib(r['loss_only_temp_bytes'])} {_mib(r['gradcache_minus_loss_bytes'])}")
  print("\nPyTorch (VLM2Vec-style gather + CE with BM25 bias), 2 threads")
  for r in torch_rows:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
