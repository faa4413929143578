r"""Top-k ranking metrics and a chunked full-ranking evaluator (MMRec protocol).

For a user :math:`u` with held-out relevant set :math:`T_u` (:math:`|T_u| \ge 1`), let :math:`h_r \in \{0, 1\}`
say whether the item ranked :math:`r` (1-based, training items excluded) is in :math:`T_u`, and
:math:`H_k = \sum_{r \le k} h_r`. With :math:`m_k = \min(|T_u|, k)`:

.. math::

   \mathrm{Recall@}k = \frac{H_k}{|T_u|}, \qquad
   \mathrm{Precision@}k = \frac{H_k}{k}, \qquad
   \mathrm{NDCG@}k = \frac{\sum_{r \le k} h_r / \log_2(r + 1)}{\sum_{r \le m_k} 1 / \log_2(r + 1)}, \qquad
   \mathrm{MAP@}k = \frac{1}{m_k} \sum_{r \le k} h_r \frac{H_r}{r}.

Each metric is averaged over the users with at least one relevant item. These are the definitions of MMRec's
``metrics.py`` (recall uncapped, IDCG and the MAP normaliser over :math:`\min(|T_u|, k)`); see
Zhou et al., "A Comprehensive Survey on Multimodal Recommender Systems: Taxonomy, Evaluation, and Future
Directions" (2023) and https://github.com/enoche/MMRec.

Ranking uses :func:`jax.lax.top_k`, which is deterministic and breaks ties towards the lower item id.

:func:`evaluate` scores users in fixed-size chunks (the last one padded, so one compilation serves every chunk),
masks each user's training items with :math:`-\infty` by a scatter, takes the top :math:`\max k` and the hit
indicators on the device, and brings back only the ``(chunk, 4 |ks|)`` per-user metric values; the per-user
values are then averaged on the host in float64. Its memory is :math:`O(\text{chunk} \times n_i)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.runtime import backend
from benchmarks.data.dataset import Dataset

__all__ = ["METRICS", "metric_names", "topk_metrics", "evaluate"]

METRICS: tuple[str, ...] = ("recall", "ndcg", "precision", "map")  # MMRec's usual order


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
  ks = tuple(sorted({int(k) for k in ks}))
  if not ks or ks[0] < 1:
    raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks}")
  return ks


def metric_names(ks: Sequence[int] = (5, 10, 20, 50)) -> list[str]:
  """Result keys in order: ``recall@k`` for every k, then ``ndcg@k``, ``precision@k``, ``map@k``."""
  ks = check_ks(ks)
  return [f"{m}@{k}" for m in METRICS for k in ks]


def _per_user(hits: jax.Array, n_rel: jax.Array, ks: tuple[int, ...]) -> jax.Array:
  """Per-user metrics ``(B, 4 len(ks))`` from hit indicators ``(B, K)`` and relevant counts ``(B,)``."""
  hits = hits.astype(jnp.float32)
  n_pos = hits.shape[1]
  rank = jnp.arange(1, n_pos + 1, dtype=jnp.float32)
  discount = 1.0 / jnp.log2(rank + 1.0)
  cum_hits = jnp.cumsum(hits, axis=1)
  cum_dcg = jnp.cumsum(hits * discount, axis=1)
  cum_ap = jnp.cumsum(hits * cum_hits / rank, axis=1)
  cum_idcg = jnp.cumsum(discount)
  n = n_rel.astype(jnp.int32)
  n_safe = jnp.maximum(n, 1).astype(jnp.float32)
  columns = {m: [] for m in METRICS}
  for k in ks:
    last = min(k, n_pos) - 1  # a ranking shorter than k (n_items < k) has no more hits
    ideal = jnp.clip(jnp.minimum(n, k), 1, n_pos)
    columns["recall"].append(cum_hits[:, last] / n_safe)
    columns["ndcg"].append(cum_dcg[:, last] / cum_idcg[ideal - 1])
    columns["precision"].append(cum_hits[:, last] / k)
    columns["map"].append(cum_ap[:, last] / jnp.maximum(jnp.minimum(n, k), 1).astype(jnp.float32))
  out = jnp.stack([c for m in METRICS for c in columns[m]], axis=1)
  return jnp.where((n > 0)[:, None], out, 0.0)


def _ranked_hits(scores, rel_rows, rel_cols, k_max):
  _, top = jax.lax.top_k(scores, k_max)
  relevant = jnp.zeros(scores.shape, dtype=jnp.bool_).at[rel_rows, rel_cols].set(True, mode="drop")
  return jnp.take_along_axis(relevant, top, axis=1)


@functools.partial(jax.jit, static_argnames=("ks", "k_max"))
def _scored_metrics(scores, rel_rows, rel_cols, n_rel, *, ks, k_max):
  return _per_user(_ranked_hits(scores, rel_rows, rel_cols, k_max), n_rel, ks)


@functools.partial(jax.jit, static_argnames=("ks", "k_max"))
def chunk_metrics(scores, chunk, mask_rows, mask_cols, rel_rows, rel_cols, n_rel, *, ks, k_max):
  """Metrics of chunk ``chunk`` of a plan: mask training items, rank, count hits (all on the device)."""
  take = functools.partial(jax.lax.dynamic_index_in_dim, index=chunk, axis=0, keepdims=False)
  scores = scores.at[take(mask_rows), take(mask_cols)].set(-jnp.inf, mode="drop")
  return _per_user(_ranked_hits(scores, take(rel_rows), take(rel_cols), k_max), take(n_rel), ks)


def average(per_user: np.ndarray, valid: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
  rows = np.asarray(per_user, dtype=np.float64)[valid]
  means = rows.mean(axis=0)
  return {name: float(v) for name, v in zip(metric_names(ks), means)}


def topk_metrics(scores, relevant: Sequence[Sequence[int]], ks: Sequence[int] = (5, 10, 20, 50)) -> dict[str, float]:
  """MMRec top-k metrics of a full score matrix.

  Args:
    scores: ``(n_users, n_items)`` array (numpy or JAX); excluded items must already hold ``-inf``.
    relevant: ``n_users`` 1-D integer arrays, the relevant items of each row (duplicates are ignored).
    ks: cut-offs.

  Returns:
    ``{"recall@k", "ndcg@k", "precision@k", "map@k"}`` for each k (python floats), averaged over the rows
    with at least one relevant item.
  """
  ks = check_ks(ks)
  scores = jnp.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must be 2-D (n_users, n_items), got shape {scores.shape}")
  n_rows, n_items = scores.shape
  if len(relevant) != n_rows:
    raise ValueError(f"relevant has {len(relevant)} rows but scores has {n_rows}")
  cols = [np.asarray(r, dtype=np.int64).reshape(-1) for r in relevant]
  rows = np.repeat(np.arange(n_rows, dtype=np.int64), [c.size for c in cols])
  cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
  if cols.size and (cols.min() < 0 or cols.max() >= n_items):
    raise ValueError(f"relevant item ids must lie in [0, n_items={n_items})")
  keys = np.unique(rows * n_items + cols)
  rows, cols = keys // n_items, keys % n_items
  n_rel = np.bincount(rows, minlength=n_rows)
  if not np.any(n_rel):
    raise ValueError("no row has a relevant item; metrics are undefined")
  per_user = _scored_metrics(
    scores,
    jnp.asarray(rows, jnp.int32),
    jnp.asarray(cols, jnp.int32),
    jnp.asarray(n_rel, jnp.int32),
    ks=ks,
    k_max=min(ks[-1], n_items),
  )
  return average(np.asarray(per_user), n_rel > 0, ks)


def _padded_pairs(
  indptr: np.ndarray, indices: np.ndarray, users: np.ndarray, chunk_size: int, n_chunks: int
) -> tuple[np.ndarray, np.ndarray]:
  """(rows, cols) ``(n_chunks, L)`` of the chunk users' items; padding rows = ``chunk_size`` (dropped)."""
  degree = (indptr[users + 1] - indptr[users]).astype(np.int64)
  total = int(degree.sum())
  first = np.cumsum(degree) - degree
  flat = np.repeat(indptr[users] - first, degree) + np.arange(total)
  position = np.arange(users.size)
  chunk = np.repeat(position // chunk_size, degree)
  per_chunk = np.bincount(chunk, minlength=n_chunks)
  width = max(int(per_chunk.max()), 1)
  slot = np.arange(total) - np.repeat(np.cumsum(per_chunk) - per_chunk, per_chunk)
  rows = np.full((n_chunks, width), chunk_size, dtype=np.int32)
  cols = np.zeros((n_chunks, width), dtype=np.int32)
  rows[chunk, slot] = np.repeat(position % chunk_size, degree)
  cols[chunk, slot] = indices[flat]
  return rows, cols


def plan_chunks(ds: Dataset, split: str, chunk_size: int) -> dict:
  """Evaluation users and padded per-chunk index arrays on the device; cached per (dataset, split, chunk)."""
  key = ("eval_plan", split, chunk_size)
  if key not in ds._cache:
    indptr, indices = ds.csr(split)
    n_rel = np.diff(indptr)
    users = np.flatnonzero(n_rel)
    if users.size == 0:
      raise ValueError(f"{ds.name}: no user has an item in the {split!r} split")
    n_chunks = -(-users.size // chunk_size)
    padded = np.full(n_chunks * chunk_size, users[0], dtype=np.int32)
    padded[: users.size] = users
    chunk_rel = np.zeros(n_chunks * chunk_size, dtype=np.int32)
    chunk_rel[: users.size] = n_rel[users]
    mask_rows, mask_cols = _padded_pairs(*ds.csr("train"), users, chunk_size, n_chunks)
    rel_rows, rel_cols = _padded_pairs(indptr, indices, users, chunk_size, n_chunks)
    ds._cache[key] = {
      "n_users": int(users.size),
      "user_chunks": [jnp.asarray(c) for c in padded.reshape(n_chunks, chunk_size)],
      "arrays": tuple(
        jnp.asarray(a) for a in (mask_rows, mask_cols, rel_rows, rel_cols, chunk_rel.reshape(n_chunks, chunk_size))
      ),
    }
  return ds._cache[key]


def evaluate(
  score_fn: Callable[[jax.Array], jax.Array],
  ds: Dataset,
  split: str = "valid",
  *,
  ks: Sequence[int] = (5, 10, 20, 50),
  chunk_size: int | None = None,
) -> dict[str, float]:
  """Full-ranking evaluation of ``score_fn`` on ``split`` with training items masked (MMRec protocol).

  Args:
    score_fn: ``user_ids (B,) int32 -> (B, n_items)`` raw scores (jit it for speed). The last chunk is padded
      with a repeated user id, so ``B`` is always ``chunk_size``.
    ds: the data set.
    split: ``"valid"`` or ``"test"``; the users evaluated are those with at least one item in it.
    ks: cut-offs.
    chunk_size: users per chunk (capped at the number of evaluated users, rounded up to 8); ``None`` picks
      a size that keeps a chunk's score matrix small: about 24 MiB on CPU, where that is fastest (buffers stay
      under glibc's mmap threshold and are reused), up to 1 GiB on accelerators.

  Returns:
    the :func:`topk_metrics` dictionary.
  """
  if split not in ("valid", "test"):
    raise ValueError(f"split must be 'valid' or 'test' (training items are masked), got {split!r}")
  ks = check_ks(ks)
  if chunk_size is None:
    chunk_size = backend.eval_chunk_size(ds.n_items)
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  n_eval = int(np.count_nonzero(np.diff(ds.csr(split)[0])))
  chunk_size = min(int(chunk_size), max(8, -(-n_eval // 8) * 8))  # no chunk larger than the whole split
  plan = plan_chunks(ds, split, chunk_size)
  outputs = []
  for c, users in enumerate(plan["user_chunks"]):
    scores = score_fn(users)
    if scores.shape != (users.shape[0], ds.n_items):
      raise ValueError(f"score_fn returned shape {scores.shape}; expected ({users.shape[0]}, n_items={ds.n_items})")
    outputs.append(chunk_metrics(scores, np.int32(c), *plan["arrays"], ks=ks, k_max=min(ks[-1], ds.n_items)))
  per_user = np.concatenate([np.asarray(o) for o in outputs])[: plan["n_users"]]
  return average(per_user, np.ones(plan["n_users"], dtype=bool), ks)
