"""Full-ranking evaluation over a mesh of devices, possibly of several processes.

Each chunk's users are split over the mesh: every device scores and ranks its rows against all items with
the kernel of :mod:`benchmarks.training.metrics`; the per-user metric rows are gathered to every process
(``process_allgather``) and averaged there in float64 -- the same formula and order as one process, so every
process reaches the same early-stopping decisions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.parallel import distributed
from benchmarks.runtime import backend
from benchmarks.training import metrics

__all__ = ["evaluate", "evaluate_params"]


@functools.partial(jax.jit, static_argnames=("sharding",))
def _row_scores(users, items, user_ids, *, sharding):
  return jax.lax.with_sharding_constraint(users[user_ids] @ items.T, sharding)


def evaluate(
  score_fn: Callable[[jax.Array], jax.Array],
  ds: Any,
  split: str,
  mesh: jax.sharding.Mesh,
  *,
  ks: Sequence[int] = (5, 10, 20, 50),
  chunk_size: Optional[int] = None,
  axis: str = "data",
) -> dict[str, float]:
  """:func:`benchmarks.training.metrics.evaluate` with each chunk's users split over ``mesh``.

  ``score_fn(user_ids)`` gets a global ``(chunk,)`` id array sharded over ``axis`` and returns global
  ``(chunk, n_items)`` scores. The per-user metric rows (the same kernel as :mod:`benchmarks.training.metrics`) are
  gathered to every process and averaged in float64 there, so every process gets the same numbers -- those
  of one process up to the scores' floating-point rounding. ``chunk_size`` (default: the single-device
  automatic size times the device count) is rounded up to a multiple of the device count.
  """
  if split not in ("valid", "test"):
    raise ValueError(f"split must be 'valid' or 'test' (training items are masked), got {split!r}")
  ks = metrics.check_ks(ks)
  n_dev = int(mesh.shape[axis])
  if chunk_size is None:
    chunk_size = backend.eval_chunk_size(ds.n_items) * n_dev
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  n_eval = int(np.count_nonzero(np.diff(ds.csr(split)[0])))
  chunk_size = min(int(chunk_size), max(8, -(-n_eval // 8) * 8))
  chunk_size = -(-chunk_size // n_dev) * n_dev
  plan = metrics.plan_chunks(ds, split, chunk_size)
  rows = NamedSharding(mesh, P(axis))
  outputs = []
  for c, users in enumerate(plan["user_chunks"]):
    scores = score_fn(distributed.put_global(np.asarray(users), rows))
    outputs.append(metrics.chunk_metrics(scores, np.int32(c), *plan["arrays"], ks=ks, k_max=min(ks[-1], ds.n_items)))
  per_user = distributed.allgather(jnp.concatenate(outputs))[: plan["n_users"]]
  return metrics.average(per_user, np.ones(plan["n_users"], dtype=bool), ks)


def evaluate_params(
  embed, params, rest, ds: Any, split: str, chunk_size: Optional[int], ks: Sequence[int] = (5, 10, 20, 50)
) -> dict[str, float]:
  """:func:`benchmarks.training.loop.evaluate_params` for parameters that live on a multi-process mesh."""
  mesh = next(leaf.sharding.mesh for leaf in jax.tree.leaves(params) if isinstance(leaf.sharding, NamedSharding))
  users, items = embed(params, rest)
  rows = NamedSharding(mesh, P("data", None))
  return evaluate(
    functools.partial(_row_scores, users, items, sharding=rows), ds, split, mesh, ks=ks, chunk_size=chunk_size
  )
