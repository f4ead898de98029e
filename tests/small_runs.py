"""Shared by the trainer tests: a stage config shrunk to a small catalog and a few steps."""


def small(config, cache_dir, steps, **overrides):
  """`config` on the small catalog cached in `cache_dir`, `steps` steps, no evaluation at the end;
  `overrides` are `"section.field": value`."""
  config.catalog.cache_dir = str(cache_dir)
  config.catalog.families_per_category = 4
  config.pipeline.fresh_views = False  # rendering views costs more than the ci models here
  config.train.num_steps = steps
  config.train.eval_at_end = False
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config
