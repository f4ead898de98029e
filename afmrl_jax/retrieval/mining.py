"""Hard-negative mining: each query's nearest candidates of *other* products, and false-negative filters.

Pure NumPy on top of the `Retriever` protocol (no model code, no jax): embed the queries and the
candidates however you like, then

    mined = mine(query_emb, cand_emb, query_product, cand_product, num_mined=16, step=step)
    inputs = FilterInputs(query_terms=q_terms, cand_terms=c_terms, positive_scores=pos)
    kept, counts = apply_filter(mined, inputs, FilterConfig(rules=("attribute",)))

Shapes: `Q` queries, `N` candidates, `D` embedding width, `M` mined neighbours per query, `K` attribute
term ids per row (int, 0 = padding, as `attributes.bm25.CorpusStats.encode_batch` writes them).

Mining (`mine`, `mine_sharded`). Scores are cosine similarities (the retrievers normalise rows). A query
never mines a candidate of its own product (`query_product[q] == cand_product[n]`): those are its
positives. Each query's row of the table holds its M best other-product candidates, best first; rows
with fewer than M such candidates end in -1 (score -inf).

Ties and reproducibility. The order is by score (descending), then by the smaller candidate index
(global id in `mine_sharded`): a query's row is the first M other-product candidates of the sequence
sorted by (-score, index). With the exact backend the score is `exact.exact_scores` (the float64 sum in
index order of the exact products of the float32 unit rows, rounded to float32): bitwise the same for
equal vectors wherever they sit and whatever the BLAS kernel, so ties are real ties, and the table is the
same on every machine. With the exact backend this is exactly what the result is: the search
over-fetches `M + over_fetch` candidates, and a query whose row is not yet certain (fewer than M
other-product candidates found, or its M-th one tied with the last fetched score, so that tied
candidates past the cut could precede it) is searched again with a larger k (its own-product count
plus M, then doubling) until it is certain or k reaches N. Same inputs, same table: no randomness.
With ScaNN the same procedure runs on ScaNN's approximate lists (deterministic for a given index).

Filters (`FILTERS`, `rule_keep`, `apply_filter`). A mined neighbour of a query may be a relisted
duplicate of the query's item (another product id for the same thing): a false negative. Each rule is a
small pure function returning a keep mask bool [Q, M] (False = drop; padding is never kept):
  'none'       keeps everything;
  'attribute'  drops a neighbour whose set of attribute term ids equals the query's (order and repeats
               ignored; two empty sets are *not* equal: no attributes is no evidence);
  'score'      drops a neighbour whose score exceeds the query's positive score by more than `margin`
               (score > positive_score + margin; a NaN or infinite positive drops nothing).
`apply_filter` keeps the neighbours every chosen rule keeps, moves them to the front in their mined
order and counts what each rule drops. `filter_quality` scores each rule against the truth
(`true_duplicates`: same true item, different product id): precision = true duplicates among the
dropped, recall = dropped among the true duplicates.

Checkpointing. `MinedTable` is three plain arrays (`to_pytree()` is a dict of NumPy arrays that any
checkpointer, Orbax included, saves as it is); `save` / `load` write and read one `.npz` file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from afmrl_jax.retrieval.base import unit_rows

# Galleries with at least this many candidates are mined with ScaNN when the backend is 'auto'.
SCANN_FROM = 20000
BACKENDS = ("auto", "exact", "scann")


# ---------------------------------------------------------------------------------------------------
# The mined table


@dataclasses.dataclass
class MinedTable:
  """Mined negatives of Q queries.

  table: int32 [Q, M] candidate indices (global ids in `mine_sharded`), best first, -1 = none.
  scores: float32 [Q, M] their cosine similarity to the query, -inf where table is -1.
  mined_at_step: int64 [] the training step whose embeddings were mined (-1 = unknown).
  """
  table: np.ndarray
  scores: np.ndarray
  mined_at_step: np.ndarray = dataclasses.field(default_factory=lambda: np.asarray(-1, np.int64))

  def __post_init__(self):
    self.table = np.asarray(self.table, np.int32)
    self.scores = np.asarray(self.scores, np.float32)
    self.mined_at_step = np.asarray(self.mined_at_step, np.int64)
    if self.table.ndim != 2 or self.scores.shape != self.table.shape or self.mined_at_step.shape != ():
      raise ValueError(f"MinedTable: table and scores must both be [Q, M] and mined_at_step a scalar, got "
                       f"{self.table.shape}, {self.scores.shape}, {self.mined_at_step.shape}.")

  @property
  def valid(self) -> np.ndarray:
    """bool [Q, M]: entries that hold a candidate."""
    return self.table >= 0

  def to_pytree(self) -> dict[str, np.ndarray]:
    """{'table', 'scores', 'mined_at_step'}: plain arrays, ready for any checkpointer."""
    return {"table": self.table, "scores": self.scores, "mined_at_step": self.mined_at_step}

  @classmethod
  def from_pytree(cls, tree: dict[str, Any]) -> "MinedTable":
    return cls(np.asarray(tree["table"]), np.asarray(tree["scores"]), np.asarray(tree["mined_at_step"]))

  def save(self, path: str) -> None:
    """One `.npz` file (written to a temporary name, then renamed: never half-written)."""
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **self.to_pytree())
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "MinedTable":
    with np.load(path) as z:
      return cls.from_pytree({k: z[k] for k in ("table", "scores", "mined_at_step")})


# ---------------------------------------------------------------------------------------------------
# Mining


def _order(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Column order [Q, k] sorting each row by (-score, id); -1 ids (and -inf scores) last."""
  key_scores = np.where(ids < 0, np.inf, -scores.astype(np.float64))
  key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
  return np.lexsort((key_ids, key_scores), axis=1)


def _take(a: np.ndarray, order: np.ndarray) -> np.ndarray:
  return np.take_along_axis(a, order, axis=1)


def _select(ids: np.ndarray, scores: np.ndarray, foreign: np.ndarray, m: int) -> tuple[np.ndarray, ...]:
  """The first m other-product results of each row, in (-score, id) order.

  ids int64 [Q, k] (-1 = no result), scores [Q, k], foreign bool [Q, k] (True = another product) ->
  (ids [Q, m] with -1 padding, scores float32 [Q, m] with -inf padding, count [Q] of other-product
  results found among the k).
  """
  order = _order(ids, scores)
  ids, scores = _take(ids, order), _take(scores, order)
  foreign = _take(foreign, order) & (ids >= 0)
  pick = np.argsort(~foreign, axis=1, kind="stable")[:, :m]  # other-product columns first, order kept
  got = foreign.sum(axis=1)
  out_ids = np.where(np.arange(pick.shape[1]) < got[:, None], _take(ids, pick), -1)
  out_scores = np.where(out_ids >= 0, _take(scores, pick), -np.inf).astype(np.float32)
  if out_ids.shape[1] < m:  # fewer results than m columns
    pad = m - out_ids.shape[1]
    out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
    out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
  return out_ids, out_scores, got


def _mine_local(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], size: int,
                product_of: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
                query_product: np.ndarray, own_count: np.ndarray, m: int,
                over_fetch: int) -> tuple[np.ndarray, np.ndarray]:
  """The top-m other-product candidates of each query among the `size` rows `search` sees.

  search(queries [q, D], k) -> (ids int64 [q, k], scores [q, k]) best first (a NaN score marks padding,
  as ScaNN writes it); product_of(ids) -> the products of those ids; own_count [Q]: rows of each
  query's product among them (an upper bound will do). Returns ids int64 [Q, m] (-1 = none) and
  scores float32 [Q, m] (-inf = none).
  """
  nq = len(queries)
  out_ids = np.full((nq, m), -1, np.int64)
  out_scores = np.full((nq, m), -np.inf, np.float32)
  if size == 0 or nq == 0 or m == 0:
    return out_ids, out_scores
  todo = np.arange(nq)
  k = min(size, m + over_fetch)
  while True:
    ids, scores = search(queries[todo], k)
    scores = np.asarray(scores, np.float32)
    # No result: -1 / -inf (ScannRetriever's padding when the searched leaves hold fewer than k rows;
    # a raw ScaNN searcher writes row 0 with score NaN).
    ids = np.where(np.isfinite(scores), np.asarray(ids, np.int64), -1)
    foreign = product_of(ids) != query_product[todo][:, None]
    got_ids, got_scores, got = _select(ids, scores, foreign, m)
    out_ids[todo], out_scores[todo] = got_ids, got_scores
    if k >= size:
      break
    # Certain: m other-product results, the m-th strictly above the last fetched score (everything
    # scoring more than the cut was fetched, so no unseen candidate can precede it); or the backend
    # returned fewer than k results (padding): it has nothing more to give.
    last = np.min(np.where(ids >= 0, scores, np.inf), axis=1)
    certain = ((got >= m) & (got_scores[:, -1] > last)) | (ids < 0).any(axis=1)
    todo = todo[~certain]
    if not len(todo):
      break
    # Again with room for every row of the open queries' own products (enough for the exact backend
    # unless ties straddle the cut), and at least twice as many as before.
    k = min(size, max(2 * k, int(own_count[todo].max()) + m))
  return out_ids, out_scores


def _products(cand_product: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  """ids -> products for row-number ids into cand_product (-1 -> an impossible product)."""
  def product_of(ids: np.ndarray) -> np.ndarray:
    return np.where(ids >= 0, cand_product[np.maximum(ids, 0)], np.iinfo(np.int64).min)
  return product_of


def own_product_counts(query_product: np.ndarray, cand_product: np.ndarray) -> np.ndarray:
  """int64 [Q]: how many of the candidates `cand_product [N]` belong to each query's product."""
  values, counts = np.unique(np.asarray(cand_product, np.int64), return_counts=True)
  query_product = np.asarray(query_product, np.int64)
  if not len(values):
    return np.zeros(len(query_product), np.int64)
  at = np.clip(np.searchsorted(values, query_product), 0, len(values) - 1)
  return np.where(values[at] == query_product, counts[at], 0).astype(np.int64)


def choose_backend(backend: str, size: int, scann_from: int = SCANN_FROM) -> str:
  """'exact' or 'scann' for a gallery of `size` rows: 'auto' picks ScaNN from `scann_from` rows on."""
  if backend not in BACKENDS:
    raise ValueError(f"mining backend must be one of {BACKENDS}, got {backend!r}.")
  if backend == "auto":
    return "scann" if size >= scann_from else "exact"
  return backend


def _check(query_emb, cand_emb, query_product, cand_product, num_mined):
  query_emb, cand_emb = unit_rows(query_emb), unit_rows(cand_emb)
  query_product = np.asarray(query_product, np.int64)
  cand_product = np.asarray(cand_product, np.int64)
  if query_emb.shape[1] != cand_emb.shape[1]:
    raise ValueError(f"mine: query width {query_emb.shape[1]} != candidate width {cand_emb.shape[1]}.")
  if query_product.shape != query_emb.shape[:1] or cand_product.shape != cand_emb.shape[:1]:
    raise ValueError(f"mine: query_product must be [Q={len(query_emb)}] and cand_product [N={len(cand_emb)}], "
                     f"got {query_product.shape} and {cand_product.shape}.")
  if num_mined < 0:
    raise ValueError(f"mine: num_mined must be >= 0, got {num_mined}.")
  return query_emb, cand_emb, query_product, cand_product


def mine(query_emb: np.ndarray, cand_emb: np.ndarray, query_product: np.ndarray, cand_product: np.ndarray,
         num_mined: int, *, backend: str = "auto", scann_from: int = SCANN_FROM,
         retriever_options: dict[str, Any] | None = None, over_fetch: int = 8,
         step: int = -1) -> MinedTable:
  """Each query's `num_mined` nearest candidates of another product.

  Args:
    query_emb: [Q, D]; cand_emb: [N, D] (normalised here: scores are cosine similarities).
    query_product: int [Q]; cand_product: int [N]: a query never mines a candidate of its own product.
    num_mined: M, columns of the table.
    backend: 'exact', 'scann', or 'auto' (ScaNN from `scann_from` candidates on), built through
      `retrieval.make_retriever(kind, **retriever_options)`.
    over_fetch: extra results fetched in the first search, for own-product rows that crowd the top.
    step: recorded as `mined_at_step`.
  Returns:
    MinedTable: table int32 [Q, M] of candidate row numbers (-1 where fewer than M exist), scores
    float32 [Q, M]; order and ties as the module docstring says (exact for the exact backend).
  """
  from afmrl_jax.retrieval import make_retriever

  query_emb, cand_emb, query_product, cand_product = _check(query_emb, cand_emb, query_product,
                                                            cand_product, num_mined)
  n = len(cand_emb)
  if n >= np.iinfo(np.int32).max:
    raise ValueError(f"mine: {n} candidates do not fit the int32 table.")
  search = None
  if n and len(query_emb) and num_mined:
    kind = choose_backend(backend, n, scann_from)
    search = make_retriever(kind, **(retriever_options or {})).build(cand_emb, np.arange(n)).search
  ids, scores = _mine_local(search, n, _products(cand_product), query_emb, query_product,
                            own_product_counts(query_product, cand_product), num_mined, over_fetch)
  return MinedTable(ids.astype(np.int32), scores, np.asarray(step, np.int64))


def merge_mined(ids: np.ndarray, scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
  """The best m of several shards' mined lists, ids int [S, Q, m_s] and scores [S, Q, m_s] -> [Q, m].

  Sorted by (-score, global id), as `sharded.merge_topk`, so that the result does not depend on which
  process holds which row (the exact backend's scores do not depend on it either).
  """
  s, q, ms = ids.shape
  flat_ids = np.transpose(np.asarray(ids, np.int64), (1, 0, 2)).reshape(q, s * ms)
  flat_scores = np.transpose(np.asarray(scores, np.float32), (1, 0, 2)).reshape(q, s * ms)
  order = _order(flat_ids, flat_scores)[:, :m]
  out_ids = _take(flat_ids, order)
  out_scores = np.where(out_ids >= 0, _take(flat_scores, order), -np.inf).astype(np.float32)
  if out_ids.shape[1] < m:
    pad = m - out_ids.shape[1]
    out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
    out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
  return out_ids, out_scores


def mine_sharded(query_emb: np.ndarray, local_cand_emb: np.ndarray, query_product: np.ndarray,
                 local_cand_product: np.ndarray, local_cand_ids: np.ndarray, num_mined: int, *,
                 backend: str = "auto", scann_from: int = SCANN_FROM,
                 retriever_options: dict[str, Any] | None = None, over_fetch: int = 8, step: int = -1,
                 gather: Callable[[np.ndarray], np.ndarray] | None = None) -> MinedTable:
  """`mine` over a gallery split across processes (a `sharded.ShardedIndex` on each).

  Every process passes the same queries [Q, D] and query_product [Q], and its own shard of the
  candidates: local_cand_emb [N_p, D], local_cand_product [N_p] and their *global* ids int [N_p]
  (unique across processes, < 2^31). Each shard mines its own top-M other-product candidates (exact
  per shard, as in `mine`), then the [P, Q, M] lists are all-gathered (`gather`, default
  `sharded.process_allgather`; tests inject their own) and merged by `merge_mined`: with the exact
  backend the table equals `mine` over the whole gallery, global ids in place of row numbers. The
  backend is chosen from the total gallery size, so every process picks the same one.
  """
  from afmrl_jax.retrieval import make_retriever
  from afmrl_jax.retrieval.sharded import ShardedIndex, process_allgather

  query_emb, local_cand_emb, query_product, local_cand_product = _check(
      query_emb, local_cand_emb, query_product, local_cand_product, num_mined)
  local_ids = np.asarray(local_cand_ids, np.int64)
  if local_ids.shape != local_cand_product.shape:
    raise ValueError(f"mine_sharded: local_cand_ids must be [N_p={len(local_cand_product)}], got {local_ids.shape}.")
  if len(local_ids) and (local_ids.min() < 0 or local_ids.max() >= np.iinfo(np.int32).max):
    raise ValueError("mine_sharded: global ids must be in [0, 2^31 - 1).")
  gather = gather or process_allgather
  total = int(np.asarray(gather(np.asarray([len(local_ids)], np.int32))).sum())
  index = ShardedIndex(make_retriever(choose_backend(backend, total, scann_from), **(retriever_options or {})),
                       gather).build(local_cand_emb, local_ids)
  # Global id -> product of this shard's rows (sorted lookup).
  by_id = np.argsort(local_ids, kind="stable")
  sorted_ids, sorted_products = local_ids[by_id], local_cand_product[by_id]

  def product_of(ids: np.ndarray) -> np.ndarray:
    at = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    return np.where(ids >= 0, sorted_products[at], np.iinfo(np.int64).min)

  ids, scores = _mine_local(index.retriever.search if index.size else None, index.size, product_of,
                            query_emb, query_product, own_product_counts(query_product, local_cand_product),
                            num_mined, over_fetch)
  all_ids = np.asarray(gather(ids.astype(np.int32)))  # [P, Q, M]: int32 travels through jax as it is
  all_scores = np.asarray(gather(scores))
  ids, scores = merge_mined(all_ids, all_scores, num_mined)
  return MinedTable(ids.astype(np.int32), scores, np.asarray(step, np.int64))


def positive_scores(query_emb: np.ndarray, cand_emb: np.ndarray, query_product: np.ndarray,
                    cand_product: np.ndarray, reduce: str = "mean",
                    query_rows: np.ndarray | None = None) -> np.ndarray:
  """float32 [Q]: each query's cosine similarity to its own product's candidates ('mean' or 'max' over
  them; NaN for a query without any), the reference of the 'score' filter when no training pair gives one.

  query_rows: int [Q], the candidate row that *is* each query (-1 = none), left out of its positives
  when the queries are themselves candidates. Direct dot products with the own-product rows only:
  O(sum of own-product counts * D).
  """
  if reduce not in ("mean", "max"):
    raise ValueError(f"positive_scores: reduce must be 'mean' or 'max', got {reduce!r}.")
  query_emb, cand_emb, query_product, cand_product = _check(query_emb, cand_emb, query_product, cand_product, 0)
  query_rows = np.full(len(query_emb), -1) if query_rows is None else np.asarray(query_rows, np.int64)
  order = np.argsort(cand_product, kind="stable")
  sorted_products = cand_product[order]
  lo = np.searchsorted(sorted_products, query_product, "left")
  hi = np.searchsorted(sorted_products, query_product, "right")
  out = np.full(len(query_emb), np.nan, np.float32)
  for q in np.flatnonzero(hi > lo):
    rows = order[lo[q]:hi[q]]
    rows = rows[rows != query_rows[q]]
    if len(rows):
      s = cand_emb[rows] @ query_emb[q]
      out[q] = s.mean() if reduce == "mean" else s.max()
  return out


# ---------------------------------------------------------------------------------------------------
# False-negative filters


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Which false-negative rules run on a mined table, and their knobs.

  rules: names from `FILTERS` ('none', 'attribute', 'score'); a neighbour is kept when every rule keeps it.
  margin: the 'score' rule drops score > positive_score + margin (as AGCL's 'margin' mask, delta ~0.1).
  """
  rules: tuple[str, ...] = ("none",)
  margin: float = 0.1

  def __post_init__(self):
    rules = (self.rules,) if isinstance(self.rules, str) else tuple(self.rules)
    unknown = [r for r in rules if r not in FILTERS]
    if unknown or not rules:
      raise ValueError(f"FilterConfig.rules: unknown or no rules {unknown}; known: {sorted(FILTERS)}.")
    object.__setattr__(self, "rules", rules)


@dataclasses.dataclass(frozen=True)
class FilterInputs:
  """What the rules may read besides the table (None where no chosen rule needs it).

  query_terms: int [Q, K] attribute term ids of the queries (0 = padding).
  cand_terms: int [N, K'] of the candidates, indexed by the table's entries (global ids when sharded).
  positive_scores: float [Q] similarity of each query to its positive.
  """
  query_terms: np.ndarray | None = None
  cand_terms: np.ndarray | None = None
  positive_scores: np.ndarray | None = None


FILTERS: dict[str, Callable[[MinedTable, FilterInputs, FilterConfig], np.ndarray]] = {}


def register_filter(name: str):
  """Decorator: adds `fn(mined, inputs, config) -> keep bool [Q, M]` to FILTERS under `name`."""
  def add(fn):
    FILTERS[name] = fn
    return fn
  return add


def term_set_labels(*term_arrays: np.ndarray) -> list[np.ndarray]:
  """One int64 label per row of each int [R_i, K_i] array: equal labels <=> equal sets of non-zero ids.

  Order and repeats are ignored; every empty set gets the label -1. Exact (no hashing): rows are
  reduced to sorted unique ids and numbered by `np.unique`.
  """
  width = max([a.shape[1] for a in term_arrays] + [1])
  canon = []
  for terms in term_arrays:
    terms = np.asarray(terms, np.int64)
    if terms.ndim != 2:
      raise ValueError(f"term_set_labels: term ids must be [R, K], got shape {terms.shape}.")
    s = np.sort(terms, axis=1)
    if s.shape[1] > 1:
      s[:, 1:] = np.where(s[:, 1:] == s[:, :-1], 0, s[:, 1:])  # repeats -> padding
    s = np.sort(s, axis=1)  # padding first, then the unique ids ascending
    canon.append(np.pad(s, ((0, 0), (width - s.shape[1], 0))))
  rows = np.concatenate(canon) if canon else np.zeros((0, width), np.int64)
  _, labels = np.unique(rows, axis=0, return_inverse=True)
  labels = np.asarray(labels, np.int64).reshape(-1)
  labels = np.where(rows.any(axis=1), labels, -1)
  return np.split(labels, np.cumsum([len(c) for c in canon])[:-1])


def same_term_set(table: np.ndarray, query_terms: np.ndarray, cand_terms: np.ndarray) -> np.ndarray:
  """bool [Q, M]: the mined neighbour's attribute term set equals its query's (both non-empty)."""
  table = np.asarray(table)
  q_label, c_label = term_set_labels(query_terms, cand_terms)
  if len(q_label) != table.shape[0]:
    raise ValueError(f"same_term_set: query_terms has {len(q_label)} rows for a table of {table.shape[0]}.")
  n_label = np.where(table >= 0, c_label[np.maximum(table, 0)] if len(c_label) else -1, -1)
  return (n_label == q_label[:, None]) & (q_label[:, None] >= 0)


def exceeds_positive(scores: np.ndarray, positive_scores: np.ndarray, margin: float) -> np.ndarray:
  """bool [Q, M]: score > positive_score + margin (all False where the positive score is not finite:
  a query without a known positive has no reference to exceed)."""
  positive_scores = np.asarray(positive_scores, np.float64)
  known = np.isfinite(positive_scores)[:, None]
  with np.errstate(invalid="ignore"):
    return known & (np.asarray(scores, np.float64) > (np.where(known[:, 0], positive_scores, 0.0)[:, None] + margin))


def _need(value, rule: str, name: str):
  if value is None:
    raise ValueError(f"false-negative filter {rule!r} needs FilterInputs.{name}.")
  return value


@register_filter("none")
def keep_all(mined: MinedTable, inputs: FilterInputs, config: FilterConfig) -> np.ndarray:
  """Keeps every mined neighbour."""
  return mined.valid


@register_filter("attribute")
def keep_other_attributes(mined: MinedTable, inputs: FilterInputs, config: FilterConfig) -> np.ndarray:
  """Drops a neighbour with the query's (non-empty) attribute term set: likely the same item relisted."""
  same = same_term_set(mined.table, _need(inputs.query_terms, "attribute", "query_terms"),
                       _need(inputs.cand_terms, "attribute", "cand_terms"))
  return mined.valid & ~same


@register_filter("score")
def keep_below_positive(mined: MinedTable, inputs: FilterInputs, config: FilterConfig) -> np.ndarray:
  """Drops a neighbour scoring more than `margin` above the query's positive: likely the same item."""
  above = exceeds_positive(mined.scores, _need(inputs.positive_scores, "score", "positive_scores"),
                           config.margin)
  return mined.valid & ~above


def rule_keep(mined: MinedTable, inputs: FilterInputs, config: FilterConfig) -> dict[str, np.ndarray]:
  """Keep mask bool [Q, M] of each configured rule, by name."""
  return {rule: np.asarray(FILTERS[rule](mined, inputs, config), bool) for rule in config.rules}


def compact(mined: MinedTable, keep: np.ndarray) -> MinedTable:
  """The kept entries moved to the front of each row in their order; the rest become -1 / -inf."""
  keep = np.asarray(keep, bool) & mined.valid
  order = np.argsort(~keep, axis=1, kind="stable")
  kept = _take(keep, order)
  table = np.where(kept, _take(mined.table, order), -1)
  scores = np.where(kept, _take(mined.scores, order), -np.inf)
  return MinedTable(table, scores, mined.mined_at_step)


def apply_filter(mined: MinedTable, inputs: FilterInputs,
                 config: FilterConfig) -> tuple[MinedTable, dict[str, int]]:
  """Runs the configured rules, compacts the kept neighbours to the front and counts the drops.

  Returns the filtered MinedTable (same shape) and {'mined': valid entries, '<rule>': entries that rule
  drops on its own, 'dropped': entries any rule drops, 'kept': the rest}.
  """
  masks = rule_keep(mined, inputs, config)
  valid = mined.valid
  keep = valid.copy()
  counts = {"mined": int(valid.sum())}
  for rule, k in masks.items():
    counts[rule] = int((valid & ~k).sum())
    keep &= k
  counts["dropped"] = int((valid & ~keep).sum())
  counts["kept"] = int(keep.sum())
  return compact(mined, keep), counts


def true_duplicates(table: np.ndarray, query_product: np.ndarray, query_true: np.ndarray,
                    cand_product: np.ndarray, cand_true: np.ndarray) -> np.ndarray:
  """bool [Q, M]: the mined neighbour is the query's item under another product id (same true id,
  different product id). cand_* are indexed by the table's entries; -1 entries are False."""
  table = np.asarray(table, np.int64)
  at = np.maximum(table, 0)
  cand_product, cand_true = np.asarray(cand_product), np.asarray(cand_true)
  same_true = cand_true[at] == np.asarray(query_true)[:, None]
  other_product = cand_product[at] != np.asarray(query_product)[:, None]
  return (table >= 0) & same_true & other_product


def filter_quality(keep_by_rule: dict[str, np.ndarray], valid: np.ndarray,
                   is_duplicate: np.ndarray) -> dict[str, dict[str, float]]:
  """Each rule's drops scored against the true duplicates among the valid mined entries.

  keep_by_rule: {rule: keep bool [Q, M]}; valid, is_duplicate: bool [Q, M]. Per rule: 'dropped',
  'true_dropped' (dropped true duplicates), 'duplicates' (true duplicates mined), 'precision' =
  true_dropped / dropped and 'recall' = true_dropped / duplicates (NaN when the divisor is 0).
  """
  valid = np.asarray(valid, bool)
  dup = np.asarray(is_duplicate, bool) & valid
  out = {}
  for rule, keep in keep_by_rule.items():
    dropped = valid & ~np.asarray(keep, bool)
    n_drop, n_true, n_dup = int(dropped.sum()), int((dropped & dup).sum()), int(dup.sum())
    out[rule] = {"dropped": n_drop, "true_dropped": n_true, "duplicates": n_dup,
                 "precision": n_true / n_drop if n_drop else float("nan"),
                 "recall": n_true / n_dup if n_dup else float("nan")}
  return out


__all__ = [
    "BACKENDS", "FILTERS", "FilterConfig", "FilterInputs", "MinedTable", "SCANN_FROM", "apply_filter",
    "choose_backend", "compact", "exceeds_positive", "filter_quality", "merge_mined", "mine", "mine_sharded",
    "own_product_counts", "positive_scores", "register_filter", "rule_keep", "same_term_set",
    "term_set_labels", "true_duplicates",
]
