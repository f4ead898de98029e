"""Memory of one GradCache step with h mined hard negatives per query, against the same step without
GradCache (direct autodiff), from XLA's compile-time buffer assignment on CPU (nothing is run).

  .venv/bin/python launch/bench_gradcache_mined.py [--batch 4096] [--mined 0,1,3] [--chunk 256]
      [--hidden 1024] [--strategy ring] [--out bench_gradcache_mined.json]

Stand-in encoder: a 2-layer MLP [rows, 512] -> hidden -> 256 (tanh between). The step encodes B queries,
B candidates and B * h mined inputs (flattened, so GradCache chunks them like the other two) and takes the
AGCL loss (default config, BM25 bias) over the B (1 + h) candidate columns. The batch is sharded over
8 simulated CPU devices ('data' axis, Explicit) for 'ring' / 'all_gather', or on one device for 'dense'.
Numbers are per device, from `compile().memory_analysis()`: `temp` = temporary buffers, `total` =
arguments + outputs + temporaries - aliased (the program's footprint; XLA:CPU's own
peak_memory_in_bytes reads below its temporaries, so it is not used). `loss alone` = the loss's
value_and_grad on given embeddings, the part both steps share; `encoder` = step temp - loss temp.
The default hidden width (8192) makes the encoder's activations large next to the loss, as a real
encoder's are; with a narrow MLP both steps are dominated by the loss and look alike.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from afmrl_jax.losses import AGCLConfig, agcl_loss, grad_cache  # noqa: E402

INPUT, EMBED, TERMS, VOCAB, AVG_LEN = 512, 256, 16, 2000, 12.0
MIB = 1 << 20


def encode(params, batch):
  """[rows, 512] -> [rows, 256]: the stand-in encoder."""
  return jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"]


def _memory(fn, *specs) -> dict:
  stats = jax.jit(fn).lower(*specs).compile().memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes)
  return {"total_bytes": int(total), "temp_bytes": int(stats.temp_size_in_bytes),
          "argument_bytes": int(stats.argument_size_in_bytes), "output_bytes": int(stats.output_size_in_bytes)}


def measure(batch: int, h: int, chunk: int, hidden: int, strategy: str) -> dict:
  """Per-device memory of the GradCache step, the direct step and the loss alone at one h."""
  sharded = strategy != "dense"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)) if sharded else None
  rows_sharding = NamedSharding(mesh, P("data")) if sharded else None
  replicated = NamedSharding(mesh, P()) if sharded else None
  spec = lambda shape, dtype=jnp.float32, sharding=rows_sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  params = {"w1": spec((INPUT, hidden), sharding=replicated), "b1": spec((hidden,), sharding=replicated),
            "w2": spec((hidden, EMBED), sharding=replicated)}
  sides = [{"x": spec((batch, INPUT))}, {"x": spec((batch, INPUT))}]
  terms = [spec((batch, TERMS), jnp.int32), spec((batch, TERMS), jnp.int32)]
  if h:
    sides.append({"x": spec((batch * h, INPUT))})
    terms.append(spec((batch * h, TERMS), jnp.int32))
  idf = spec((VOCAB,), sharding=replicated)
  config = AGCLConfig()

  def loss_fn(*args):
    embs, (qt, ct, *mt), idf = args[:len(sides)], args[len(sides):-1], args[-1]
    mined = dict(mined=embs[2], mined_terms=mt[0]) if h else {}
    return agcl_loss(embs[0], embs[1], qt, ct, idf, AVG_LEN, config, strategy=strategy,
                     axis_names=("data",) if sharded else (), **mined)

  def gradcache_step(params, inputs, *loss_args):
    return grad_cache(encode, loss_fn, chunk)(params, inputs, *loss_args)

  def direct_step(params, inputs, *loss_args):
    return jax.value_and_grad(lambda p: loss_fn(*(encode(p, x) for x in inputs), *loss_args), has_aux=True)(params)

  def loss_alone(*args):
    return jax.value_and_grad(loss_fn, argnums=tuple(range(len(sides))), has_aux=True)(*args)

  embs = [spec((x["x"].shape[0], EMBED)) for x in sides]
  with jax.set_mesh(mesh) if sharded else _nothing():
    row = {"global_batch": batch, "h": h, "candidate_columns": batch * (1 + h), "chunk": chunk,
           "hidden": hidden, "strategy": strategy, "devices": 8 if sharded else 1}
    row["gradcache"] = _memory(gradcache_step, params, tuple(sides), *terms, idf)
    row["direct"] = _memory(direct_step, params, tuple(sides), *terms, idf)
    row["loss_alone"] = _memory(loss_alone, *embs, *terms, idf)
  return row


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def table(rows) -> str:
  head = ("| h | columns | GradCache total MiB | GradCache temp | its encoder part | direct total MiB "
          "| direct temp | its encoder part | loss alone temp |")
  lines = [head, "|" + "---:|" * 9]
  for r in rows:
    mib = lambda k, f: r[k][f] / MIB
    loss = mib("loss_alone", "temp_bytes")
    lines.append(f"| {r['h']} | {r['candidate_columns']:,} | {mib('gradcache', 'total_bytes'):.1f} "
                 f"| {mib('gradcache', 'temp_bytes'):.1f} | {mib('gradcache', 'temp_bytes') - loss:.1f} "
                 f"| {mib('direct', 'total_bytes'):.1f} | {mib('direct', 'temp_bytes'):.1f} "
                 f"| {mib('direct', 'temp_bytes') - loss:.1f} | {loss:.1f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--mined", default="0,1,3", help="comma-separated h values")
  parser.add_argument("--chunk", type=int, default=256, help="GradCache rows per chunk (all devices)")
  parser.add_argument("--hidden", type=int, default=8192)
  parser.add_argument("--strategy", default="ring", choices=("dense", "all_gather", "ring"))
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  rows = []
  for h in (int(x) for x in args.mined.split(",")):
    rows.append(measure(args.batch, h, args.chunk, args.hidden, args.strategy))
    print(json.dumps(rows[-1]), flush=True)
  print(f"\nper-device memory, global batch {args.batch}, strategy {args.strategy}, chunk {args.chunk}, "
        f"MLP {INPUT}->{args.hidden}->{EMBED}:\n")
  print(table(rows))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
  main()
