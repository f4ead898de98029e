"""The cluster launchers' dry runs print the command every worker / task would run."""

import os
import shlex
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **env):
  return subprocess.run(["bash", *args], cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True,
                        timeout=60)


def test_tpu_pod_dry_run_prints_one_gcloud_ssh_to_every_worker():
  out = _run(["launch/tpu_pod.sh", "--dry_run", "my-tpu", "us-central2-b", "--",
              "--config=configs/stage1.py:qwen2vl-2b", "--workdir=gs://b/run dir"], PROJECT="proj")
  assert out.returncode == 0, out.stderr
  words = shlex.split(out.stdout)
  assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and words[5] == "my-tpu"
  assert "--worker=all" in words and "--zone=us-central2-b" in words and "--project=proj" in words
  (remote,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
  assert shlex.split(remote.split("&& ", 1)[1])[1:] == [
      "-m", "afmrl_jax.main", "--config=configs/stage1.py:qwen2vl-2b", "--workdir=gs://b/run dir"]


def test_slurm_dry_run_sets_the_coordinator_and_this_tasks_identity():
  out = _run(["launch/gpu_slurm.sbatch", "--config=configs/stage1.py", "--workdir=/shared/run"], DRY_RUN="1",
             SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NTASKS="16", SLURM_PROCID="9", SLURM_LOCALID="1",
             PATH="/usr/bin:/bin")
  assert out.returncode == 0, out.stderr
  words = out.stdout.split()
  assert words[:4] == ["JAX_COORDINATOR_ADDRESS=gpu07:12345", "JAX_NUM_PROCESSES=16", "JAX_PROCESS_ID=9",
                       "CUDA_VISIBLE_DEVICES=1"]
  assert words[-4:] == ["-m", "afmrl_jax.main", "--config=configs/stage1.py", "--workdir=/shared/run"]


def test_slurm_outside_a_job_says_so():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  out = subprocess.run(["bash", "launch/gpu_slurm.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 2 and "not inside a SLURM job" in out.stderr
