"""Tests for models/graph.py: normalised adjacency and the propagation kernels."""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import graph
from models.common import GraphConstant

N_USERS, N_ITEMS = 5, 7
# user 4 and item 6 have no interactions; (0, 1) appears twice (binary graph: counted once).
USERS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 0], np.int32)
ITEMS = np.array([0, 1, 2, 2, 3, 1, 4, 5, 0, 1], np.int32)


def dense_reference(users, items, n_users, n_items) -> np.ndarray:
  """D^-1/2 A D^-1/2 computed densely from the formula (float64)."""
  n = n_users + n_items
  a = np.zeros((n, n))
  for u, i in zip(users, items):
    a[u, n_users + i] = 1.0
    a[n_users + i, u] = 1.0
  d = (a.sum(axis=1) + 1e-7) ** -0.5
  return d[:, None] * a * d[None, :]


def to_dense(rows, cols, vals, n) -> np.ndarray:
  out = np.zeros((n, n))
  np.add.at(out, (rows, cols), vals)
  return out


def test_normalized_adjacency_matches_dense_formula():
  rows, cols, vals = graph.normalized_adjacency(USERS, ITEMS, N_USERS, N_ITEMS)
  n = N_USERS + N_ITEMS
  np.testing.assert_allclose(
    to_dense(rows, cols, vals, n), dense_reference(USERS, ITEMS, N_USERS, N_ITEMS), rtol=1e-6, atol=1e-7
  )
  assert rows.dtype == np.int32 and cols.dtype == np.int32 and vals.dtype == np.float32
  assert len(rows) == 2 * 9  # 9 unique pairs, both directions
  assert np.all(np.diff(rows.astype(np.int64) * n + cols) > 0)  # sorted by (row, col), unique
  assert not np.any(rows == cols)  # no self loops


def test_graph_module_variables_are_constants_and_dense_matches():
  g = graph.NormalizedGraph(USERS, ITEMS, N_USERS, N_ITEMS)
  assert not nnx.state(g, nnx.Param)  # nothing trainable
  assert set(nnx.state(g, GraphConstant).keys()) == {"rows", "cols", "values"}
  np.testing.assert_allclose(
    np.asarray(g.dense()), dense_reference(USERS, ITEMS, N_USERS, N_ITEMS), rtol=1e-6, atol=1e-7
  )


def test_kernel_table_and_type_agree():
  assert tuple(graph.KERNELS) == typing.get_args(graph.PropagationKernel) == ("chunked", "segment_sum", "sparse")
  assert graph.KERNELS["chunked"] is graph.propagate_chunked
  assert graph.KERNELS["segment_sum"] is graph.propagate_segment_sum
  assert graph.KERNELS["sparse"] is graph.propagate_sparse
  with pytest.raises(TypeError):
    graph.KERNELS["dense"] = graph.propagate_sparse  # one table, read-only
  assert graph.NormalizedGraph(USERS, ITEMS, N_USERS, N_ITEMS).kernel == "chunked"


@pytest.mark.parametrize("kernel", graph.KERNELS)
def test_propagation_forward_and_gradient_match_dense(kernel):
  g = graph.NormalizedGraph(USERS, ITEMS, N_USERS, N_ITEMS, kernel=kernel)
  assert g.kernel == kernel
  a = dense_reference(USERS, ITEMS, N_USERS, N_ITEMS)
  x = np.random.default_rng(0).normal(size=(N_USERS + N_ITEMS, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(g(jnp.asarray(x))), a @ x, rtol=1e-5, atol=1e-6)
  # d/dx 0.5 ||A x - c||^2 = A^T (A x - c)
  c = np.ones_like(x)
  grad = jax.grad(lambda z: 0.5 * jnp.sum(jnp.square(g(z) - c)))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(grad), a.T @ (a @ x - c), rtol=1e-5, atol=1e-6)
  # forward mode too (Hessian-vector products in mirror_optax.flatness are forward-over-reverse)
  _, tangent = jax.jvp(g, (jnp.asarray(x),), (jnp.asarray(c),))
  np.testing.assert_allclose(np.asarray(tangent), a @ c, rtol=1e-5, atol=1e-6)


def test_segment_sum_and_sparse_agree_on_random_graph():
  rng = np.random.default_rng(1)
  nu, ni = 40, 30
  u, i = rng.integers(0, nu, 200), rng.integers(0, ni, 200)
  rows, cols, vals = (jnp.asarray(a) for a in graph.normalized_adjacency(u, i, nu, ni))
  x = jnp.asarray(rng.normal(size=(nu + ni, 8)).astype(np.float32))

  def obj(prop, z):
    return jnp.sum(jnp.sin(graph.layer_mean(z, 3, lambda e: prop(e, rows, cols, vals))))

  for f in (
    lambda p, z: graph.layer_mean(z, 3, lambda e: p(e, rows, cols, vals)),
    lambda p, z: jax.grad(lambda w: obj(p, w))(z),
  ):
    a = jax.jit(lambda z: f(graph.propagate_segment_sum, z))(x)
    b = jax.jit(lambda z: f(graph.propagate_sparse, z))(x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_layer_mean_and_split():
  g = graph.NormalizedGraph(USERS, ITEMS, N_USERS, N_ITEMS)
  a = dense_reference(USERS, ITEMS, N_USERS, N_ITEMS)
  rng = np.random.default_rng(2)
  ue, ie = rng.normal(size=(N_USERS, 4)), rng.normal(size=(N_ITEMS, 4))
  e0 = np.concatenate([ue, ie])
  expect = (e0 + a @ e0 + a @ a @ e0) / 3
  u, i = g.mean_over_layers(jnp.asarray(ue, jnp.float32), jnp.asarray(ie, jnp.float32), 2)
  np.testing.assert_allclose(np.asarray(u), expect[:N_USERS], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(i), expect[N_USERS:], rtol=1e-5, atol=1e-6)
  u0, i0 = g.mean_over_layers(jnp.asarray(ue), jnp.asarray(ie), 0)
  np.testing.assert_allclose(np.asarray(u0), ue, rtol=1e-6)


@pytest.mark.parametrize("kernel", graph.KERNELS)
def test_propagation_with_other_values_on_the_same_pattern(kernel):
  """``g(x, values)``: the graph's sparsity pattern with other COO weights (LayerGCN / SelfCF training)."""
  g = graph.NormalizedGraph(USERS, ITEMS, N_USERS, N_ITEMS, kernel=kernel)
  rows, cols = np.asarray(g.rows[...]), np.asarray(g.cols[...])
  values = np.random.default_rng(3).random(rows.shape[0]).astype(np.float32)
  x = np.random.default_rng(4).normal(size=(N_USERS + N_ITEMS, 3)).astype(np.float32)
  expect = to_dense(rows, cols, values, N_USERS + N_ITEMS) @ x
  np.testing.assert_allclose(np.asarray(g(jnp.asarray(x), jnp.asarray(values))), expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(g(jnp.asarray(x), g.values[...])), np.asarray(g(jnp.asarray(x))))


def test_errors():
  with pytest.raises(ValueError, match=r"propagation kernel must be one of \('chunked', 'segment_sum', 'sparse'\)"):
    graph.NormalizedGraph(USERS, ITEMS, N_USERS, N_ITEMS, kernel="dense")
  with pytest.raises(TypeError):
    graph.NormalizedGraph(USERS, ITEMS, N_USERS, N_ITEMS, method="sparse")  # the old keyword is gone
  g = graph.NormalizedGraph(USERS, ITEMS, N_USERS, N_ITEMS)
  with pytest.raises(ValueError, match="n_users \\+ n_items"):
    g(jnp.zeros((3, 2)))
