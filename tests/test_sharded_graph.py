"""Sharded graph propagation (benchmarks/parallel/graph.py) equals models.graph's on 1, 2, 4 and 8 devices.

The partition is numpy and is tested here. The device count is fixed when JAX starts, so the propagation runs
in subprocesses with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this pytest process keeps its
devices): propagation, gradients, a Hessian-vector product and LightGCN's loss and gradients against the
unsharded graph, and the memory model against the compiler's ``memory_analysis()``.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from benchmarks.parallel import graph as sharded
from models.common import Interactions
from models.graph import normalized_adjacency

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-6  # relative: max |sharded - unsharded| / max |unsharded|, float32


def skewed_pairs(n_users, n_items, n, seed=0):
  """Training pairs with power-law user and item degrees, duplicates, and the last user and item without pairs."""
  rng = np.random.default_rng(seed)
  users = np.minimum((rng.pareto(1.2, n) * n_users / 8).astype(np.int64), n_users - 2)
  items = np.minimum((rng.pareto(1.2, n) * n_items / 8).astype(np.int64), n_items - 2)
  perm_u, perm_i = rng.permutation(n_users - 1), rng.permutation(n_items - 1)  # heavy ids spread out
  return perm_u[users], perm_i[items]


# --------------------------------------------------------------------------------------------------
# The partition (numpy)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("devices,chunk", [(1, None), (3, 50), (8, None), (8, 128)])
def test_partition_assigns_every_edge_once_with_zero_weight_padding(devices, chunk):
  n_users, n_items = 300, 200
  users, items = skewed_pairs(n_users, n_items, 4000, seed=devices)
  part = sharded.partition_graph(users, items, n_users, n_items, devices, chunk)
  rows, cols, vals = normalized_adjacency(users, items, n_users, n_items)
  n_edges = rows.shape[0] // 2
  assert part.n_edges == n_edges and part.edge_count.sum() == n_edges

  starts = part.user_start
  assert starts[0] == 0 and starts[-1] == n_users and np.all(np.diff(starts) >= 0)  # contiguous blocks
  assert part.users_per_device == max(1, np.diff(starts).max())
  assert part.edges_per_device % part.chunk_edges == 0 and part.n_chunks * part.chunk_edges == part.edges_per_device
  assert part.edges_per_device - part.edge_count.max() < part.chunk_edges
  weights = part.edge_weights()
  seen = []
  for p in range(devices):
    k = part.edge_count[p]
    user = starts[p] + part.edge_user[p, :k].astype(np.int64)
    item = part.edge_item[p, :k].astype(np.int64)
    assert np.all((user >= starts[p]) & (user < starts[p + 1]))  # a device owns its users' edges
    assert np.all(np.diff(user * n_items + item) > 0)  # sorted by (user, item)
    assert np.all(np.diff(part.edge_item[p][part.item_order[p]]) >= 0)  # item_order sorts by item
    assert sorted(part.item_order[p]) == list(range(part.edges_per_device))  # a permutation
    assert np.all(part.item_order[p][k:] >= k)  # padding slots sort last
    seen.append(user * n_items + item)
    # padding edges: the sentinel user row (deg^-1/2 = 0), weight exactly 0
    assert np.all(part.edge_user[p, k:] == part.users_per_device)
    assert np.all(weights[p, k:] == 0.0)
    # real edges: the unsharded A_hat's weights (user side of the COO), global degrees
    coo = slice(part.edge_offset[p], part.edge_offset[p] + k)
    np.testing.assert_allclose(weights[p, :k], vals[coo], rtol=3e-7)
    np.testing.assert_array_equal(user, rows[coo])
    np.testing.assert_array_equal(part.item_coo[p, :k], _item_entries(rows, cols, user, item, n_users, n_items))
  seen = np.concatenate(seen)
  expected = np.unique(users.astype(np.int64) * n_items + items)
  np.testing.assert_array_equal(np.sort(seen), expected)  # every distinct pair exactly once
  assert seen.size == np.unique(seen).size


def _item_entries(rows, cols, user, item, n_users, n_items):
  """Index in the COO (sorted by (row, col)) of the entries (item node, user) of the pairs ``(user, item)``."""
  n_nodes = n_users + n_items
  key = rows.astype(np.int64) * n_nodes + cols
  idx = np.searchsorted(key, (item + n_users) * n_nodes + user)
  assert np.array_equal(key[idx], (item + n_users) * n_nodes + user)
  return idx


def test_partition_blocks_are_degree_balanced_on_a_skewed_graph():
  n_users, n_items = 2000, 500
  users, items = skewed_pairs(n_users, n_items, 30000, seed=3)
  degree = np.bincount(np.unique(users * n_items + items) // n_items, minlength=n_users)
  assert degree.max() > 20 * degree.mean()  # skewed
  for devices in (2, 4, 8):
    part = sharded.partition_graph(users, items, n_users, n_items, devices)
    mean = part.n_edges / devices
    assert part.edge_count.max() <= 2 * mean, (devices, part.edge_count, mean)
  equal_rows = np.add.reduceat(degree, np.arange(0, n_users, n_users // 8))  # 8 blocks of 250 users
  assert equal_rows.max() > part.edge_count.max()


def test_balanced_blocks_is_optimal_for_contiguous_blocks():
  rng = np.random.default_rng(0)
  for _ in range(30):
    n, k = int(rng.integers(1, 9)), int(rng.integers(1, 4))
    cost = rng.integers(0, 20, n)
    starts = sharded.balanced_blocks(cost, k)
    assert starts[0] == 0 and starts[-1] == n and len(starts) == k + 1 and np.all(np.diff(starts) >= 0)
    got = max(cost[a:b].sum() for a, b in itertools.pairwise(starts))
    best = min(
      max(cost[a:b].sum() for a, b in itertools.pairwise((0, *cuts, n)))
      for cuts in itertools.combinations_with_replacement(range(n + 1), k - 1)
    )
    assert got == best, (cost, k, starts)


def test_memory_model_terms():
  kw = dict(n_users=100_000, n_items=50_000, n_edges=2_000_000, dim=64, n_layers=3, chunk_edges=16384)
  one, eight = sharded.memory_bytes(devices=1, **kw), sharded.memory_bytes(devices=8, **kw)
  assert one["total"] == sum(v for k, v in one.items() if k != "total")
  # the graph and the user rows split; the gathered item table does not
  assert eight["edges"] * 8 == pytest.approx(one["edges"], rel=0.05)  # padding to whole chunks
  assert eight["gathered_items"] == one["gathered_items"] == 64 * 4 * 50_000
  assert eight["total"] < one["total"] / 2
  assert sharded.memory_bytes(devices=8, **{**kw, "n_layers": 1}) == eight  # the layer scan: flat in L
  assert sharded.memory_bytes(devices=8, train=False, **kw)["cotangents"] == 0
  single = sharded.memory_bytes(devices=8, **{**kw, "chunk_edges": None})
  assert single["chunk_buffers"] == 2 * 64 * 4 * 250_000  # both passes' messages
  assert sharded.memory_bytes(devices=8, **{**kw, "n_layers": 0})["total"] < eight["total"]


def test_sharded_graph_input_errors():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  users, items = skewed_pairs(20, 10, 60)
  g = sharded.ShardedGraph(Interactions(20, 10, users, items), mesh)
  x = np.zeros((30, 4), np.float32)
  with pytest.raises(ValueError, match="coo_values=True"):
    g(x, np.zeros(2 * g.n_edges, np.float32))
  with pytest.raises(ValueError, match="expected 30 rows"):
    g(x[:29])
  with pytest.raises(ValueError, match="no axis 'model'"):
    sharded.ShardedGraph(Interactions(20, 10, users, items), mesh, axis="model")


# --------------------------------------------------------------------------------------------------
# On 1, 2, 4 and 8 host devices (subprocesses)
# --------------------------------------------------------------------------------------------------
EQUIVALENCE = (
  "import numpy as np\n\n"
  + inspect.getsource(skewed_pairs)
  + textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp
    from flax import nnx
    from benchmarks.parallel.graph import ShardedGraph
    from benchmarks.parallel.mesh import make_mesh
    from models.common import Interactions
    from models.graph import NormalizedGraph, layer_mean
    from models.lightgcn import LightGCN
    import models

    assert jax.device_count() == 8, jax.devices()
    U, I, D = 61, 43, 8
    users, items = skewed_pairs(U, I, 700)
    inter = Interactions(U, I, users, items)
    ref_graph = NormalizedGraph(users, items, U, I, kernel="segment_sum")
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (U + I, D))
    w = jax.random.normal(k[1], (U + I, D))
    v = jax.random.normal(k[2], (U + I, D))
    vals = jax.random.uniform(k[3], ref_graph.values.shape)  # a re-weighted graph (LayerGCN, SelfCF)
    rng = np.random.default_rng(1)
    batch = {name: jnp.asarray(rng.integers(0, n, 32)) for name, n in (("user", U), ("pos", I), ("neg", I))}

    def outputs(graph, x, vals):
        def scalar(k, x):
            return jnp.sum(jnp.sin(graph.layer_mean(x, k)) * w)
        out = {f"mean{k}": graph.layer_mean(x, k) for k in (1, 2, 3)}
        out.update({f"grad{k}": jax.grad(scalar, argnums=1)(k, x) for k in (1, 2, 3)})
        out["values"] = graph(x, vals)
        out["values_grad"] = jax.grad(lambda x: jnp.sum(jnp.sin(graph(x, vals)) * w))(x)
        out["hvp"] = jax.jvp(jax.grad(lambda x: scalar(2, x)), (x,), (v,))[1]  # forward-over-reverse
        return out

    class Reference:  # NormalizedGraph through models.graph.layer_mean
        def layer_mean(self, x, k):
            return layer_mean(x, k, ref_graph)
        def __call__(self, x, vals):
            return ref_graph(x, vals)

    def loss_grads_embed(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        f = jax.jit(jax.value_and_grad(lambda p, r: nnx.merge(graphdef, p, r).loss(batch, jax.random.key(3))))
        loss, grads = f(params, rest)
        embed = jax.jit(lambda p, r: nnx.merge(graphdef, p, r).embed())(params, rest)
        return loss, jax.tree.leaves(grads), embed

    def rel(a, b):
        return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

    reference = jax.jit(lambda x, vals: outputs(Reference(), x, vals))(x, vals)
    model = LightGCN(inter, rngs=nnx.Rngs(0), n_layers=3)
    ref_loss, ref_grads, _ = loss_grads_embed(model)
    results = {}
    for n_dev, chunk, remat in ((1, None, False), (2, 40, False), (4, None, True), (8, 40, True), (8, None, False)):
        g = ShardedGraph(inter, make_mesh(n_dev), chunk_edges=chunk, remat=remat, coo_values=True)
        got = jax.jit(lambda x, vals: outputs(g, x, vals))(x, vals)
        errors = {name: rel(got[name], reference[name]) for name in reference}
        model.graph = g  # the hook: LightGCN's own forward, loss and gradients on the sharded graph
        loss, grads, _ = loss_grads_embed(model)
        errors["lightgcn_loss"] = float(abs(loss - ref_loss) / abs(ref_loss))
        errors["lightgcn_grads"] = max(rel(a, b) for a, b in zip(grads, ref_grads))
        results[f"{n_dev}x{chunk}{'-remat' if remat else ''}"] = {
            "errors": errors, "chunks": g.n_chunks, "devices": g.devices,
            "edge_devices": len(g.edge_user[...].sharding.device_set),
        }

    # the other graph models, unchanged but for their graph (LayerGCN and SelfCF re-weight its COO values)
    features = {"text": rng.normal(size=(I, 6)).astype(np.float32), "image": rng.normal(size=(I, 5)).astype(np.float32)}
    inter = Interactions(U, I, users, items, features)
    for name, hparams in (("layergcn", {"dropout": 0.2}), ("selfcf", {}), ("bm3", {})):
        model = models.get_model(name)(inter, rngs=nnx.Rngs(0), **hparams)
        if name == "layergcn":
            model.pre_epoch(jax.random.key(5), 0)  # an edge-dropout epoch
        ref = loss_grads_embed(model)
        model.graph = ShardedGraph(inter, make_mesh(4), chunk_edges=40, coo_values=True)
        got = loss_grads_embed(model)
        results[f"model-{name}"] = {
            "loss": float(abs(got[0] - ref[0]) / abs(ref[0])),
            "grads": max(rel(a, b) for a, b in zip(got[1], ref[1])),
            "embed": max(rel(a, b) for a, b in zip(got[2], ref[2])),
        }
    print(json.dumps(results))
    """
  )
)

MEMORY = (
  "import numpy as np\n\n"
  + inspect.getsource(skewed_pairs)
  + textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp
    from flax import nnx
    from benchmarks.parallel.graph import ShardedGraph
    from benchmarks.parallel.mesh import make_mesh
    from models.common import Interactions

    U, I, E, D, L = 4000, 3000, 40000, 32, 2
    users, items = skewed_pairs(U, I, E)
    inter = Interactions(U, I, users, items)
    results = {}
    for chunk in (512, None):
        g = ShardedGraph(inter, make_mesh(8), chunk_edges=chunk)
        su, si = g.layout_shardings()
        xu = jax.ShapeDtypeStruct((g.devices * g.users_per_device, D), jnp.float32, sharding=su)
        xi = jax.ShapeDtypeStruct((g.devices * g.items_per_device, D), jnp.float32, sharding=si)
        graphdef, state = nnx.split(g)

        def forward(state, xu, xi):
            return nnx.merge(graphdef, state).propagate_layout(xu, xi, L)

        def train(state, xu, xi):
            def loss(xu, xi):
                u, i = nnx.merge(graphdef, state).propagate_layout(xu, xi, L)
                return jnp.sum(jnp.sin(u)) + jnp.sum(jnp.sin(i))
            return jax.value_and_grad(loss, argnums=(0, 1))(xu, xi)

        for name, f in (("forward", forward), ("train", train)):
            m = jax.jit(f).lower(state, xu, xi).compile().memory_analysis()
            compiled = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
            model = g.memory_bytes(D, L, train=name == "train")
            results[f"{name}-{chunk}"] = {
                "compiled": int(compiled), "model": model, "ratio": model["total"] / compiled,
                "argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
                "temp": int(m.temp_size_in_bytes), "chunks": g.n_chunks,
            }
    print(json.dumps(results))
    """
  )
)


def _run(script: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def equivalence():
  return _run(EQUIVALENCE)


@pytest.fixture(scope="module")
def memory():
  return _run(MEMORY)


def _configs(equivalence):
  return {k: v for k, v in equivalence.items() if not k.startswith("model-")}


def test_runs_on_1_2_4_8_devices_with_and_without_chunks(equivalence):
  equivalence = _configs(equivalence)
  assert {r["devices"] for r in equivalence.values()} == {1, 2, 4, 8}
  assert {r["chunks"] > 1 for r in equivalence.values()} == {True, False}
  assert all(r["edge_devices"] == r["devices"] for r in equivalence.values())  # each device holds its own block


@pytest.mark.parametrize("name", ["mean1", "mean2", "mean3", "values"])
def test_sharded_propagation_equals_unsharded(equivalence, name):
  for config, r in _configs(equivalence).items():
    assert r["errors"][name] <= TOL, (config, r["errors"])


@pytest.mark.parametrize("name", ["grad1", "grad2", "grad3", "values_grad", "hvp"])
def test_sharded_gradients_equal_unsharded(equivalence, name):
  for config, r in _configs(equivalence).items():
    assert r["errors"][name] <= TOL, (config, r["errors"])


def test_lightgcn_loss_and_gradients_with_sharded_graph_equal_the_models(equivalence):
  for config, r in _configs(equivalence).items():
    assert r["errors"]["lightgcn_loss"] <= TOL, (config, r["errors"])
    assert r["errors"]["lightgcn_grads"] <= TOL, (config, r["errors"])


@pytest.mark.parametrize("name", ["layergcn", "selfcf", "bm3"])
def test_other_graph_models_take_the_sharded_graph_unchanged(equivalence, name):
  """``model.graph = ShardedGraph(..., coo_values=True)`` on 4 devices: loss, gradients and embed() unchanged."""
  r = equivalence[f"model-{name}"]
  assert max(r.values()) <= TOL, r


def test_memory_model_matches_the_compiler(memory):
  """The model against ``memory_analysis()`` (arguments + outputs + temporaries) on 8 host devices.

  Measured (U, I, E, d, L = 4000, 3000, 40000, 32, 2; model / compiler): train 1.018 with 10 chunks of
  512 edges, 1.029 with one chunk; forward 1.042 with chunks. Forward with one chunk: 1.159 -- the model
  counts the gathered item table and both passes' message arrays, but XLA:CPU puts the second message
  array in the gathered table's buffer once the user pass has read it, so the model is high by about
  that table: asserted as an over-estimate of at most 25 %, not within 15 %.
  """
  for key, r in memory.items():
    assert r["model"]["edges"] + r["model"]["degrees"] + r["model"]["tables"] // 2 == r["argument"], (key, r)
    if key == "forward-None":
      assert 1.0 <= r["ratio"] <= 1.25, (key, r["ratio"])
    else:
      assert 0.85 <= r["ratio"] <= 1.15, (key, r["ratio"])
