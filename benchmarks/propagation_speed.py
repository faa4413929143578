"""Time LightGCN propagation implementations at the Baby shape.

    python -m benchmarks.propagation_speed [--n-layers 2] [--repeats 20] [--users 19445 ...]

A random bipartite graph with the Baby data set's shape (19,445 users x 7,050 items, 119,674 unique
training pairs, 64-d embeddings) is normalised as in :mod:`models.graph`; for each implementation the
script times, under ``jax.jit`` with ``block_until_ready`` and the compile/warm-up call excluded:

* ``forward``: ``mean(E_0..E_L)`` for ``E_l = A_hat E_{l-1}``;
* ``fwd+bwd``: the gradient of ``sum(forward(E_0) * C)`` with respect to ``E_0``.

Implementations: ``sparse`` (``jax.experimental.sparse.BCOO @ X``), ``segment_sum`` (gather +
sorted ``jax.ops.segment_sum``, backward via the symmetric custom VJP -- what the models use) and
``segment_sum_autodiff`` (the same forward, backward left to autodiff: an unsorted scatter-add), the
last only to show what the custom VJP buys. The median over repeats is printed in milliseconds.
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


def _plain_segment_sum(x, rows, cols, vals):
    return graph._segment_spmm(x, rows, cols, vals)  # autodiff backward (scatter-add)


IMPLEMENTATIONS = {
    "sparse": graph.propagate_sparse,
    "segment_sum": graph.propagate_segment_sum,
    "segment_sum_autodiff": _plain_segment_sum,
}


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up, excluded
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=19_445)
    p.add_argument("--items", type=int, default=7_050)
    p.add_argument("--pairs", type=int, default=119_674)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    u, i = random_pairs(args.users, args.items, args.pairs, args.seed)
    rows, cols, vals = (jnp.asarray(a) for a in graph.normalized_adjacency(u, i, args.users, args.items))
    n = args.users + args.items
    k0, k1 = jax.random.split(jax.random.key(args.seed))
    e0 = jax.random.normal(k0, (n, args.dim), jnp.float32)
    c = jax.random.normal(k1, (n, args.dim), jnp.float32)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"graph: {args.users} users x {args.items} items, {args.pairs} pairs "
          f"({rows.shape[0]} directed edges), dim {args.dim}, {args.n_layers} layers, "
          f"median of {args.repeats}")
    results: dict[str, dict[str, float]] = {}
    ref = None
    for name, prop in IMPLEMENTATIONS.items():
        def forward(e, prop=prop):
            return graph.layer_mean(e, args.n_layers, lambda x: prop(x, rows, cols, vals))

        fwd = jax.jit(forward)
        bwd = jax.jit(jax.grad(lambda e, forward=forward: jnp.sum(forward(e) * c)))
        out = np.asarray(fwd(e0))
        if ref is None:
            ref = out
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
        results[name] = {"forward_ms": _time(fwd, e0, repeats=args.repeats),
                         "fwd+bwd_ms": _time(bwd, e0, repeats=args.repeats)}

    print(f"{'implementation':<22} {'forward (ms)':>13} {'fwd+bwd (ms)':>13}")
    for name, r in results.items():
        print(f"{name:<22} {r['forward_ms']:>13.2f} {r['fwd+bwd_ms']:>13.2f}")
    best = min(("sparse", "segment_sum"), key=lambda k: results[k]["fwd+bwd_ms"])
    print(f"faster (fwd+bwd) of sparse vs segment_sum: {best}")
    return results


if __name__ == "__main__":
    main()
