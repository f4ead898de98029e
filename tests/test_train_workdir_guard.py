"""A reused workdir cannot be silently corrupted (`train.workdir`): a changed config is refused in one line
(or allowed and recorded with `checkpoint.allow_config_change`), a checkpoint of another model shape is
refused in one line naming a parameter and both shapes, and a resume says where it starts (or that there
is nothing left to train)."""

import json
import os
import re
import shutil

import pytest

from afmrl_jax.train import checkpointing, workdir as workdir_lib

from afmrl_jax.stages.stage1 import run as stage1
from afmrl_jax.config.schema import ConfigError
from afmrl_jax.config import schema
from configs import stage1 as stage1_configs
from tests.small_runs import small

pytestmark = pytest.mark.usefixtures("module_compilation_cache")

STEPS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with the `ci` stage-1 run trained for STEPS steps (each test works on a copy)."""
  root = tmp_path_factory.mktemp("guard")
  workdir = str(root / "base")
  result, *_ = stage1.train(schema.parse(config(root / "cache", STEPS)), workdir)
  assert result.step == STEPS and checkpointing.latest_saved_step(workdir) == STEPS
  return root


def config(cache, steps, **overrides):
  return small(stage1_configs.get_config("ci"), cache, steps, **overrides)


@pytest.fixture
def workdir(trained, tmp_path):
  path = str(tmp_path / "run")
  shutil.copytree(str(trained / "base"), path)
  return path


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_changed_config_is_refused_then_allowed_and_recorded(trained, workdir, capsys):
  cache = trained / "cache"
  old_lr = config(cache, STEPS).optimizer.learning_rate
  before = _read(os.path.join(workdir, "config.json"))
  fingerprint = _read(os.path.join(workdir, workdir_lib.FINGERPRINT_FILE))
  with pytest.raises(ConfigError) as e:
    stage1.train(schema.parse(config(cache, STEPS + 1, **{"optimizer.learning_rate": 0.01})), workdir)
  message = str(e.value)
  assert "\n" not in message
  assert f"config.optimizer.learning_rate: {old_lr!r} -> 0.01" in message
  assert "--config.checkpoint.allow_config_change=True" in e.value.hint
  assert "config.train" not in message  # run length is not part of the fingerprint
  assert _read(os.path.join(workdir, "config.json")) == before
  assert _read(os.path.join(workdir, workdir_lib.FINGERPRINT_FILE)) == fingerprint
  assert not os.path.exists(os.path.join(workdir, workdir_lib.CHANGES_FILE))
  assert checkpointing.latest_saved_step(workdir) == STEPS

  capsys.readouterr()
  result, *_ = stage1.train(schema.parse(config(cache, STEPS + 1, **{"optimizer.learning_rate": 0.01,
                                                         "checkpoint.allow_config_change": True})), workdir)
  out = capsys.readouterr().out
  assert result.step == STEPS + 1 and min(result.losses) == STEPS + 1
  assert f"config changed at step {STEPS}" in out and "config.optimizer.learning_rate" in out
  assert f"resumed from step {STEPS}" in out
  with open(os.path.join(workdir, workdir_lib.CHANGES_FILE), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1 and rows[0]["step"] == STEPS
  # The longer run moves the schedule too: one row at the step holds both.
  assert rows[0]["changes"] == {"config.optimizer.learning_rate": [old_lr, 0.01],
                                "config.train.num_steps": [STEPS, STEPS + 1]}
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.01
  # The fingerprint follows the allowed change: the same new config now resumes without the flag.
  result, *_ = stage1.train(schema.parse(config(cache, STEPS + 2, **{"optimizer.learning_rate": 0.01})), workdir)
  assert result.step == STEPS + 2


def test_other_model_shape_is_refused_in_one_line(trained, workdir):
  cache = trained / "cache"
  shape = {"model.arch": dict(config(cache, STEPS).model.arch.to_dict(), intermediate_size=96)}
  kept = {name: _read(os.path.join(workdir, name)) for name in ("config.json", workdir_lib.FINGERPRINT_FILE)}
  with pytest.raises(ConfigError) as e:
    stage1.train(schema.parse(config(cache, STEPS + 1, **shape)), workdir)
  assert "\n" not in str(e.value) and "config.model.arch.intermediate_size: 64 -> 96" in str(e.value)

  with pytest.raises(ConfigError) as e:
    stage1.train(schema.parse(config(cache, STEPS + 1, **shape, **{"checkpoint.allow_config_change": True})), workdir)
  message = str(e.value)
  assert "\n" not in message and len(message) < 400
  found = re.search(r" (params\.\S+) has shape \(([\d, ]+)\) in the checkpoint but \(([\d, ]+)\) in the model",
                    message)
  assert found, message
  saved, model = (tuple(int(d) for d in s.split(",")) for s in found.group(2, 3))
  assert 64 in saved and 96 not in saved and 96 in model and 64 not in model
  assert checkpointing.latest_saved_step(workdir) == STEPS
  # The failed resume changed nothing: the original config still resumes without the override.
  assert {name: _read(os.path.join(workdir, name)) for name in kept} == kept
  assert not os.path.exists(os.path.join(workdir, workdir_lib.CHANGES_FILE))
  result, *_ = stage1.train(schema.parse(config(cache, STEPS + 1)), workdir)
  assert result.step == STEPS + 1


def test_nothing_left_to_train_says_so(trained, workdir, capsys):
  capsys.readouterr()
  result, *_ = stage1.train(schema.parse(config(trained / "cache", STEPS)), workdir)
  out = capsys.readouterr().out
  assert f"already at step {STEPS} (train.num_steps={STEPS}); nothing to train" in out
  assert "resumed from" not in out
  assert result.step == STEPS and not result.losses
  assert checkpointing.latest_saved_step(workdir) == STEPS


def test_resume_says_where_it_starts(trained, workdir, capsys):
  capsys.readouterr()
  result, *_ = stage1.train(schema.parse(config(trained / "cache", STEPS + 1, **{"train.log_every": 5})), workdir)
  out = capsys.readouterr().out
  assert f"resumed from step {STEPS}" in out and "config changed" not in out
  assert result.step == STEPS + 1 and min(result.losses) == STEPS + 1
  # A longer run is no config change, but its learning-rate schedule is another: said and recorded.
  assert f"config.train.num_steps changed {STEPS} -> {STEPS + 1} at step {STEPS}: the learning-rate schedule" in out
  with open(os.path.join(workdir, workdir_lib.CHANGES_FILE), encoding="utf-8") as f:
    [row] = [json.loads(line) for line in f]
  assert row["changes"] == {"config.train.num_steps": [STEPS, STEPS + 1]}


def test_fingerprint_ignores_run_length_logging_and_eval():
  run = stage1_configs.get_config("ci")
  base = workdir_lib.fingerprint_fields(run.to_dict())
  for key, value in (("train.num_steps", 7), ("train.stop_after_steps", 3), ("train.log_every", 3),
                     ("checkpoint.every", 2), ("eval.recall_ks", (1,)), ("catalog.cache_dir", "/elsewhere"),
                     ("pipeline.num_threads", 5)):
    changed = stage1_configs.get_config("ci")
    section, name = key.split(".")
    changed[section][name] = value
    assert workdir_lib.fingerprint_fields(changed.to_dict()) == base, key
  changed = stage1_configs.get_config("ci")
  changed.loss.tau = 0.123
  assert workdir_lib.differences(base, workdir_lib.fingerprint_fields(changed.to_dict())) == {
      "config.loss.tau": (run.loss.tau, 0.123)}
