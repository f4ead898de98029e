#!/usr/bin/env bash
# The GPU checks on one accelerator, in under 8 minutes, JSON per check into a folder.
#
#   launch/gpu_check.sh [OUT_DIR]          # OUT_DIR default: $OUT, else /tmp/gpu_check
#   QUICK=1 launch/gpu_check.sh /tmp/gc    # tiny sizes: checks the script itself on a CPU in ~2 minutes
#
# Checks (each under its own time limit, so one slow check cannot take the rest down):
#   stage1_mfu        the stage-1 train step alone (bench-small, batch 32): pairs/s, GFLOP/s, MFU
#   decode_roofline   the decode step of the 2B text decoder vs the memory-bandwidth bound (bf16, batch 64)
#   retrieval_1e6     exact top-k on the device (jax) vs ScaNN on the host, 1e6 x 128 gallery
#   agcl              the AGCL strategies' time and memory on this device
# Then OUT_DIR/summary.json lists each check's exit status and seconds; the script exits 1 if any failed. PYTHON (default .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT_DIR"
if [[ -n "${QUICK:-}" ]]; then
  stage1=(--rounds 2 --batch 8 --skip_hf); decode=(--roofline --preset tiny --dtype float32)
  retrieval=(--gallery 5000 --queries 100); agcl=(--sizes 1024 --gradcache_sizes 1024 --parts strategies)
else
  stage1=(--rounds 5 --skip_hf); decode=(--roofline --preset 2b --batch 64)
  retrieval=(--gallery 1000000 --queries 1000); agcl=(--sizes 4096,16384,65536 --parts strategies,gradcache)
fi
declare -A LIMIT=([stage1_mfu]=120 [decode_roofline]=150 [retrieval_1e6]=120 [agcl]=60)
summary="{"
failed=0
run() {  # name, then the command
  local name=$1; shift
  local t0=$SECONDS
  echo "[gpu_check] ${name}: $*"
  timeout "${LIMIT[$name]}" "$@" >"${OUT_DIR}/${name}.log" 2>&1
  local rc=$?
  ((rc != 0)) && failed=1
  echo "[gpu_check] ${name}: exit ${rc} after $((SECONDS - t0)) s (log: ${OUT_DIR}/${name}.log)"
  summary+="\"${name}\": {\"exit\": ${rc}, \"seconds\": $((SECONDS - t0))}, "
}
run stage1_mfu "$PYTHON" launch/bench_stage1.py "${stage1[@]}" --json "${OUT_DIR}/stage1_mfu.json"
run decode_roofline "$PYTHON" launch/bench_decode.py "${decode[@]}" --json "${OUT_DIR}/decode_roofline.json"
run retrieval_1e6 "$PYTHON" launch/bench_retrieval.py "${retrieval[@]}" --json "${OUT_DIR}/retrieval_1e6.json"
run agcl "$PYTHON" launch/bench_agcl.py "${agcl[@]}" --json_out "${OUT_DIR}/agcl.json"
device=$("$PYTHON" -c 'import jax; print(jax.devices()[0].device_kind)' 2>/dev/null || echo unknown)
echo "${summary}\"device\": \"${device}\"}" >"${OUT_DIR}/summary.json"
cat "${OUT_DIR}/summary.json"
exit $failed
