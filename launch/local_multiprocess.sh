#!/usr/bin/env bash
# Runs one command as N local JAX processes with D simulated CPU devices each, joined into one cluster
# (jax.distributed on localhost, gloo collectives): how multi-host runs are tested on one machine.
#
#   launch/local_multiprocess.sh N D COMMAND...
#   launch/local_multiprocess.sh 2 4 python -m afmrl_jax.main --config=configs/stage1.py:ci --workdir=/tmp/mp
#
# Process i gets JAX_COORDINATOR_ADDRESS=localhost:$PORT (PORT: a free port unless set),
# JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i, JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=D; `afmrl_jax.main` initialises the cluster from them.
# Process i's output goes to $LOG_DIR/process_i.log (LOG_DIR default: a new temporary folder), and
# process 0's is also shown; $LOG_DIR/pids lists "i pid" per process. The script exits with the first non-zero status of any process; if one
# process fails the others are stopped (a cluster with a missing member would wait forever).
set -uo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,14p' "$0"
  exit 2
fi
N=$1
D=$2
shift 2
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_COORDINATOR_ADDRESS="localhost:${PORT}" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=${D}" PYTHONUNBUFFERED=1 \
    "$@" >"${LOG_DIR}/process_${i}.log" 2>&1 &
  pids+=($!)
  echo "$i $!" >>"${LOG_DIR}/pids"
done
tail -n +1 -f "${LOG_DIR}/process_0.log" &
tail_pid=$!
status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
    else
      wait "$pid"
      rc=$?
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "local_multiprocess: a process exited with status $rc; stopping the others (logs: ${LOG_DIR})" >&2
        for other in "${pids[@]}"; do kill "$other" 2>/dev/null; done
      fi
    fi
  done
  remaining=("${next[@]}")
  ((${#remaining[@]})) && sleep 0.5
done
kill "$tail_pid" 2>/dev/null
wait "$tail_pid" 2>/dev/null
echo "local_multiprocess: logs in ${LOG_DIR}" >&2
exit $status
