"""The sections of the run config that are not a library's own: one frozen dataclass per section.

Each field declares its default and allowed values once (`afmrl_jax.fields`); `config.schema` puts these
sections, and the libraries' own config dataclasses, together into the typed `Run`. This module imports
only libraries and leaves, never a trainer module, so every layer can read a section's type.
"""

from __future__ import annotations

import dataclasses

from afmrl_jax.data.catalog import CatalogConfig
from afmrl_jax.fields import Checked, bounded, check, choice, non_negative, positive
from afmrl_jax.losses.agcl import STRATEGIES
from afmrl_jax.losses.config import AGCLConfig
from afmrl_jax.models.lora import LoRAConfig
from afmrl_jax.retrieval import mining



@dataclasses.dataclass(frozen=True)
class CatalogOptions(CatalogConfig):
  """The synthetic catalog's fields, or an on-disk manifest that replaces it."""
  manifest: str = ""  # path to a JSONL or Parquet manifest; '' = the embedded synthetic catalog
  skip_bad_rows: bool = False  # with a manifest: skip (count and report) bad rows instead of stopping
  # A manifest whose rows give no `split`: the seed and the share of families held out for evaluation
  # (one listing per held-out product to `query`, the rest to `gallery`; data.manifest.assign_splits).
  split_seed: int = 0
  eval_share: float = bounded(0.2, 0.0, 1.0, high_open=True)
  cache_dir: str = ""  # where the generated catalog is kept between runs; '' = <workdir>/data_cache


@dataclasses.dataclass(frozen=True)
class LossOptions(AGCLConfig):
  """AGCL's fields and how the loss is sharded."""
  strategy: str = choice("all_gather", STRATEGIES)


@dataclasses.dataclass(frozen=True)
class LoRAOptions(LoRAConfig):
  """LoRA adapters; only they train when enabled."""
  enabled: bool = False


@dataclasses.dataclass(frozen=True)
class TrainOptions(Checked):
  """The run's length, logging and stopping rules."""
  num_steps: int = positive(400)
  # Stop this process after this many steps (checkpointing first), as if interrupted; 0 = off. The
  # schedule still uses num_steps, so a resumed run continues exactly where this one stopped.
  stop_after_steps: int = non_negative(0)
  log_every: int = positive(10)
  # With several processes a SIGTERM/SIGINT is acted on at the next step divisible by this (and at the
  # last step), where the processes agree (one small collective, which waits for the step to finish) that
  # one of them was signalled and all save and stop together. Raise it when that wait costs throughput.
  stop_check_every: int = positive(1)
  check_finite: bool = True  # stop the run on a NaN/Inf loss, naming the step and batch
  eval_at_end: bool = True  # the stage evaluates after the last step
  metrics_file: str = "metrics.jsonl"  # per-step metrics, relative to the workdir


@dataclasses.dataclass(frozen=True)
class CheckpointOptions(Checked):
  """When to save, how many to keep, where to resume from."""
  enabled: bool = True
  every: int = positive(100)  # steps between saves (the last step and every stop also save)
  keep: int = positive(3)
  async_save: bool = True
  resume: bool = True  # resume from the latest checkpoint in the workdir
  restore_dir: str = ""  # eval stage: the training workdir to load from; '' = this workdir
  # Start training from the trainable params of this workdir's latest checkpoint (fresh optimizer, step 0)
  # when the run's own workdir has no checkpoint yet; '' = from the model's init.
  init_from: str = ""
  # Resume even though the config's fingerprint differs from the one the workdir's checkpoints were
  # written under (`train.workdir`); the change is recorded in `<workdir>/config_changes.jsonl`.
  allow_config_change: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Checked):
  """optax AdamW with linear warmup + cosine decay and global-norm clipping."""
  learning_rate: float = positive(2e-3)
  warmup_steps: int = non_negative(30)
  min_lr_ratio: float = bounded(0.05, 0.0, 1.0)  # cosine decays to learning_rate * min_lr_ratio
  b1: float = bounded(0.9, 0.0, 1.0, high_open=True)
  b2: float = bounded(0.98, 0.0, 1.0, high_open=True)
  eps: float = positive(1e-8)
  weight_decay: float = non_negative(0.01)
  grad_clip: float = non_negative(1.0)  # global-norm clip; 0 disables


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """The representation model: an HF checkpoint, or a random init of `arch` (HF `config.json` fields)."""
  hf_checkpoint: str = ""  # local directory with config.json + *.safetensors; '' = random init from `arch`
  tokenizer: str = ""  # local HF tokenizer directory; '' = the embedded tokenizer trained on the catalog
  param_seed: int = 0
  arch: dict = dataclasses.field(default_factory=dict)  # Qwen2VLConfig fields, `vision_config` nested


@dataclasses.dataclass(frozen=True)
class GradCacheOptions(Checked):
  """GradCache for the encoder: the batch is embedded in chunks, activations of one chunk at a time."""
  enabled: bool = False
  chunk: int = positive(32)  # rows per encoder chunk per device


FILTER_CHOICES = ("none", "attribute", "score", "attribute+score")


@dataclasses.dataclass(frozen=True)
class MiningOptions(Checked):
  """Hard negatives mined with the current model and added to every query's candidates."""
  enabled: bool = False
  every: int = positive(100)  # steps between refreshes of the mined table (and one before the first step)
  num_mined: int = positive(8)  # M: neighbours of other products kept per training listing
  per_query: int = positive(1)  # h: mined negatives each query brings into the batch
  # False-negative filter at mining time: 'attribute' drops a neighbour whose attribute term set equals the
  # query's (likely the same item relisted); 'score' one more similar than the query's positives + margin.
  filter: str = choice("none", FILTER_CHOICES)
  margin: float = 0.1  # the 'score' rule's margin over the mean similarity to the query's own product
  backend: str = choice("auto", mining.BACKENDS)  # 'auto': exact below 20,000 listings, ScaNN above
  seed: int = non_negative(0)  # which h of the kept neighbours each query draws at each step


@dataclasses.dataclass(frozen=True)
class AttributeOptions(Checked):
  """Where the attribute strings come from, and whether they join the prompt text."""
  # 'teacher' (the catalog's teacher attributes) | 'true' (ground truth: an oracle for ablations) | 'none' |
  # path to a generated-attributes JSONL ({"listing_id": int, "attributes": str} per line)
  source: str = "teacher"
  enrich_queries: bool = False  # append the attributes to the query (and candidate) text
  skip_bad_rows: bool = False  # a generated file's unknown or repeated listing ids: skip and count them
  # A loss with BM25 terms stops when more than this share of training listings has no attribute string
  # (1.0: train anyway, with a warning saying how much of it is InfoNCE).
  max_missing_share: float = bounded(0.5, 0.0, 1.0)


RETRIEVERS = ("scann", "exact")


EXACT_BACKENDS = ("auto", "numpy", "jax")


GALLERY_SEARCHES = ("gathered", "sharded")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What the retrieval evaluation computes and writes."""
  retriever: str = choice("scann", RETRIEVERS)  # 'scann' (the index stage 2 uses) or 'exact' (inner product)
  exact_backend: str = choice("auto", EXACT_BACKENDS)  # exact search; 'auto' = jax on a GPU/TPU, else numpy
  # Multi-host: 'gathered' = every process holds the whole gallery and searches one index; 'sharded' = each
  # process indexes only the gallery rows it embedded and the top-k lists are merged across processes (a
  # gallery too large for one host). The same metrics with the exact retriever.
  gallery_search: str = choice("gathered", GALLERY_SEARCHES)
  recall_ks: tuple[int, ...] = (1, 5, 10)  # instance Recall@K and group Recall@K shown in the table
  curve_ks: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 50)  # Recall@K vs K plot (also returned as metrics)
  map_k: int = positive(10)  # mAP@K with category relevance
  knn_k: int = positive(10)  # neighbours voting in kNN category classification
  num_clusters: int = non_negative(0)  # k-means clusters over gallery embeddings; 0 = number of categories
  cluster_sample: int = non_negative(20000)  # k-means on at most this many gallery rows (seeded; 0 = all)
  seed: int = 0  # k-means and the choice of report queries
  exclude_self: bool = True  # a query's own listing in the gallery is neither a hit nor a rank
  scann_brute_force_below: int = non_negative(20000)  # gallery rows; below it ScaNN scores exhaustively
  scann_num_leaves: int = non_negative(0)  # 0 = about sqrt(gallery rows)
  scann_leaves_to_search: int = non_negative(0)  # 0 = a third of the leaves (at least 8)
  scann_reorder: int = non_negative(0)  # 0 = max(100, 4 * searched k)
  save_index: bool = True  # write the index under <output_dir>/index (reload: retrieval.load_retriever)
  report: bool = True  # markdown table, PNG plots and the HTML page (metrics.json is always written)
  output_dir: str = "eval"  # relative to the workdir
  num_report_queries: int = non_negative(12)
  report_top: int = positive(5)

  def __post_init__(self):
    extra = []
    for name in ("recall_ks", "curve_ks"):
      ks = tuple(int(k) for k in getattr(self, name))
      object.__setattr__(self, name, ks)
      if not ks or min(ks) < 1:
        extra.append((name, "must be a non-empty list of positive ints"))
    check(self, extra)


@dataclasses.dataclass(frozen=True)
class AttributeEvalOptions(Checked):
  """Which listings the generator is scored on, and how it decodes."""
  split: str = "heldout"  # catalog split of the scored listings (never trained on)
  num_rows: int = non_negative(256)  # at most this many listings of the split (0 = all)
  max_new_tokens: int = positive(48)  # decode budget; a string without EOS by then is cut (and counted)
  num_examples: int = non_negative(8)  # generations shown in examples.html
  output_dir: str = "attribute_eval"  # relative to the workdir


CHAIN = ("sft", "generate_sft", "stage1", "stage2", "generate_rar", "stage1_cit")


CONFIG_OF = {"sft": "sft", "generate_sft": "generate", "stage1": "stage1", "stage2": "stage2",
             "generate_rar": "generate", "stage1_cit": "stage1"}  # chain step -> key of `cit.stages`


@dataclasses.dataclass(frozen=True)
class CITOptions(Checked):
  """The second stage-1 round's data share, and every stage's config."""
  train_fraction: float = bounded(0.3, 0.01, 1.0)  # stage1_cit trains on this share of the training products
  # 'sft' | 'generate' | 'stage1' | 'stage2' -> that stage's whole config (filled by configs/cit.py)
  stages: dict = dataclasses.field(default_factory=dict)
