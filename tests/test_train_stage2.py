"""Stage 2 (RAR): GRPO steps move the policy the way the reward points (and would not with the advantage
sign flipped); a run stopped after step 2 and resumed is bitwise the uninterrupted one, with the real
environment; `validate` names a missing policy run."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.sft as sft_configs
import configs.stage1 as stage1_configs
import configs.stage2 as stage2_configs
from afmrl_jax.data import generator_data
from afmrl_jax.data.table import ListingTable
from afmrl_jax.generate.logprobs import completion_logprobs
from afmrl_jax.rl import algo
from afmrl_jax.stages.stage2 import environment as rar_env, run as stage2
from afmrl_jax.stages.sft import run as sft
from afmrl_jax.stages.stage1 import run as stage1
from afmrl_jax.stages.validate import ConfigError, validate
from afmrl_jax.train import catalog as catalog_lib
from afmrl_jax.stages import generator
from afmrl_jax.config import schema
from tests.small_runs import small


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("rar")


@pytest.fixture(scope="module")
def sft_workdir(root):
  """A `ci` SFT run of 4 steps (one checkpoint): the policy and KL reference of every stage-2 run here."""
  workdir = str(root / "sft")
  sft.train(schema.parse(small(sft_configs.get_config("ci"), root / "cache", 4)), workdir)
  return workdir


@pytest.fixture(scope="module")
def runs(root, sft_workdir):
  """The SFT run and a 2-step `ci` stage-1 run with enriched queries on the same catalog (the environment)."""
  workdir = str(root / "stage1")
  config = small(stage1_configs.get_config("ci"), root / "cache", 2, **{"attributes.enrich_queries": True})
  stage1.train(schema.parse(config), workdir)
  return {"cache": root / "cache", "policy": sft_workdir, "environment": workdir}


def _stage2_config(cache, policy, environment="", steps=4, **overrides):
  config = small(stage2_configs.get_config("ci"), cache, steps, **overrides)
  config.rar.policy = policy
  config.rar.environment = environment
  return config


def _metrics(workdir):
  """step -> its metrics row (the last one written for that step)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row for row in map(json.loads, f)}


# ----------------------------------------------------------------------------------------------------
# The sign of a GRPO step


class _EndingReward:
  """A stand-in environment: `sign` for a sampled string that ended (EOS within rar.max_new_tokens), 0 for
  one cut at the budget. sign = +1 prefers short strings, -1 long ones."""

  def __init__(self, table, sign):
    self.table, self.sign = table, sign

  def score(self, listing_ids, texts, ended):
    ended = np.asarray(ended, bool)
    return (self.sign * ended).astype(np.float32), {"ended_rate": float(ended.mean())}


def _eos_logprob(parts, params):
  """Mean log-probability of ending at once (a completion of just EOS) over the first query prompts."""
  data_cfg = generator.data_config(parts.policy_run)
  grid = generator_data.image_grid_thw(data_cfg)
  batch = next(iter(generator_data.prompt_batches(parts.environment.table, parts.tokenizer, data_cfg,
                                                  with_answers=False)))
  b = len(batch["prompt_ids"])
  model = nnx.merge(parts.model.graphdef, params, parts.model.rest)
  logp = completion_logprobs(model, jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["prompt_mask"]),
                             jnp.full((b, 1), parts.rollout.sampling.eos_ids[0], jnp.int32), jnp.ones((b,), jnp.int32),
                             jnp.asarray(batch["pixel_values"]), grid,
                             temperature=parts.rollout.sampling.logprob_temperature)
  return float(jnp.mean(logp))


@pytest.mark.parametrize("sign, flip_advantages, direction", [
    (1.0, False, +1),   # prefer strings that end: ending at once becomes likelier
    (-1.0, False, -1),  # prefer strings cut at the budget: less likely
    (1.0, True, -1),    # a flipped advantage sign (a bug) moves the policy against the reward
], ids=["prefer_short", "prefer_long", "flipped_advantage_sign"])
def test_grpo_steps_follow_the_reward_sign(sign, flip_advantages, direction, sft_workdir, root, tmp_path,
                                           monkeypatch):
  def load(run, workdir, mesh, batch_size):
    catalog, _, _ = catalog_lib.load_catalog(generator.policy_run(run), run.rar.policy)
    return _EndingReward(ListingTable.from_catalog(catalog, run.rar.query_split), sign)

  monkeypatch.setattr(rar_env.Environment, "load", staticmethod(load))
  if flip_advantages:
    grpo = algo.ADVANTAGES["grpo"]
    monkeypatch.setitem(algo.ADVANTAGES, "grpo", lambda rewards, eps=1e-6: -grpo(rewards, eps))
  config = _stage2_config(root / "cache", sft_workdir, steps=4, **{"optimizer.learning_rate": 1e-2,
                                                                     "checkpoint.enabled": False})
  result, parts = stage2.train(schema.parse(config), str(tmp_path))
  assert result.step == 4 and not result.stopped_early
  rows = _metrics(str(tmp_path))
  assert min(rows[s]["reward_equal_groups"] for s in rows) < 1, rows  # some group carried a preference
  before = _eos_logprob(parts, parts.rollout.ref_params)  # the SFT weights
  after = _eos_logprob(parts, parts.model.params)
  # Observed: -6.53 -> -5.70 (prefer short), -> -7.00 (prefer long; flipped sign). A flipped sign in the
  # loss (clipped_policy_loss) swaps the two, so every case here fails then too.
  assert (after - before) * direction > 0.2, (before, after)


def test_lora_policy_trains_only_adapters_on_frozen_sft_weights(sft_workdir, root, tmp_path, monkeypatch):
  """`lora.enabled`: the policy starts equal to SFT (zero adapters), the reward moves it the way it points,
  only adapters are trained and checkpointed, and the generate stage's loader rebuilds the tuned policy."""
  def load(run, workdir, mesh, batch_size):
    catalog, _, _ = catalog_lib.load_catalog(generator.policy_run(run), run.rar.policy)
    return _EndingReward(ListingTable.from_catalog(catalog, run.rar.query_split), 1.0)

  monkeypatch.setattr(rar_env.Environment, "load", staticmethod(load))
  config = _stage2_config(root / "cache", sft_workdir, steps=4, **{"optimizer.learning_rate": 1e-1,
                                                                     "lora.enabled": True})
  config.lora.rank = 4
  result, parts = stage2.train(schema.parse(config), str(tmp_path))
  assert result.step == 4
  kinds = {type(v).__name__ for v in jax.tree.leaves(parts.model.params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert kinds == {"LoRAParam"}, kinds
  # The frozen base is the SFT generator, bit for bit.
  sft_model = generator.policy_model(dataclasses.replace(parts.run, lora=dataclasses.replace(parts.run.lora, enabled=False)),
                                  parts.policy_run, parts.tokenizer, parts.mesh)
  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  base = nnx.to_pure_dict(nnx.state(parts.model.merge(), frozen))
  jax.tree.map(np.testing.assert_array_equal, base, nnx.to_pure_dict(nnx.state(sft_model.merge(), frozen)))
  sft_logp = _eos_logprob(dataclasses.replace(parts, model=sft_model), sft_model.params)
  assert _eos_logprob(parts, parts.rollout.ref_params) == pytest.approx(sft_logp, abs=1e-5)  # zero adapters = SFT
  after = _eos_logprob(parts, parts.model.params)
  assert after - sft_logp > 0.2, (sft_logp, after)
  # What the generate stage loads from this workdir: the SFT weights plus the last checkpoint's adapters.
  tuned, step = generator.tuned_policy(str(tmp_path), parts.tokenizer, parts.mesh)
  assert step == 4
  assert _eos_logprob(dataclasses.replace(parts, model=tuned), tuned.params) == pytest.approx(after, abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# Resume

COMPARED = ("loss", "policy_loss", "kl", "entropy", "grad_norm", "reward_mean", "reward_std",
            "reward_equal_groups", "recall@20", "hit@1", "completion_tokens", "attribute_keys")


def test_stage2_resume_is_bitwise(runs, tmp_path, monkeypatch):
  """The real environment (frozen stage-1 model, gallery index saved in the workdir and reloaded on resume).
  The 4-step ci SFT policy writes no well-formed string, so every reward would be the constant malformed
  penalty and every advantage 0; the penalty is switched off to make the retrieval rewards, hence the
  updates, depend on what was sampled."""
  monkeypatch.setattr(rar_env, "malformed_flags", lambda texts, *_: np.zeros(len(texts), bool))
  config = lambda **kw: _stage2_config(runs["cache"], runs["policy"], runs["environment"], steps=4, **kw)
  full, full_parts = stage2.train(schema.parse(config()), str(tmp_path / "full"))
  workdir = str(tmp_path / "split")
  first, _ = stage2.train(schema.parse(config(**{"train.stop_after_steps": 2})), workdir)
  assert first.stopped_early and first.step == 2
  second, _ = stage2.train(schema.parse(config()), workdir)
  assert second.step == 4 and not second.stopped_early and min(second.losses) == 3
  assert os.path.isdir(os.path.join(workdir, rar_env.INDEX_DIR))

  for s in range(1, 5):
    assert (first.losses if s <= 2 else second.losses)[s] == full.losses[s], s
  want, got = _metrics(str(tmp_path / "full")), _metrics(workdir)
  assert sorted(want) == sorted(got) == [1, 2, 3, 4]
  assert min(want[s]["reward_equal_groups"] for s in want) < 1, want  # some advantage was not 0
  for s in range(1, 5):
    assert {k: got[s][k] for k in COMPARED} == {k: want[s][k] for k in COMPARED}, s
  for a, b in ((second.state["params"], full.state["params"]), (second.state["opt_state"], full.state["opt_state"])):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
  # The policy moved away from the SFT weights (so equal parameters say something).
  sft_params = full_parts.rollout.ref_params
  moved = jax.tree.map(lambda p, r: bool(np.any(np.asarray(p) != np.asarray(r))), full.state["params"], sft_params)
  assert any(jax.tree.leaves(moved))


# ----------------------------------------------------------------------------------------------------
# Validation


def _problems(config, workdir):
  with pytest.raises(ConfigError) as info:
    validate(config, str(workdir), num_devices=8, num_processes=1)
  return info.value


@pytest.mark.parametrize("policy", ["", "missing", "not_a_run"])
def test_stage2_validate_refuses_missing_runs(policy, tmp_path):
  (tmp_path / "not_a_run").mkdir()  # a directory, but no config.json nor checkpoints
  path = str(tmp_path / policy) if policy else ""
  config = _stage2_config(tmp_path / "cache", path)
  assert config.stage == "stage2"
  error = _problems(config, tmp_path / "work")
  (problem,) = [p for p in error.problems if "config.rar.policy" in p]
  assert "config.rar.policy" in str(error)
  assert ("is required" in problem) if not policy else (f"config.rar.policy={path!r} is not a finished SFT" in problem)
  assert any("config.rar.environment is required" in p for p in error.problems)


def test_stage2_validate_accepts_a_finished_policy_run(sft_workdir, tmp_path):
  config = _stage2_config(tmp_path / "cache", sft_workdir)  # the environment still missing
  error = _problems(config, tmp_path / "work")
  assert error.problems == ["config.rar.environment is required: the workdir of a finished stage-1 run."]


# ----------------------------------------------------------------------------------------------------
# Several processes


def _stage2_args(runs):
  import sys
  return [sys.executable, "-m", "afmrl_jax.main", "--config=configs/stage2.py:ci",
          f"--config.catalog.cache_dir={runs['cache']}", "--config.catalog.families_per_category=4",
          "--config.pipeline.fresh_views=False", "--config.train.num_steps=3", "--config.train.log_every=1",
          f"--config.rar.policy={runs['policy']}", f"--config.rar.environment={runs['environment']}",
          "--config.rar.rollout_chunks=1", "--config.rar.eval_queries=8", "--config.reward.retriever=exact"]


@pytest.fixture(scope="module")
def one_process(runs, tmp_path_factory):
  """The stage-2 run of the test below in 1 process x 4 devices."""
  import subprocess
  from tests.test_main import ROOT, _env
  workdir = tmp_path_factory.mktemp("one") / "run"
  one = subprocess.run([*_stage2_args(runs), f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4"), timeout=900)
  assert one.returncode == 0, one.stderr[-3000:]
  return workdir


@pytest.mark.parametrize("search", [pytest.param("gathered", marks=pytest.mark.slow), "sharded"])
def test_two_processes_train_and_score_like_one(search, runs, one_process, tmp_path):
  """2 processes x 2 devices (`launch/local_multiprocess.sh`; each samples and scores its half of the
  queries' groups; the environment's gallery gathered on every process, or with `reward.gallery_search=
  sharded` split between them and searched shard by shard) = 1 process x 4 devices: the same rewards and
  losses per step and the same greedy rewards at the end."""
  import subprocess
  from tests.test_main import ROOT, _env
  env = dict(_env(), LOG_DIR=str(tmp_path / "logs"))
  env.pop("XLA_FLAGS", None)
  two = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "2",
                        *_stage2_args(runs), f"--config.reward.gallery_search={search}",
                        f"--workdir={tmp_path / 'two'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
  want, got = _metrics(one_process), _metrics(tmp_path / "two")
  assert [s for s in want if "loss" in want[s]] == [s for s in got if "loss" in got[s]] == [1, 2, 3]
  for s in (1, 2, 3):
    for key in ("loss", "reward_mean", "reward_std", "attribute_keys"):
      assert got[s][key] == pytest.approx(want[s][key], abs=1e-5), (s, key)
  summaries = [json.load(open(path / "summary.json")) for path in (one_process, tmp_path / "two")]
  for key in ("greedy_reward_sft", "greedy_reward_rar"):
    assert summaries[1][key]["reward"] == pytest.approx(summaries[0][key]["reward"], abs=1e-6), key
