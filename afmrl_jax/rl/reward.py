"""The retrieval reward of RAR: does a query listing, with a sampled attribute string appended to its
text, retrieve its own product from the frozen gallery?

For every sampled string the environment (the frozen stage-1 model) embeds `title + attributes` of the
query listing; the gallery index returns the top `k` listings (the query's own listing excluded); the
reward scores the ranks of the query's same-product listings:

  recall           |same-product listings in the top k| / |same-product listings|   (the paper's R@K)
  reciprocal_rank  1 / rank of the first same-product listing (0 if none in the top k)
  ndcg             binary-relevance DCG@k / ideal DCG@k

A string that does not parse as `key: value` pairs, or was cut at the decode budget without EOS, gets
`malformed_reward` (-0.1) whatever it retrieves. With 3-4 listings per product in a gallery of a few
thousand, Recall@50 is 1 for almost every sample and a group's rewards are all equal (no advantage, no
learning signal): `equal_group_share` reports how often (`launch/reward_signal.py` measures it for every
kind and k), and the defaults (nDCG over the top 20, which also credits every sibling listing found, not
only the first) are chosen where that share is small.

Host-side NumPy: the ranks come back from the index (ScaNN or exact) as arrays on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from afmrl_jax.attributes.parse import parse_attributes
from afmrl_jax.fields import Checked, choice, positive
from afmrl_jax.retrieval import metrics as retrieval_metrics

REWARD_KINDS = ("ndcg", "recall", "reciprocal_rank")
RETRIEVERS = ("scann", "exact")
GALLERY_SEARCHES = ("gathered", "sharded")


@dataclasses.dataclass(frozen=True)
class RewardOptions(Checked):
  """How a sampled string is scored."""
  kind: str = choice("ndcg", REWARD_KINDS)
  k: int = positive(20)  # ranks searched and scored (the paper: recall at k = 50)
  malformed_reward: float = -0.1  # a string that does not parse, or has no EOS
  # Also malformed: a key the training teacher strings never use, or a value holding ':' / '=' (a run
  # of keys). Without it a policy can learn well-formed nonsense that the frozen model likes.
  strict_format: bool = True
  retriever: str = choice("scann", RETRIEVERS)  # gallery index: ScaNN (saved in the workdir) or exact
  # Several processes: 'gathered' = every process indexes the whole gallery; 'sharded' = each indexes the
  # rows it embedded and every process's queries are searched in every shard (a gallery too large for one
  # host; rebuilt on resume instead of saved). The same rewards with the exact retriever.
  gallery_search: str = choice("gathered", GALLERY_SEARCHES)


def recall_scores(hits: np.ndarray, num_positives: np.ndarray, k: int) -> np.ndarray:
  """hits bool [Q, >=k], num_positives int [Q] -> float32 [Q]: share of positives in the top k (0 when a
  query has none)."""
  found = np.asarray(hits, bool)[:, :k].sum(axis=1)
  num_positives = np.asarray(num_positives)
  return np.where(num_positives > 0, found / np.maximum(num_positives, 1), 0.0).astype(np.float32)


def reciprocal_rank_scores(hits: np.ndarray, k: int) -> np.ndarray:
  """hits bool [Q, >=k] -> float32 [Q]: 1 / (1 + first hit's 0-based rank), 0 without a hit in the top k."""
  hits = np.asarray(hits, bool)[:, :k]
  first = np.argmax(hits, axis=1)
  return np.where(hits.any(axis=1), 1.0 / (1.0 + first), 0.0).astype(np.float32)


def ndcg_scores(hits: np.ndarray, num_positives: np.ndarray, k: int) -> np.ndarray:
  """hits bool [Q, >=k], num_positives int [Q] -> float32 [Q]: DCG@k / IDCG@k with binary relevance
  (IDCG puts min(num_positives, k) hits first; 0 when a query has no positive)."""
  hits = np.asarray(hits, bool)[:, :k]
  discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]
  dcg = (hits * discount).sum(axis=1)
  ideal = np.cumsum(discount)[np.clip(np.asarray(num_positives), 1, k) - 1]
  return np.where(np.asarray(num_positives) > 0, dcg / ideal, 0.0).astype(np.float32)


def rank_scores(hits: np.ndarray, num_positives: np.ndarray, kind: str, k: int) -> np.ndarray:
  """The reward `kind` (REWARD_KINDS) of ranked hits [Q, >=k]: float32 [Q]."""
  if kind == "recall":
    return recall_scores(hits, num_positives, k)
  if kind == "reciprocal_rank":
    return reciprocal_rank_scores(hits, k)
  if kind == "ndcg":
    return ndcg_scores(hits, num_positives, k)
  raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}.")


def _bad_format(text: str, known_keys) -> bool:
  parsed = parse_attributes(text)
  if parsed.malformed:
    return True
  if known_keys is None:
    return False
  return any(k not in known_keys or ":" in v or "=" in v for k, v in parsed.pairs)


def malformed_flags(texts: Sequence[str], ended: Sequence[bool] | None = None,
                    known_keys: frozenset[str] | None = None) -> np.ndarray:
  """bool [n]: the string does not parse as `key: value` pairs, (with `ended`) had no EOS, or (with
  `known_keys`) names a key outside `known_keys` or has a value holding ':' or '='."""
  bad = np.array([_bad_format(t, known_keys) for t in texts], bool)
  if ended is not None:
    bad |= ~np.asarray(ended, bool)
  return bad


def equal_group_share(rewards: np.ndarray) -> float:
  """rewards [Q, G] -> share of groups whose G rewards are all equal (they carry no advantage)."""
  rewards = np.asarray(rewards)
  return float(np.mean(np.all(rewards == rewards[:, :1], axis=1)))


class RetrievalReward:
  """Scores query embeddings against a gallery index by the ranks of the query's own product.

  Args:
    retriever: a built `retrieval.Retriever` over the gallery embeddings, ids = gallery row numbers.
    gallery_listing_ids, gallery_product_ids: int [N], per gallery row.
    options: RewardOptions.
  """

  def __init__(self, retriever, gallery_listing_ids: np.ndarray, gallery_product_ids: np.ndarray,
               options: RewardOptions = RewardOptions()):
    self.retriever = retriever
    self.listing_ids = np.asarray(gallery_listing_ids, np.int64)
    self.product_ids = np.asarray(gallery_product_ids, np.int64)
    self.options = options
    self._positives: dict[tuple[int, int], int] = {}
    if options.k >= len(self.listing_ids):
      raise ValueError(f"config.reward.k={options.k} must be smaller than the gallery ({len(self.listing_ids)} "
                       "listings).")

  def ranked_hits(self, embeddings: np.ndarray, listing_ids: np.ndarray, product_ids: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(hits bool [n, k] of the top k without the query's own listing, num_positives int [n])."""
    k = self.options.k
    rows, _ = self.retriever.search(embeddings, k + 1)  # -1 = no result (ScaNN's padding): a miss
    rows = retrieval_metrics.exclude_self(retrieval_metrics.labels_at(self.listing_ids, rows),
                                          np.asarray(listing_ids), k, rows)[1]
    hits = retrieval_metrics.relevance(retrieval_metrics.labels_at(self.product_ids, rows),
                                       np.asarray(product_ids, np.int64))
    return hits, self.num_positives(listing_ids, product_ids)

  def num_positives(self, listing_ids: np.ndarray, product_ids: np.ndarray) -> np.ndarray:
    """int64 [n]: gallery listings of each query's product, its own listing excluded (memoised per
    listing: a query comes back G times per step and once per epoch)."""
    pairs = list(zip(np.asarray(listing_ids).tolist(), np.asarray(product_ids).tolist()))
    new = sorted(set(pairs) - self._positives.keys())
    if new:
      lids, pids = np.asarray(new, np.int64).T
      counts = retrieval_metrics.count_positives(pids, self.product_ids, lids, self.listing_ids)
      self._positives.update(zip(new, counts.tolist()))
    return np.asarray([self._positives[p] for p in pairs], np.int64)

  def __call__(self, embeddings: np.ndarray, listing_ids: np.ndarray, product_ids: np.ndarray,
               malformed: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """embeddings [n, D] of enriched queries, their listing and product ids [n], malformed bool [n]
    -> (rewards float32 [n], {'recall@k', 'hit@1', 'malformed_rate'} means over the n samples)."""
    o = self.options
    hits, positives = self.ranked_hits(embeddings, listing_ids, product_ids)
    malformed = np.asarray(malformed, bool)
    rewards = np.where(malformed, np.float32(o.malformed_reward), rank_scores(hits, positives, o.kind, o.k))
    info = {f"recall@{o.k}": float(recall_scores(hits, positives, o.k).mean()),
            "hit@1": float(hits[:, 0].mean()), "malformed_rate": float(malformed.mean())}
    return rewards.astype(np.float32), info
