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
import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.perf import arguments
from benchmarks.runtime import cli
from models import graph

__all__ = [
  "BABY_SHAPE",
  "IMPLEMENTATIONS",
  "PROG",
  "Options",
  "build_parser",
  "execute",
  "parse_args",
  "random_pairs",
  "report",
]


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


PROG = "python -m benchmarks.propagation_speed"
#: The Baby data set's training graph: users, items, unique training pairs.
BABY_SHAPE = (19_445, 7_050, 119_674)


@dataclasses.dataclass(frozen=True)
class Options:
  """What ``python -m benchmarks.propagation_speed`` times, checked (:func:`parse_args`)."""

  users: int = BABY_SHAPE[0]
  items: int = BABY_SHAPE[1]
  pairs: int = BABY_SHAPE[2]
  dim: int = 64
  n_layers: int = 2
  repeats: int = 20
  seed: int = 0
  data: Optional[str] = None  # a benchmarks.data.dataset.load spec; its shape replaces users/items/pairs


def _data_spec(text: str) -> str:
  from benchmarks.data import dataset as data_lib

  if text == "synthetic" or text.startswith("synthetic:"):
    preset = text.partition(":")[2] or "default"
    if preset not in data_lib.PRESETS:
      raise argparse.ArgumentTypeError(f"unknown preset {preset!r}; valid: {', '.join(sorted(data_lib.PRESETS))}")
  elif not Path(text).exists():
    raise argparse.ArgumentTypeError(f"{text} does not exist (an MMRec data directory or .inter file)")
  return text


def build_parser() -> argparse.ArgumentParser:
  p = arguments.ArgumentParser(PROG, __doc__)
  p.add_argument("--users", type=arguments.integer(1), default=None, help=f"default {BABY_SHAPE[0]} (Baby)")
  p.add_argument("--items", type=arguments.integer(1), default=None, help=f"default {BABY_SHAPE[1]} (Baby)")
  p.add_argument(
    "--pairs",
    type=arguments.integer(1),
    default=None,
    help=f"unique (user, item) pairs, from --users to --users x --items (default {BABY_SHAPE[2]})",
  )
  p.add_argument("--dim", type=arguments.integer(1), default=64)
  p.add_argument("--n-layers", type=arguments.integer(1), default=2)
  p.add_argument("--repeats", type=arguments.integer(1), default=20)
  p.add_argument("--seed", type=arguments.integer(0), default=0)
  p.add_argument(
    "--data",
    type=_data_spec,
    default=None,
    help="use this data set's training graph instead of a random one (a benchmarks.data.dataset.load "
    "spec, e.g. a directory in MMRec layout); not with --users/--items/--pairs",
  )
  return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
  """The command line as :class:`Options`; a bad flag or combination raises :class:`cli.UsageError` naming it."""
  args = build_parser().parse_args(argv)
  shape = {"users": args.users, "items": args.items, "pairs": args.pairs}
  common = dict(dim=args.dim, n_layers=args.n_layers, repeats=args.repeats, seed=args.seed)
  if args.data is not None:
    given = [f"--{k}" for k, v in shape.items() if v is not None]
    if given:
      raise cli.UsageError(f"{', '.join(given)}: not taken with --data (the graph is the data set's)")
    return Options(data=args.data, **common)
  users, items, pairs = (v if v is not None else d for v, d in zip(shape.values(), BABY_SHAPE))
  if not users <= pairs <= users * items:
    raise cli.UsageError(
      f"--pairs must be between --users ({users}) and --users x --items ({users * items}), got {pairs}"
    )
  return Options(users=users, items=items, pairs=pairs, **common)


def execute(options: Options) -> dict[str, dict[str, float]]:
  """Times every implementation; returns ``{implementation: {"forward_ms", "fwd+bwd_ms"}}`` (medians)."""
  users, items, pairs = options.users, options.items, options.pairs
  if options.data is not None:
    from benchmarks.data import dataset as data_lib

    try:
      ds = data_lib.load(options.data)
    except (OSError, ValueError) as e:
      raise cli.UsageError(f"--data {options.data}: {e}") from None
    u, i = ds.train.user, ds.train.item
    users, items = ds.n_users, ds.n_items
    pairs = int(np.unique(u.astype(np.int64) * ds.n_items + i).size)
  else:
    u, i = random_pairs(users, items, pairs, options.seed)
  rows, cols, vals = (jnp.asarray(a) for a in graph.normalized_adjacency(u, i, users, items))
  n = users + items
  k0, k1 = jax.random.split(jax.random.key(options.seed))
  e0 = jax.random.normal(k0, (n, options.dim), jnp.float32)
  c = jax.random.normal(k1, (n, options.dim), jnp.float32)
  n_layers = options.n_layers

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(
    f"graph ({options.data or 'random'}): {users} users x {items} items, {pairs} pairs "
    f"({rows.shape[0]} directed edges), dim {options.dim}, {n_layers} layers, "
    f"median of {options.repeats}"
  )
  ref = None
  fns: dict[str, tuple] = {}
  for name, prop in IMPLEMENTATIONS.items():
    # Everything is a jit *argument* (closing over the graph would let XLA constant-fold it).
    def forward(e, rows, cols, vals, prop=prop):
      return graph.layer_mean(e, n_layers, lambda x: prop(x, rows, cols, vals))

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
  timed = _time_interleaved(fns, options.repeats)
  results: dict[str, dict[str, float]] = {}
  for (name, what), ms in timed.items():
    results.setdefault(name, {})[what] = ms
  return results


def report(results: dict[str, dict[str, float]]) -> None:
  """Prints the table of a result of :func:`execute`."""
  print(f"{'implementation':<22} {'forward (ms)':>13} {'fwd+bwd (ms)':>13}")
  for name, r in results.items():
    print(f"{name:<22} {r['forward_ms']:>13.2f} {r['fwd+bwd_ms']:>13.2f}")
  best = min(results, key=lambda k: results[k]["fwd+bwd_ms"])
  print(f"faster (fwd+bwd) of sparse vs segment_sum: {best}")
