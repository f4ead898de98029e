"""A rerun of `python -m afmrl_jax.main` over checkpoints whose files were cut short or lost (a full disk, a
half-copied folder, a bad sync): it names each damaged step in one warning line, moves it to
`checkpoints/damaged/<step>`, records it in `checkpoint_damage.jsonl`, resumes from the newest intact step
and ends where the uninterrupted run ended; with no intact step it stops with one line and a hint (exit 2).

One module-scoped run (steps 2, 4, 6 saved) is copied per case; each case damages the train state (`state`:
orbax metadata and OCDBT array files) and the data-iterator state (`data`) in a different way."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from afmrl_jax.train import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """(env, catalog cache): the subprocesses share a JAX compilation cache and the generated catalog."""
  base = tmp_path_factory.mktemp("damage_shared")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env, str(base / "catalog")


def _main(workdir, shared):
  env, cache = shared
  args = ["--config=configs/stage1.py:ci", f"--workdir={workdir}", f"--config.train.num_steps={STEPS}",
          "--config.checkpoint.every=2", "--config.checkpoint.keep=3", "--config.train.log_every=1",
          "--config.train.eval_at_end=False", "--config.catalog.families_per_category=4",
          "--config.pipeline.fresh_views=False", f"--config.catalog.cache_dir={cache}"]
  return subprocess.run([sys.executable, "-m", "afmrl_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared):
  """A workdir trained uninterrupted to step 6, checkpoints at 2, 4 and 6."""
  workdir = tmp_path_factory.mktemp("damage_trained") / "run"
  proc = _main(workdir, shared)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert checkpointing.saved_steps(str(workdir)) == [2, 4, 6]
  return workdir


def _losses(workdir):
  """{step: loss} of metrics.jsonl; a step logged twice (trained again after a resume) keeps its last row."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _array_files(step_dir):
  files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(p)]
  assert files, step_dir
  return files


# What a cut-short copy leaves of one step's folder.
def state_metadata_truncated(d):
  _truncate(os.path.join(d, "state", "_METADATA"))


def state_arrays_truncated(d):  # only the restore itself finds this one
  for p in _array_files(d):
    _truncate(p)


def state_arrays_missing(d):
  for p in _array_files(d):
    os.remove(p)


def data_metadata_truncated(d):
  _truncate(os.path.join(d, "data", "metadata"))


def data_missing(d):
  shutil.rmtree(os.path.join(d, "data"))


def step_folder_empty(d):
  shutil.rmtree(d)
  os.mkdir(d)


@pytest.mark.parametrize("damage_6, damage_4", [
    (state_metadata_truncated, data_metadata_truncated),  # the issue: json.decoder in a long traceback
    pytest.param(state_arrays_truncated, data_missing, marks=pytest.mark.slow),
    pytest.param(state_arrays_missing, step_folder_empty, marks=pytest.mark.slow),
], ids=lambda f: f.__name__)
def test_damaged_newest_steps_fall_back_to_the_newest_intact_one(trained, shared, tmp_path, damage_6, damage_4):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  ckpt = workdir / "checkpoints"
  damage_6(str(ckpt / "6"))
  damage_4(str(ckpt / "4"))
  proc = _main(workdir, shared)
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: checkpoint")]
  assert len(warnings) == 1, proc.stderr[-3000:]
  assert warnings[0].startswith(f"warning: checkpoint steps 6, 4 in {ckpt} are damaged (6: "), warnings[0]
  assert f"moved to {ckpt / 'damaged'}/" in warnings[0] and warnings[0].endswith("resuming from step 2")
  assert "Traceback" not in proc.stderr
  assert "resumed from step 2" in proc.stdout
  # Trained again from step 2 to the end: the same losses as the uninterrupted run, fresh intact steps.
  assert _losses(workdir) == _losses(trained)
  assert checkpointing.saved_steps(str(workdir)) == [2, 4, 6]
  checkpointer = checkpointing.Checkpointer(str(ckpt), async_save=False)
  try:
    assert [checkpointer.damage(s) for s in (2, 4, 6)] == [None] * 3
  finally:
    checkpointer.close()
  assert sorted(os.listdir(ckpt / "damaged")) == ["4", "6"]
  with open(workdir / checkpointing.DAMAGE_RECORD) as f:
    rows = [json.loads(line) for line in f]
  assert [(r["step"], r["resumed_from"], r["moved_to"]) for r in rows] == [
      (6, 2, str(ckpt / "damaged" / "6")), (4, 2, str(ckpt / "damaged" / "4"))]
  assert all(r["problem"] for r in rows)


def test_no_intact_step_is_one_line_and_a_hint(trained, shared, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  ckpt = workdir / "checkpoints"
  data_metadata_truncated(str(ckpt / "6"))
  state_arrays_truncated(str(ckpt / "4"))  # passes the cheap check; its restore fails
  state_metadata_truncated(str(ckpt / "2"))
  proc = _main(workdir, shared)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 2, proc.stderr[-3000:]
  message, hint = lines  # nothing else: no traceback, no orbax noise
  assert message.startswith(f"No checkpoint in {ckpt} can be restored: step 6: data/metadata is not valid JSON")
  assert "; step 4: restoring it failed (" in message and "; step 2: state/_METADATA is not valid JSON" in message
  assert hint.startswith("hint: ") and f"move {ckpt} aside to train from step 0" in hint
  # Nothing was moved or written: the user decides.
  assert checkpointing.saved_steps(str(workdir)) == [2, 4, 6]
  assert not (ckpt / "damaged").exists() and not (workdir / checkpointing.DAMAGE_RECORD).exists()
