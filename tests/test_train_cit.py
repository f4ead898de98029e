"""The cit chain: each step's config wiring, and kill -9 in its third step then rerun (finished steps
skipped, the interrupted one resumed from its own checkpoint)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_main import ROOT, _env

STAGE1_STEPS = 8
ARGS = ["--config=configs/cit.py:ci",
        f"--config.cit.stages.stage1.train.num_steps={STAGE1_STEPS}",
        "--config.cit.stages.stage1.checkpoint.every=2",
        "--config.cit.stages.stage2.train.num_steps=2"]
TIMEOUT_S = 1800  # the whole ci chain is ~3 min on an idle machine; CI machines are shared


def _start(workdir, log_path):
  """The chain as a subprocess in its own process group; stdout+stderr go to `log_path` (a file, so a
  chatty child never blocks on a full pipe while the test polls)."""
  log = open(log_path, "w", encoding="utf-8")
  try:
    return subprocess.Popen([sys.executable, "-m", "afmrl_jax.main", *ARGS, f"--workdir={workdir}"], cwd=ROOT,
                            env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
  finally:
    log.close()  # the child holds its own descriptor


def _tail(path, n=4000):
  return path.read_text(encoding="utf-8", errors="replace")[-n:] if path.exists() else "(no output)"


def _checkpoint_steps(step_dir):
  """Steps of the finalized checkpoints (orbax renames `<n>.orbax-checkpoint-tmp-*` to `<n>` when done)."""
  folder = step_dir / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit() and (folder / name).is_dir())


def _kill_group(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait(timeout=60)


def _section(out, step):
  """The part of a chain's output that belongs to `step` (from its '=== CIT:' line to the next one)."""
  start = out.index(f"=== CIT: {step} -> ")
  end = out.find("=== CIT: ", start + 1)
  return out[start:end if end >= 0 else len(out)]


@pytest.mark.slow
def test_cit_resumes_after_a_kill_in_its_third_stage(tmp_path):
  from afmrl_jax.stages.cit import CHAIN, DONE
  workdir = tmp_path / "cit"
  stage1 = workdir / "stage1"

  # First run: kill -9 (the whole process group) once stage1 saved a checkpoint but has not finished.
  first_log = tmp_path / "first.log"
  proc = _start(workdir, first_log)
  try:
    deadline = time.time() + TIMEOUT_S
    while not (_checkpoint_steps(stage1) and not (stage1 / DONE).exists()):
      assert proc.poll() is None, f"the chain exited (rc {proc.returncode}) before stage1 saved:\n{_tail(first_log)}"
      assert not (stage1 / DONE).exists(), "stage1 finished before a checkpoint was seen"
      assert time.time() < deadline, _tail(first_log)
      time.sleep(0.05)
  finally:
    _kill_group(proc)
  first_out = first_log.read_text(encoding="utf-8", errors="replace")
  assert not (stage1 / DONE).exists(), "stage1 finished before the kill; the test did not interrupt it"
  for step in ("sft", "generate_sft", "stage1"):
    assert f"=== CIT: {step} -> " in first_out, first_out[-4000:]
  assert "=== CIT: stage2 -> " not in first_out
  saved = _checkpoint_steps(stage1)  # after the kill: what the rerun resumes from
  resumed_at = max(saved)
  assert 0 < resumed_at < STAGE1_STEPS, saved

  kept = {  # what the two finished steps left; the rerun must not touch them
      rel: ((workdir / rel).read_bytes(), (workdir / rel).stat().st_mtime_ns)
      for rel in ("sft/cit_stage.json", "generate_sft/cit_stage.json", "sft/metrics.jsonl",
                  "generate_sft/generated/attributes.jsonl")}
  assert all(data for data, _ in kept.values())
  before_rows = [line for line in (stage1 / "metrics.jsonl").read_text(encoding="utf-8").splitlines(True)
                 if line.strip()]
  before_rows = [line for line in before_rows if json.loads(line)["step"] <= resumed_at]
  assert [json.loads(line)["step"] for line in before_rows] == list(range(1, resumed_at + 1))  # log_every=1

  # Rerun the same command to completion.
  rerun_log = tmp_path / "rerun.log"
  rerun = _start(workdir, rerun_log)
  try:
    rc = rerun.wait(timeout=TIMEOUT_S)
  finally:
    if rerun.poll() is None:
      _kill_group(rerun)
  out = rerun_log.read_text(encoding="utf-8", errors="replace")
  assert rc == 0, out[-4000:]

  # The finished steps were skipped: not announced, their files byte-identical and not rewritten.
  assert "=== CIT: sft -> " not in out and "=== CIT: generate_sft -> " not in out, out[:3000]
  for step in ("stage1", "stage2", "generate_rar", "stage1_cit"):
    assert f"=== CIT: {step} -> " in out, out[-4000:]
  for rel, (data, mtime) in kept.items():
    path = workdir / rel
    assert path.read_bytes() == data, f"{rel} changed"
    assert path.stat().st_mtime_ns == mtime, f"{rel} was rewritten"

  # stage1 resumed from its checkpoint: the first step it trained is the one after it, the rows logged
  # before the kill are still there verbatim (a fresh start would have dropped them), and it ended at 8.
  section = _section(out, "stage1")
  width = len(str(STAGE1_STEPS))
  step_lines = [line for line in section.splitlines() if line.startswith("step ") and f"/{STAGE1_STEPS} " in line]
  assert step_lines and step_lines[0].startswith(f"step {resumed_at + 1:>{width}d}/{STAGE1_STEPS}"), section[-3000:]
  assert f"step {1:>{width}d}/{STAGE1_STEPS} " not in section
  after_rows = [line for line in (stage1 / "metrics.jsonl").read_text(encoding="utf-8").splitlines(True)
                if line.strip()]
  assert after_rows[:resumed_at] == before_rows
  assert [json.loads(line)["step"] for line in after_rows] == list(range(1, STAGE1_STEPS + 1))
  stage1_done = json.loads((stage1 / DONE).read_text(encoding="utf-8"))
  assert stage1_done["step"] == STAGE1_STEPS and not stage1_done["stopped_early"]
  assert STAGE1_STEPS in _checkpoint_steps(stage1)

  # Every step finished, and the report has a row per step.
  for step in CHAIN:
    assert (workdir / step / DONE).is_file(), step
  rows = json.loads((workdir / "cit_report.json").read_text(encoding="utf-8"))
  assert sorted(rows) == sorted(CHAIN)  # report.write_json sorts keys; the markdown keeps the chain order
  assert rows["stage1"]["step"] == STAGE1_STEPS
  table = (workdir / "cit_report.md").read_text(encoding="utf-8").splitlines()[2:]
  assert [line.split("|")[1].strip() for line in table] == list(CHAIN)


def test_stage_config_wires_each_step_to_the_earlier_ones(tmp_path):
  import configs.cit as cit_config
  from afmrl_jax.stages import cit
  from afmrl_jax.config import schema
  run = schema.parse(cit_config.get_config("ci"))
  workdir = str(tmp_path / "w")
  d = lambda name: os.path.join(workdir, name)
  stages_before = json.dumps(run.cit.stages, sort_keys=True, default=str)
  stage1_steps = run.cit.stages["stage1"]["train"]["num_steps"]
  out_dir = run.cit.stages["generate"]["generation"]["output_dir"]

  configs = {step: cit.stage_config(step, run.cit, workdir) for step in cit.CHAIN}
  parsed = {step: schema.parse(c) for step, c in configs.items()}  # every produced config is valid
  assert {step: r.stage for step, r in parsed.items()} == {
      "sft": "sft", "generate_sft": "generate", "stage1": "stage1", "stage2": "stage2",
      "generate_rar": "generate", "stage1_cit": "stage1"}
  assert {r.catalog.cache_dir for r in parsed.values()} == {d("data_cache")}  # one catalog for the chain

  assert parsed["generate_sft"].checkpoint.restore_dir == d("sft")
  assert parsed["stage1"].attributes.source == os.path.join(d("generate_sft"), out_dir, "attributes.jsonl")
  assert parsed["stage1"].attributes.enrich_queries is True
  assert parsed["stage1"].train.num_steps == stage1_steps
  assert (parsed["stage2"].rar.policy, parsed["stage2"].rar.environment) == (d("sft"), d("stage1"))
  assert parsed["generate_rar"].checkpoint.restore_dir == d("stage2")
  s1c = parsed["stage1_cit"]
  assert s1c.checkpoint.init_from == d("stage1")
  assert s1c.attributes.source == os.path.join(d("generate_rar"), out_dir, "attributes.jsonl")
  assert s1c.attributes.enrich_queries is True
  assert s1c.pipeline.train_fraction == pytest.approx(0.3) == run.cit.train_fraction
  assert s1c.train.num_steps == max(1, round(0.3 * stage1_steps))
  assert parsed["stage1"].pipeline.train_fraction == 1.0  # only the second round trains on a share

  # A share so small it would round to 0 steps still trains one.
  small = dataclasses.replace(run.cit, train_fraction=0.01)
  tiny = schema.parse(cit.stage_config("stage1_cit", small, workdir))
  assert tiny.train.num_steps == 1 and tiny.pipeline.train_fraction == pytest.approx(0.01)

  # Building the configs did not change the stage configs they came from.
  assert json.dumps(run.cit.stages, sort_keys=True, default=str) == stages_before
  missing = dataclasses.replace(run.cit, stages={k: v for k, v in run.cit.stages.items() if k != "stage2"})
  with pytest.raises(ValueError, match="stage2"):
    cit.stage_config("stage2", missing, workdir)
