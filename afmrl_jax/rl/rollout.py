"""RAR's rollout: G sampled attribute strings per query listing, their retrieval rewards, group advantages.

`Rollout(state, host_batch)` is the `rollout` hook of `train.loop.run`: it turns a batch of Q query
prompts (`data.generator_data.sft_dataset`) into the GRPO batch of Q x G rows, sampled with the current
policy parameters:

  prompt_ids, prompt_mask [Q*G, Tp]; pixel_values [Q*G, P, Dp]   (each prompt repeated G times)
  completion [Q*G, N] int32, completion_length [Q*G]              (sampled, EOS included)
  ref_logp [Q*G, N]                                               (the frozen SFT reference; if beta > 0)
  old_logp [Q*G, N]                                               (only with several updates per step)
  advantages [Q*G] float32, listing_id [Q*G]

Overlap: the rows are sampled in `rollout_chunks` chunks, all dispatched before any is read back, so
the host decodes and scores chunk i (tokenize, embed, search) while the device samples chunk i + 1.
Sampling keys are `fold_in(key(seed), step)` per step (then per chunk): a resumed run samples what an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from afmrl_jax import parallel
from afmrl_jax.attributes.parse import parse_attributes
from afmrl_jax.data.generator_data import SPLITS
from afmrl_jax.fields import Checked, bounded, choice, non_negative, positive
from afmrl_jax.generate import sampling as sampling_lib
from afmrl_jax.generate.logprobs import completion_logprobs
from afmrl_jax.rl import algo
from afmrl_jax.rl.reward import equal_group_share



@dataclasses.dataclass(frozen=True)
class RAROptions(Checked):
  """The policy, the environment and how each step samples."""
  policy: str = ""  # SFT workdir: the policy's starting weights, its prompt format, and the KL reference
  environment: str = ""  # stage-1 workdir: the frozen representation model (and its attribute source)
  group_size: int = positive(8)  # G, strings sampled per query
  queries_per_step: int = positive(8)  # Q, query listings per step (the batch is Q x G strings)
  temperature: float = bounded(1.0, 0.0, 10.0)
  top_p: float = bounded(1.0, 0.0, 1.0)
  max_new_tokens: int = positive(48)
  updates_per_step: int = positive(1)  # clipped updates on each rollout (1: the ratio is 1 at the update)
  rollout_chunks: int = positive(2)  # the host scores chunk i while the device samples chunk i + 1
  query_split: str = choice("train", SPLITS)  # the query listings of the rollouts
  gallery_split: str = choice("train", SPLITS)  # the reward's gallery (never an evaluation split)
  seed: int = non_negative(0)  # sampling keys: fold_in(key(seed), step)
  # At the end: the greedy reward of the SFT policy and of the tuned one on this many query listings (0 = off)
  eval_queries: int = non_negative(256)


class Rollout:
  """Callable `(state, host_batch) -> (grpo batch, host metrics)`; see the module docstring."""

  def __init__(self, model, ref_params, environment, tokenizer, image_grid_thw, options: RAROptions,
               grpo: algo.GRPOConfig, model_config, mesh):
    if (options.queries_per_step * options.group_size) % options.rollout_chunks:
      raise ValueError(f"config.rar.rollout_chunks={options.rollout_chunks} must divide the "
                       f"{options.queries_per_step * options.group_size} sampled rows per step.")
    self.graphdef, self.rest, self.ref_params = model.graphdef, model.rest, ref_params
    self.env, self.tokenizer, self.grid = environment, tokenizer, tuple(image_grid_thw)
    self.options, self.grpo, self.mesh = options, grpo, mesh
    self.sampling = sampling_lib.sampling_for(model_config, temperature=options.temperature, top_p=options.top_p,
                                              max_new_tokens=options.max_new_tokens)
    self.eos = self.sampling.eos_ids
    temperature = self.sampling.logprob_temperature
    graphdef, rest, grid = self.graphdef, self.rest, self.grid

    @jax.jit
    def logprobs(params, batch, completion, lengths):
      model = nnx.merge(graphdef, params, rest)
      return completion_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], completion, lengths,
                                 batch["pixel_values"], grid, temperature=temperature)

    self._logprobs = logprobs

  def _groups(self, host_batch: dict[str, Any]) -> dict[str, np.ndarray]:
    g = self.options.group_size
    return {k: np.repeat(np.asarray(host_batch[k]), g, axis=0)
            for k in ("prompt_ids", "prompt_mask", "pixel_values", "listing_id")}

  def __call__(self, state: dict[str, Any], host_batch: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    o = self.options
    step = int(jax.device_get(state["step"]))
    rng = jax.random.fold_in(jax.random.key(o.seed), step)
    rows = self._groups(host_batch)
    n = len(rows["listing_id"])
    size = n // o.rollout_chunks
    chunks = [{k: v[c * size:(c + 1) * size] for k, v in rows.items()} for c in range(o.rollout_chunks)]
    t0 = time.perf_counter()

    # Rollout: every chunk's sampling (and reference logprobs) dispatched before any is read back.
    model = nnx.merge(self.graphdef, state["params"], self.rest)
    pending = []
    with jax.set_mesh(self.mesh), parallel.logical_rules():
      for c, chunk in enumerate(chunks):
        arrays = parallel.global_batch({k: chunk[k] for k in ("prompt_ids", "prompt_mask", "pixel_values")},
                                       self.mesh)
        gen = sampling_lib.generate(model, arrays["prompt_ids"], arrays["prompt_mask"], arrays["pixel_values"],
                                    self.grid, rng=jax.random.fold_in(rng, c), config=self.sampling)
        extra = {}
        if self.grpo.kl_beta > 0:
          extra["ref_logp"] = self._logprobs(self.ref_params, arrays, gen.tokens, gen.lengths)
        if o.updates_per_step > 1:
          extra["old_logp"] = self._logprobs(state["params"], arrays, gen.tokens, gen.lengths)
        pending.append((gen, extra))

    # Reward: decode and score chunk c on the host while the device still samples the later chunks.
    rewards, texts, infos, reward_s, out = [], [], [], 0.0, {k: [] for k in ("completion", "completion_length")}
    extras: dict[str, list] = {}
    wait_s = 0.0
    for chunk, (gen, extra) in zip(chunks, pending):
      t1 = time.perf_counter()
      tokens, lengths = parallel.local_rows(gen.tokens, self.mesh), parallel.local_rows(gen.lengths, self.mesh)
      wait_s += time.perf_counter() - t1
      t1 = time.perf_counter()
      decoded = [sampling_lib.decode_text(self.tokenizer, t, int(m), self.eos) for t, m in zip(tokens, lengths)]
      chunk_texts = [d[0] for d in decoded]
      r, info = self.env.score(chunk["listing_id"], chunk_texts, [d[1] for d in decoded])
      reward_s += time.perf_counter() - t1
      rewards.append(r)
      texts += chunk_texts
      infos.append(info)
      out["completion"].append(tokens)
      out["completion_length"].append(lengths)
      for k, v in extra.items():
        extras.setdefault(k, []).append(parallel.local_rows(v, self.mesh))
    rollout_s = time.perf_counter() - t0

    # Advantages: rewards normalised within each query's group of G.
    reward = np.concatenate(rewards).reshape(-1, o.group_size)
    advantages = np.asarray(algo.ADVANTAGES[self.grpo.advantage](reward, self.grpo.advantage_eps))
    batch = {**rows, **{k: np.concatenate(v) for k, v in out.items()},
             **{k: np.concatenate(v) for k, v in extras.items()},
             "advantages": advantages.reshape(-1).astype(np.float32)}
    lengths = batch["completion_length"]
    # Metrics of every process's groups (each process holds Q / processes queries); times are this process's.
    every_reward = parallel.gather_processes(reward)
    metrics = {
        "reward_mean": float(every_reward.mean()), "reward_std": float(every_reward.std()),
        "reward_equal_groups": equal_group_share(every_reward),
        **process_mean({
            **{k: float(np.mean([i[k] for i in infos])) for k in infos[0] if not k.endswith("_s")},
            "attribute_keys": float(np.mean([len(parse_attributes(t).pairs) for t in texts])),
            "completion_tokens": float(lengths.mean())}),
        **{k: float(np.sum([i[k] for i in infos])) for k in infos[0] if k.endswith("_s")},
        "rollout_tokens_per_s": float(lengths.sum() / max(rollout_s, 1e-9)),
        "rollout_s": rollout_s, "reward_s": reward_s, "sample_wait_s": wait_s,
    }
    return batch, metrics


def process_mean(values: dict[str, float]) -> dict[str, float]:
  """Each value's mean over the processes (every process scores the same number of rows)."""
  if jax.process_count() == 1:
    return values
  keys = sorted(values)
  every = parallel.gather_processes(np.asarray([[values[k] for k in keys]], np.float32))  # [P, K]
  return {k: float(v) for k, v in zip(keys, every.mean(axis=0))}
