"""The run config: one dataclass per section, and the one adapter between them and the ConfigDict.

Every knob of a run is a field of a dataclass below (or of the library dataclass it extends), with its
default and its allowed values declared once (`afmrl_jax.fields`). From them:

* `defaults()` builds the ConfigDict that `configs/*.py` start from, so every field is settable as
  `--config.<section>.<field>=value` the moment it is declared;
* `parse(config)` turns a (possibly overridden) ConfigDict back into a typed `Run`, checking every
  value against its declaration and naming bad ones as `config.<section>.<field>`.

Adding a field to any section's dataclass needs no other line anywhere: it appears in the ConfigDict,
on the command line, in validation and in the typed `Run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from afmrl_jax.data.generator_data import GenerationOptions, GeneratorDataConfig
from afmrl_jax.data.pipeline import PipelineConfig
from afmrl_jax.errors import ConfigError
from afmrl_jax.config.sections import (AttributeEvalOptions, AttributeOptions, CatalogOptions, CheckpointOptions,
                                       CITOptions, EvalConfig, GradCacheOptions, LoRAOptions, LossOptions,
                                       MiningOptions, ModelOptions, OptimizerConfig, TrainOptions)
from afmrl_jax.fields import Checked, InvalidFields, check, choice, field_problem
from afmrl_jax.parallel import MeshShape
from afmrl_jax.rl.algo import GRPOConfig
from afmrl_jax.rl.reward import RewardOptions
from afmrl_jax.rl.rollout import RAROptions

STAGES = ("stage1", "eval", "sft", "generate", "stage2", "cit")
DTYPES = ("float32", "bfloat16")
TASKS = ("representation", "generator")

# Fields that were renamed: old dotted path -> new one (the command line refuses the old with a hint).
RENAMED = {
    "loss.alpha": "loss.bias_scale",
    "pipeline.shuffle_seed": "pipeline.seed",
    "pipeline.num_workers": "pipeline.num_threads",
    "eval.train_metrics_file": "train.metrics_file",
}

# Fields the trainer derives from other sections (catalog.image_size, attributes.*).
DERIVED = {"pipeline": ("image_size", "text_attributes", "term_source"), "generator": ("image_size",)}




@dataclasses.dataclass(frozen=True)
class Run:
  """The typed run config: top-level fields, then one dataclass per section."""
  stage: str = "stage1"
  preset: str = "tiny"
  task: str = choice("representation", TASKS)  # what the model is: the eval stage scores it accordingly
  dtype: str = choice("float32", DTYPES)  # compute dtype; parameters stay float32
  catalog: CatalogOptions = CatalogOptions()
  pipeline: PipelineConfig = PipelineConfig()
  model: ModelOptions = ModelOptions()
  lora: LoRAOptions = LoRAOptions()
  loss: LossOptions = LossOptions()
  gradcache: GradCacheOptions = GradCacheOptions()
  mining: MiningOptions = MiningOptions()  # stage 1: hard negatives mined with the current model
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainOptions = TrainOptions()
  mesh: MeshShape = MeshShape()
  checkpoint: CheckpointOptions = CheckpointOptions()
  eval: EvalConfig = EvalConfig()
  attributes: AttributeOptions = AttributeOptions()
  generator: GeneratorDataConfig = GeneratorDataConfig()  # the generator's examples (sft, generate)
  sft_eval: AttributeEvalOptions = AttributeEvalOptions()  # attribute quality after SFT
  generation: GenerationOptions = GenerationOptions()  # the generate stage
  rar: RAROptions = RAROptions()  # stage 2: policy, environment, rollouts
  grpo: GRPOConfig = GRPOConfig()  # stage 2: the GRPO objective
  reward: RewardOptions = RewardOptions()  # stage 2: the retrieval reward
  cit: CITOptions = CITOptions()  # the cit chain: every stage's config

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Dataclass -> ConfigDict


def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _optional_base(hint: Any) -> type | None:
  """`float` for `Optional[float]` (a field whose None means 'unset'), else None."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type):
      return args[0]
  return None


def _default(f: dataclasses.Field) -> Any:
  return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _settable(cls: type, section: str) -> list[dataclasses.Field]:
  return [f for f in dataclasses.fields(cls) if f.name not in DERIVED.get(section, ())]


def section_defaults(cls: type, section: str = "") -> ml_collections.ConfigDict:
  """The ConfigDict of one dataclass's settable fields and their defaults."""
  hints, out = _hints(cls), {}
  for f in _settable(cls, section):
    value = _default(f)
    if value is None:  # typed placeholder: `--config.x.y=0.5` still parses
      value = config_dict.placeholder(_optional_base(hints[f.name]) or str)
    elif isinstance(value, dict):
      value = ml_collections.ConfigDict(value)
    out[f.name] = value
  return ml_collections.ConfigDict(out)


def defaults(root: type = Run) -> ml_collections.ConfigDict:
  """The whole run config with every default: the starting point of `configs/*.py`."""
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(root):
    value = _default(f)
    c[f.name] = section_defaults(type(value), f.name) if dataclasses.is_dataclass(value) else value
  return c


# ---------------------------------------------------------------------------------------------------
# ConfigDict -> typed dataclasses


def _coerce(hint: Any, value: Any) -> Any:
  """Lists from the command line or JSON become the tuples a field declares."""
  if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
    inner = typing.get_args(hint)
    if inner and typing.get_origin(inner[0]) is tuple:
      return tuple(tuple(v) for v in value)
    return tuple(value)
  return value


def _plain(section: Any) -> dict[str, Any]:
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def build_section(cls: type, section: Any, name: str) -> tuple[Any, list[str]]:
  """(instance or None, problems) for the ConfigDict `section` read as dataclass `cls`."""
  values = _plain(section)
  known = {f.name for f in _settable(cls, name)}
  problems = [unknown_field(f"{name}.{key}", [f"{name}.{k}" for k in known]) for key in values if key not in known]
  if problems:
    return None, problems
  hints = _hints(cls)
  kwargs = {key: _coerce(hints[key], value) for key, value in values.items()}
  try:
    obj = cls(**kwargs)
    if not isinstance(obj, Checked):  # a section without the mixin still gets its declarations checked
      check(obj)
    return obj, []
  except InvalidFields as e:
    return None, [f"config.{name}.{field}={value!r} {why}." for field, value, why in e.problems]


def unknown_field(path: str, known: list[str]) -> str:
  """The sentence for an unknown dotted path, with the renamed or closest valid one."""
  if path in RENAMED:
    return f"config.{path} was renamed: use config.{RENAMED[path]}."
  close = difflib.get_close_matches(path, known, n=1)
  hint = f"; did you mean config.{close[0]}?" if close else "."
  return f"config.{path} is not a config field{hint}"


def parse_sections(config: Any, root: type = Run) -> tuple[dict[str, Any], list[str]]:
  """{field: typed value or None where it was bad} and the problems, for every field of `root`."""
  values: dict[str, Any] = {}
  problems: list[str] = []
  raw = _plain(config)
  known = {f.name for f in dataclasses.fields(root)}
  problems += [unknown_field(key, sorted(known)) for key in raw if key not in known]
  for f in dataclasses.fields(root):
    default = _default(f)
    if dataclasses.is_dataclass(default):
      values[f.name], more = build_section(type(default), raw.get(f.name, {}), f.name)
    else:
      value = raw.get(f.name, default)
      why = field_problem(f, value)
      more = [f"config.{f.name}={value!r} {why}."] if why else []
      values[f.name] = None if why else value
    problems += more
  return values, problems


def parse(config: Any, root: type = Run) -> Any:
  """The typed `root` (default `Run`) of a ConfigDict; ConfigError lists every bad value."""
  if isinstance(config, root):
    return config
  values, problems = parse_sections(config, root)
  if problems:
    raise ConfigError(problems)
  return root(**{k: v for k, v in values.items() if v is not None})


def saved_stage(workdir: str) -> str | None:
  """The stage of the run that wrote `<workdir>/config.json`, None without one."""
  import json
  import os
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("stage")


# The sections an `eval` command sets itself; everything else comes from the evaluated run's config.json.
EVAL_SECTIONS = ("eval", "sft_eval", "mesh", "checkpoint")
_TASK_OF_STAGE = {"stage1": "representation", "sft": "generator", "stage2": "generator"}


def for_evaluation(run: Run, workdir: str) -> tuple[Run, list[str]]:
  """The run to evaluate: the config the trained workdir (`checkpoint.restore_dir`, else `workdir`)
  stored, with this command's `EVAL_SECTIONS`; and the names of the other fields this command set
  differently (they are ignored). Without a stored config, `run` itself."""
  source = run.checkpoint.restore_dir or workdir
  stage = saved_stage(source)
  if stage not in _TASK_OF_STAGE:
    return run, []
  saved = load_saved(source)
  kept = {name: getattr(run, name) for name in EVAL_SECTIONS}
  out = dataclasses.replace(saved, stage="eval", task=_TASK_OF_STAGE[stage], **kept)
  ignored = [f"{name}.{f.name}" for name in (f.name for f in dataclasses.fields(Run))
             if name not in EVAL_SECTIONS and dataclasses.is_dataclass(getattr(run, name))
             for f in dataclasses.fields(getattr(run, name))
             if getattr(getattr(run, name), f.name) != getattr(getattr(out, name), f.name)]
  return out, ignored


def load_saved(workdir: str) -> Run:
  """The typed `Run` a finished stage wrote to `<workdir>/config.json` (derived fields dropped: the
  trainer derives them again)."""
  import json
  import os
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir} is not the workdir of a finished run.")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  for section, names in DERIVED.items():
    for name in names:
      saved.get(section, {}).pop(name, None)
  known = {f.name for f in dataclasses.fields(Run)}
  return parse({k: v for k, v in saved.items() if k in known})
