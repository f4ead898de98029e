#!/usr/bin/env bash
# Behaviour check for a refactor (issue 22): short stage-1, SFT and stage-2 runs of one checkout, summarised
# so that two checkouts' summaries can be compared bitwise.
#
#   launch/behaviour_check.sh CHECKOUT OUTDIR
#
# Runs on the CPU (JAX_PLATFORMS=cpu) from CHECKOUT with PYTHONPATH=CHECKOUT, so that checkout's afmrl_jax
# (and configs/) is the one imported; OUTDIR must not exist yet. Seeds are the presets' defaults (written to
# the summary from each run's config.json). Runs:
#   stage 1: configs/stage1.py:tiny, 20 steps, log every step, checkpoint at the last step, eval at the end
#   SFT:     configs/sft.py:ci (10 steps, log every step), attribute eval at the end
#   s1ci:    configs/stage1.py:ci, 4 steps (stage 2's environment: stage 2 refuses an environment trained on
#            another catalog than its policy's, so the `tiny` stage-1 run cannot be it), eval at the end
#   stage 2: configs/stage2.py:ci (4 steps), policy = the SFT run, environment = the s1ci run
# All three share one catalog cache (OUTDIR/cache) and use no fresh views.
# Writes OUTDIR/summary.json: per stage, the per-step metrics rows of metrics.jsonl, a sha256 of every array of
# the last checkpoint's train state (params and optimizer state, sorted key order), every metrics.json under
# the workdir, and the seeds. Compare two summaries (exit 1 on any difference; timing fields are skipped):
#   launch/behaviour_check.sh --compare A/summary.json B/summary.json
# (`launch/behaviour_check.sh --summarise CHECKOUT OUTDIR` writes the summary of finished runs again.)
set -euo pipefail

PYTHON=${PYTHON:-python}

summarise() {  # OUTDIR CHECKOUT
  "$PYTHON" - "$@" <<'EOF'
import hashlib, json, os, subprocess, sys
import numpy as np
import orbax.checkpoint as ocp

out, checkout = sys.argv[1], sys.argv[2]
STAGES = ("s1", "sft", "s1ci", "s2")

def flat(tree, prefix=()):
  if isinstance(tree, dict):
    for k in sorted(tree, key=str):
      yield from flat(tree[k], prefix + (str(k),))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from flat(v, prefix + (str(i),))
  else:
    yield "/".join(prefix), tree

def seeds(cfg, prefix=""):
  found = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      found.update(seeds(v, key + "."))
    elif "seed" in k:
      found[key] = v
  return found

summary = {"checkout": checkout,
           "commit": subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(),
           "dirty": subprocess.run(["git", "-C", checkout, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True).stdout.strip()}
for stage in STAGES:
  wd = os.path.join(out, stage)
  entry = {}
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    entry["metrics_rows"] = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(wd, "config.json")) as f:
    entry["seeds"] = seeds(json.load(f))
  ckdir = os.path.join(wd, "checkpoints")
  step = max(int(n) for n in os.listdir(ckdir) if n.isdigit())
  state = ocp.PyTreeCheckpointer().restore(os.path.join(ckdir, str(step), "state"))
  hashes = {}
  for key, leaf in flat(state):
    a = np.asarray(leaf)
    if a.dtype == object:  # None (optax's empty states) and other non-arrays: their repr, not a pointer's bytes
      hashes[key] = f"object:{leaf!r}"
      continue
    hashes[key] = f"{a.dtype}{list(a.shape)}:" + hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
  entry["checkpoint_step"] = step
  entry["state_sha256"] = hashes
  entry["metrics_json"] = {}
  for root, _, names in os.walk(wd):
    if "metrics.json" in names:
      with open(os.path.join(root, "metrics.json")) as f:
        entry["metrics_json"][os.path.relpath(os.path.join(root, "metrics.json"), wd)] = json.load(f)
  summary[stage] = entry
with open(os.path.join(out, "summary.json"), "w") as f:
  json.dump(summary, f, indent=1, sort_keys=True)
print(f"wrote {out}/summary.json: " + ", ".join(
    f"{s}: {len(summary[s]['metrics_rows'])} metrics rows, {len(summary[s]['state_sha256'])} arrays at step "
    f"{summary[s]['checkpoint_step']}" for s in STAGES))
EOF
}

compare() {  # A/summary.json B/summary.json; time-like fields are listed apart, not compared
  "$PYTHON" - "$@" <<'EOF'
import json, re, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
TIME = re.compile(r"(_s$|seconds|per_s|_time|time_|elapsed|throughput|tflops|wall|duration|timestamp|^time$)")
bad = 0
def walk(x, y, path, skipped):
  global bad
  if isinstance(x, dict) and isinstance(y, dict):
    for k in sorted(set(x) | set(y)):
      if TIME.search(k):
        skipped.add(k); continue
      if k not in x or k not in y:
        print(f"DIFF {path}/{k}: only in {'B' if k not in x else 'A'}"); bad += 1; continue
      walk(x[k], y[k], f"{path}/{k}", skipped)
  elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
    for i, (u, v) in enumerate(zip(x, y)):
      walk(u, v, f"{path}[{i}]", skipped)
  elif x != y and not (x != x and y != y):  # NaN == NaN here
    print(f"DIFF {path}: {x!r} != {y!r}"); bad += 1
STAGES = ("s1", "sft", "s1ci", "s2")
print(f"A: {a['commit']} ({a['checkout']})\nB: {b['commit']} ({b['checkout']})")
for stage in STAGES:
  skipped = set(); before = bad
  walk(a[stage], b[stage], stage, skipped)
  n_rows, n_arrays = len(a[stage]["metrics_rows"]), len(a[stage]["state_sha256"])
  print(f"{stage}: {'IDENTICAL' if bad == before else f'{bad - before} differences'} "
        f"({n_rows} metrics rows, {n_arrays} state arrays at step {a[stage]['checkpoint_step']}, "
        f"{len(a[stage]['metrics_json'])} metrics.json; seeds {a[stage]['seeds']}; "
        f"not compared (timings): {sorted(skipped)})")
sys.exit(1 if bad else 0)
EOF
}

if [[ "${1:-}" == "--compare" ]]; then
  compare "$2" "$3"
  exit $?
fi
if [[ "${1:-}" == "--summarise" ]]; then  # --summarise CHECKOUT OUTDIR: rewrite OUTDIR/summary.json of finished runs
  summarise "$(cd "$3" && pwd)" "$(cd "$2" && pwd)"
  exit $?
fi

CHECKOUT=$(cd "$1" && pwd)
mkdir -p "$(dirname "$2")"
OUTDIR=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
if [[ -e "$OUTDIR" ]]; then echo "$OUTDIR exists; give a fresh OUTDIR" >&2; exit 2; fi
mkdir -p "$OUTDIR"
cd "$CHECKOUT"
export PYTHONPATH="$CHECKOUT" JAX_PLATFORMS=cpu
"$PYTHON" -c "import afmrl_jax, configs, sys; assert afmrl_jax.__file__.startswith(sys.argv[1] + '/'), afmrl_jax.__file__; \
assert configs.__file__.startswith(sys.argv[1] + '/'), configs.__file__; print('afmrl_jax from', afmrl_jax.__file__)" "$CHECKOUT"

COMMON=(--config.catalog.cache_dir="$OUTDIR/cache" --config.pipeline.fresh_views=False)
start=$SECONDS
run() {  # NAME ARGS...
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: python -m afmrl_jax.main $*"
  "$PYTHON" -m afmrl_jax.main "$@" >"$OUTDIR/$name.log" 2>&1 || { tail -30 "$OUTDIR/$name.log"; exit 1; }
  echo "   $name done in $((SECONDS - t0)) s"
}
run s1 --config=configs/stage1.py:tiny --workdir="$OUTDIR/s1" "${COMMON[@]}" \
    --config.train.num_steps=20 --config.train.log_every=1 --config.checkpoint.every=20
run sft --config=configs/sft.py:ci --workdir="$OUTDIR/sft" "${COMMON[@]}"
run s1ci --config=configs/stage1.py:ci --workdir="$OUTDIR/s1ci" "${COMMON[@]}" --config.train.num_steps=4
run s2 --config=configs/stage2.py:ci --workdir="$OUTDIR/s2" "${COMMON[@]}" \
    --config.rar.policy="$OUTDIR/sft" --config.rar.environment="$OUTDIR/s1ci"
summarise "$OUTDIR" "$CHECKOUT"
echo "total $((SECONDS - start)) s"
