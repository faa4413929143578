"""Time LightGCN propagation implementations at the Baby shape.

    python -m benchmarks.propagation_speed [--n-layers 2] [--repeats 20] [--users 19445 ...]
    python -m benchmarks.propagation_speed --data /path/to/baby     # the real training graph

A random bipartite graph with the Baby data set's shape (19,445 users x 7,050 items, 119,674 unique
training pairs, 64-d embeddings) is normalised as in :mod:`models.graph`; for each implementation the
script times, under ``jax.jit`` with ``block_until_ready`` and the compile/warm-up call excluded:

* ``forward``: ``mean(E_0..E_L)`` for ``E_l = A_hat E_{l-1}``;
* ``fwd+bwd``: value and gradient of ``0.5 ||forward(E_0) - C||^2`` with respect to ``E_0``.

Implementations: ``sparse`` (``jax.experimental.sparse.BCOO @ X``) and ``segment_sum`` (gather +
sorted ``jax.ops.segment_sum``). Calls are interleaved (one of each per round) so background load on a
shared machine affects both alike; the median over rounds is printed in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import graph


def random_pairs(n_users: int, n_items: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``n_pairs`` unique uniform random (user, item) pairs; every user gets at least one item."""
  rng = np.random.default_rng(seed)
  first = rng.integers(0, n_items, n_users)
  keys = set((np.arange(n_users, dtype=np.int64) * n_items + first).tolist())
  while len(keys) < n_pairs:
    extra = rng.integers(0, n_users * n_items, 2 * (n_pairs - len(keys)))
    keys.update(extra.tolist())
    if len(keys) > n_pairs:
      keys = set(list(keys)[:n_pairs])
  k = np.fromiter(keys, dtype=np.int64)
  return (k // n_items).astype(np.int32), (k % n_items).astype(np.int32)


IMPLEMENTATIONS = {"sparse": graph.propagate_sparse, "segment_sum": graph.propagate_segment_sum}


def _time_interleaved(fns: dict[str, tuple], repeats: int) -> dict[str, float]:
  """Median wall time (ms) of each ``fn(*args)``; one call of each per round, so background load on
  a shared machine hits all implementations alike. Compilation and a warm-up call are excluded."""
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--users", type=int, default=19_445)
  p.add_argument("--items", type=int, default=7_050)
  p.add_argument("--pairs", type=int, default=119_674)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--n-layers", type=int, default=2)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--data",
    default=None,
    help="use this data set's training graph instead of a random one (a benchmarks.data.load "
    "spec, e.g. a directory in MMRec layout); overrides --users/--items/--pairs",
  )
  args = p.parse_args(argv)

  if args.data is not None:
    from benchmarks.data import dataset as data_lib

    ds = data_lib.load(args.data)
    u, i = ds.train.user, ds.train.item
    args.users, args.items = ds.n_users, ds.n_items
    args.pairs = int(np.unique(u.astype(np.int64) * ds.n_items + i).size)
  else:
    u, i = random_pairs(args.users, args.items, args.pairs, args.seed)
  rows, cols, vals = (jnp.asarray(a) for a in graph.normalized_adjacency(u, i, args.users, args.items))
  n = args.users + args.items
  k0, k1 = jax.random.split(jax.random.key(args.seed))
  e0 = jax.random.normal(k0, (n, args.dim), jnp.float32)
  c = jax.random.normal(k1, (n, args.dim), jnp.float32)

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(
    f"graph ({args.data or 'random'}): {args.users} users x {args.items} items, {args.pairs} pairs "
    f"({rows.shape[0]} directed edges), dim {args.dim}, {args.n_layers} layers, "
    f"median of {args.repeats}"
  )
  ref = None
  fns: dict[str, tuple] = {}
  for name, prop in IMPLEMENTATIONS.items():
    # Everything is a jit *argument* (closing over the graph would let XLA constant-fold it).
    def forward(e, rows, cols, vals, prop=prop):
      return graph.layer_mean(e, args.n_layers, lambda x: prop(x, rows, cols, vals))

    def objective(e, rows, cols, vals, c, forward=forward):
      return 0.5 * jnp.sum(jnp.square(forward(e, rows, cols, vals) - c))

    fwd = jax.jit(forward)
    bwd = jax.jit(jax.value_and_grad(objective))
    out = np.asarray(fwd(e0, rows, cols, vals))
    if ref is None:
      ref = out
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    fns[(name, "forward_ms")] = (fwd, (e0, rows, cols, vals))
    fns[(name, "fwd+bwd_ms")] = (bwd, (e0, rows, cols, vals, c))
  timed = _time_interleaved(fns, args.repeats)
  results: dict[str, dict[str, float]] = {}
  for (name, what), ms in timed.items():
    results.setdefault(name, {})[what] = ms

  print(f"{'implementation':<22} {'forward (ms)':>13} {'fwd+bwd (ms)':>13}")
  for name, r in results.items():
    print(f"{name:<22} {r['forward_ms']:>13.2f} {r['fwd+bwd_ms']:>13.2f}")
  best = min(results, key=lambda k: results[k]["fwd+bwd_ms"])
  print(f"faster (fwd+bwd) of sparse vs segment_sum: {best}")
  return results
