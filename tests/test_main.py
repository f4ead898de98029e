"""`python -m afmrl_jax.main`: config file + presets + overrides, clear errors, SIGTERM saves and exits."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _main(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "afmrl_jax.main", *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def test_bad_values_exit_with_one_sentence_each(tmp_path):
  proc = _main("--config=configs/stage1.py:ci", f"--workdir={tmp_path}", "--config.loss.tau=-1",
               "--config.pipeline.batching=families")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.loss.tau=-1.0 must be > 0." in proc.stderr
  assert "config.pipeline.batching='families' is not one of ['random', 'family_mixed']." in proc.stderr


def test_cit_without_its_stage_configs_and_unknown_preset(tmp_path):
  proc = _main("--config=configs/stage1.py:ci", f"--workdir={tmp_path}", "--config.stage=cit")
  assert proc.returncode == 2
  assert "config.cit.stages lacks the 'generate', 'sft', 'stage1', 'stage2' configs" in proc.stderr
  # An unknown preset: one line naming the presets (before: absl's 13-line "FATAL Flags parsing error" and a
  # traceback, exit 1), for each file's own presets and either spelling of the flag.
  proc = _main("--config=configs/stage1.py:giant", f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("Unknown config preset 'giant' (the part after ':' in --config); choose one of "
                                 "['tiny', 'ci', 'bench-small', 'qwen2vl-2b'].")
  proc = _main("--config", "configs/cit.py:bench-small", f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("Unknown config preset 'bench-small' (the part after ':' in --config); choose "
                                 "one of ['tiny', 'ci'].")


def test_cit_refuses_a_bad_stage_config_before_anything_trains(tmp_path):
  # A bad value, and an unknown key, under cit.stages.<stage>: one line each, exit 2, before SFT starts.
  proc = _main("--config=configs/cit.py:ci", f"--workdir={tmp_path}", "--config.cit.stages.stage2.loss.tau=-1",
               "--config.cit.stages.stage2.rar.rollout_chunks=7")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.cit.stages.stage2.loss.tau=-1.0 must be > 0." in proc.stderr
  assert "config.cit.stages.stage2.rar.rollout_chunks=7 must divide" in proc.stderr
  assert not (tmp_path / "sft").exists()
  proc = _main("--config=configs/cit.py:ci", f"--workdir={tmp_path}", "--config.cit.stages.stage2.loss.tua=1")
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("config.cit.stages.stage2.loss.tua is not a config field; did you mean "
                                 "config.cit.stages.stage2.loss.tau?")
  assert not (tmp_path / "sft").exists()


def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config=configs/stage1.py:ci", f"--workdir={workdir}", "--config.train.num_steps=100000",
          "--config.train.log_every=1", "--config.checkpoint.every=100000",
          "--config.catalog.families_per_category=4", "--config.pipeline.fresh_views=False"]
  proc = subprocess.Popen([sys.executable, "-m", "afmrl_jax.main", *args], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 240
    lines = []
    for line in proc.stdout:  # wait until training runs
      lines.append(line)
      if line.startswith("step") and "/100000" in line and not line.startswith("step      1/"):
        break
      assert time.time() < deadline, "".join(lines[-20:])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, (out or "")[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["stopped_early"] and summary["stop_reason"] == "SIGTERM"
  saved = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  assert saved == [summary["step"]] and summary["step"] >= 2


def test_renamed_and_unknown_overrides_are_one_line(tmp_path):
  proc = _main("--config=configs/stage1.py:ci", f"--workdir={tmp_path}", "--config.loss.alpha=0")
  assert proc.returncode == 2
  assert proc.stderr.strip() == "config.loss.alpha was renamed: use config.loss.bias_scale."
  proc = _main("--config=configs/stage1.py:ci", f"--workdir={tmp_path}", "--config.loss.tauu=0.1")
  assert proc.returncode == 2
  assert proc.stderr.strip() == "config.loss.tauu is not a config field; did you mean config.loss.tau?"
  # The model's HF architecture dict is free-form: its preset keys stay overridable.
  proc = _main("--config=configs/stage1.py:ci", f"--workdir={tmp_path}", "--config.model.arch.num_key_value_heads=3")
  assert proc.returncode == 2 and "is not a multiple of num_key_value_heads=3" in proc.stderr


def test_a_bad_manifest_row_is_one_line_and_a_hint_without_traceback(tmp_path):
  """The project's own errors (here a manifest row without a title) leave main as the message and a
  hint on stderr, exit status 2; before, they were a traceback."""
  from afmrl_jax.data import catalog as catalog_lib
  from afmrl_jax.data import manifest
  cat = catalog_lib.generate_catalog(
      catalog_lib.CatalogConfig(seed=3, families_per_category=2, listings_per_product=2, num_workers=0))
  path = manifest.write_manifest(cat, str(tmp_path / "m"))
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  del rows[1]["title"]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  proc = _main("--config=configs/stage1.py:ci", f"--workdir={tmp_path / 'w'}", f"--config.catalog.manifest={path}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert "Traceback" not in proc.stderr
  assert len(lines) == 2 and "row 2" in lines[0] and "'title'" in lines[0], lines
  assert lines[1] == f"hint: {manifest.ManifestError.hint}"
