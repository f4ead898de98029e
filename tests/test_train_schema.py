"""The run-config schema: a field declared once is settable from the command line and validated."""

import dataclasses
import sys

import pytest
from absl import flags
from ml_collections import config_flags

import configs.stage1 as stage1_configs
from afmrl_jax import fields
from afmrl_jax.config import schema


@dataclasses.dataclass(frozen=True)
class Knobs(fields.Checked):
  """A throwaway section: `knob` stands for a field a developer has just added."""
  ratio: float = fields.bounded(0.5, 0.0, 1.0)
  knob: int = fields.positive(3)
  mode: str = fields.choice("fast", ("fast", "exact"))


@dataclasses.dataclass(frozen=True)
class Root:
  stage: str = "stage1"
  knobs: Knobs = Knobs()


def _command_line(argv, root=Root):
  """The ConfigDict absl's `--config.a.b=v` flags make from `schema.defaults(root)` (config_flags reads
  the overrides from sys.argv itself)."""
  old, sys.argv = sys.argv, ["prog", *argv]
  try:
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", schema.defaults(root), flag_values=values, lock_config=True)
    values(sys.argv)
  finally:
    sys.argv = old
  return values.config


def test_a_new_field_is_settable_from_the_command_line_and_validated():
  run = schema.parse(_command_line(["--config.knobs.knob=7", "--config.knobs.mode=exact"]), Root)
  assert run.knobs == Knobs(knob=7, mode="exact")
  assert schema.parse(_command_line([]), Root).knobs.knob == 3  # its declared default
  with pytest.raises(schema.ConfigError) as bad:
    schema.parse(_command_line(["--config.knobs.knob=0", "--config.knobs.mode=slow",
                                "--config.knobs.ratio=1.5"]), Root)
  assert sorted(bad.value.problems) == [
      "config.knobs.knob=0 must be > 0.",
      "config.knobs.mode='slow' is not one of ['fast', 'exact'].",
      "config.knobs.ratio=1.5 must lie in [0.0, 1.0].",
  ]


def test_every_field_of_the_run_is_in_the_stage_config():
  config = stage1_configs.get_config("tiny")
  for f in dataclasses.fields(schema.Run):
    section = getattr(schema.Run(), f.name)
    if dataclasses.is_dataclass(section):
      settable = {g.name for g in dataclasses.fields(section)} - set(schema.DERIVED.get(f.name, ()))
      assert set(config[f.name].keys()) == settable, f.name
  assert schema.parse(config).pipeline.batch_size == 64


def test_optional_fields_are_typed_placeholders():
  """`uniform_margin` defaults to None (unset) and still parses a float from the command line."""
  run = schema.parse(_command_line(["--config.loss.uniform_margin=0.5"], schema.Run))
  assert run.loss.uniform_margin == 0.5
  assert schema.parse(_command_line([], schema.Run)).loss.uniform_margin is None


def test_unknown_and_renamed_fields_name_the_right_one():
  config = stage1_configs.get_config("ci")
  config.unlock()
  config.loss.tauu = 0.1
  config.pipeline.shuffle_seed = 3
  with pytest.raises(schema.ConfigError) as bad:
    schema.parse(config)
  assert sorted(bad.value.problems) == [
      "config.loss.tauu is not a config field; did you mean config.loss.tau?",
      "config.pipeline.shuffle_seed was renamed: use config.pipeline.seed.",
  ]
