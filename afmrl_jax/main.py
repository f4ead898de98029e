"""afmrl_jax entry point: `python -m afmrl_jax.main --config=configs/stage1.py[:preset] --workdir=DIR`.

`--config` is an ml_collections config file (`get_config(arg)`; the part after ':' picks a preset) and
any field can be overridden as `--config.section.field=value`. `config.stage` selects what runs:
`stage1` (AGCL training, then evaluation), `eval` (evaluation of a trained workdir), `sft` (the
attribute generator), `generate` (its attributes for a catalog), `stage2` (RAR: GRPO on the generator
with a retrieval reward) or `cit` (the whole chain, each stage in a sub-directory). The config is validated before anything compiles; a renamed
or unknown `--config.` key is refused with one line naming the right one.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/stage1.py or configs/stage1.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics, reports.")


def run(config, workdir: str) -> dict:
  """Validates `config` and runs its stage; returns the stage's summary dict."""
  from afmrl_jax.stages.registry import run_stage
  return run_stage(config, workdir)


def bad_override(argv: list[str]) -> str | None:
  """The one-line refusal of the first `--config.a.b=v` whose key the config does not have, or None.

  Checked before absl parses the flags, whose own error for an unknown key is a traceback.
  """
  from afmrl_jax.config import schema
  from afmrl_jax.config.sections import CONFIG_OF
  known = set(_dotted(schema.defaults()))
  free_form = ("model.arch.",)  # an HF config.json dict: its keys come from the presets
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      key = arg[len("--config."):].split("=", 1)[0]
      if key.startswith("cit.stages."):  # the cit chain's stage configs: `cit.stages.<stage>.<a run's key>`
        stage, _, rest = key[len("cit.stages."):].partition(".")
        if stage not in CONFIG_OF.values():
          return (f"config.{key} is not a config field: cit.stages holds "
                  f"{', '.join(sorted(set(CONFIG_OF.values())))}.")
        if rest and rest not in known and not rest.startswith(free_form):
          return schema.unknown_field(key, sorted(f"cit.stages.{stage}.{k}" for k in known))
      elif key not in known and not key.startswith(free_form):
        return schema.unknown_field(key, sorted(known))
  return None


def bad_preset(argv: list[str]) -> str | None:
  """The one-line refusal of `--config=FILE:PRESET` when FILE's `get_config` refuses PRESET (a ConfigError
  naming the presets), or None. absl's own report of it is a 13-line "FATAL Flags parsing error" with the
  traceback, so the file is tried here first; any other failure is left to absl to report."""
  import importlib.util
  from afmrl_jax.config import schema
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  if not value or ":" not in value:
    return None
  path, preset = value.split(":", 1)
  if not os.path.isfile(path):
    return None
  try:
    spec = importlib.util.spec_from_file_location("_afmrl_preset_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.get_config(preset)
  except schema.ConfigError as e:
    return " ".join(e.problems)
  except Exception:  # noqa: BLE001 - absl loads the file again and reports its own errors
    return None
  return None


def _dotted(tree, prefix: str = ""):
  for key, value in tree.items():
    path = f"{prefix}{key}"
    yield path
    if hasattr(value, "items"):
      yield from _dotted(value, path + ".")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax/absl INFO chatter; the trainer prints its own lines
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/stage1.py:tiny")
  from afmrl_jax import parallel
  if parallel.maybe_initialize_distributed():
    logging.info("Initialised multi-host JAX.")
  from afmrl_jax.errors import UserError
  try:
    summary = run(config, _WORKDIR.value or "")
  except UserError as e:  # the user's config, data, workdir or checkpoint: what to change, no traceback
    print(str(e), file=sys.stderr)
    if e.hint:
      print(f"hint: {e.hint}", file=sys.stderr)
    sys.exit(2)
  from afmrl_jax import parallel
  if parallel.is_process_0():
    print(json.dumps(summary, indent=1, sort_keys=True, default=str))


def entry():
  problem = bad_override(sys.argv[1:]) or bad_preset(sys.argv[1:])
  if problem:
    print(problem, file=sys.stderr)
    sys.exit(2)
  flags.mark_flag_as_required("config")
  app.run(main)


if __name__ == "__main__":
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  entry()
