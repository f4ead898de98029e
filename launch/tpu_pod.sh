#!/usr/bin/env bash
# Runs one afmrl_jax stage on every worker of a Cloud TPU VM slice (one process per worker; JAX finds the
# slice's other workers itself, so `afmrl_jax.main` needs no coordinator flags there).
#
#   launch/tpu_pod.sh [--dry_run] TPU_NAME ZONE -- --config=configs/stage1.py:qwen2vl-2b --workdir=gs://bucket/run ...
#
# Environment:
#   PROJECT    gcloud project (default: gcloud's configured one)
#   REPO_DIR   where the repository is checked out on every worker (default: ~/afmrl_jax)
#   PYTHON     the workers' interpreter (default: $REPO_DIR/.venv/bin/python; install with
#              `pip install -e '.[tpu]'` on every worker first, e.g. through this script's --setup)
#   --setup    instead of running a stage, create the venv and install '.[tpu]' on every worker
#   --dry_run  print the gcloud command instead of running it
# The workdir must be visible to every worker (a GCS bucket or a shared filesystem): every process
# writes its part of each orbax checkpoint there, and process 0 writes the logs and reports.
set -euo pipefail
dry_run=0
setup=0
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --setup) setup=1 ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then
  sed -n '2,17p' "$0"
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2
[[ "${1:-}" == "--" ]] && shift
REPO_DIR=${REPO_DIR:-'~/afmrl_jax'}
PYTHON=${PYTHON:-"${REPO_DIR}/.venv/bin/python"}
if ((setup)); then
  remote="cd ${REPO_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
else
  if [[ $# -eq 0 ]]; then
    echo "tpu_pod.sh: give the stage's flags after --, e.g. -- --config=configs/stage1.py --workdir=gs://b/run" >&2
    exit 2
  fi
  args=$(printf ' %q' "$@")
  remote="cd ${REPO_DIR} && ${PYTHON} -m afmrl_jax.main${args}"
fi
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote")
if [[ -n "${PROJECT:-}" ]]; then
  cmd+=(--project="$PROJECT")
fi
if ((dry_run)); then
  printf '%q ' "${cmd[@]}"
  echo
else
  "${cmd[@]}"
fi
