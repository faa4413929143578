"""Tests for mirror_optax.flatness (HVPs, top Hessian eigenvalue, loss landscapes).

Exactness checks run in float64 inside ``jax.enable_x64(True)`` context managers so
that x64 does not leak to other test modules in the same pytest process.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_optax import flatness

# Quadratic on a 7-dim vector split across a pytree: {"a": (3,), "b": (2, 2)}.
_DIM = 7


def _sym_matrix(eigenvalues, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
  return q @ np.diag(eigenvalues) @ q.T


def _flatten(tree):
  return jnp.concatenate([jnp.ravel(tree["a"]), jnp.ravel(tree["b"])])


def _unflatten(x):
  return {"a": x[:3], "b": x[3:].reshape(2, 2)}


def _quadratic(a_mat):
  a_mat = jnp.asarray(a_mat)

  def loss_fn(params):
    x = _flatten(params)
    return 0.5 * x @ a_mat @ x

  return loss_fn


def _params(seed=1, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return _unflatten(jnp.asarray(rng.normal(size=_DIM), dtype))


# Spectrum with a clear largest-magnitude eigenvalue (positive) ...
_EIGS_POS = [6.0, 2.5, -2.0, 1.0, 0.5, -0.3, 0.1]
# ... and one whose largest-magnitude eigenvalue is negative.
_EIGS_NEG = [3.0, -7.0, 2.0, 1.0, -0.5, 0.2, 0.0]


def _largest_magnitude(a_mat):
  w, v = np.linalg.eigh(a_mat)
  i = np.argmax(np.abs(w))
  return w[i], v[:, i]


# ----------------------------------------------------------------------------
# Hessian-vector products.
# ----------------------------------------------------------------------------


def test_hvp_single_leaf_equals_matrix_vector():
  with jax.enable_x64(True):
    a_mat = _sym_matrix(_EIGS_POS)
    loss_fn = lambda x: 0.5 * x @ jnp.asarray(a_mat) @ x
    x = jnp.arange(_DIM, dtype=jnp.float64)
    v = jnp.linspace(-1.0, 1.0, _DIM)
    hv = flatness.hessian_vector_product(loss_fn, x, v)
    np.testing.assert_allclose(hv, a_mat @ np.asarray(v), rtol=1e-12, atol=1e-12)


def test_hvp_pytree_equals_matrix_vector():
  with jax.enable_x64(True):
    a_mat = _sym_matrix(_EIGS_POS)
    v = _params(seed=5)
    hv = flatness.hessian_vector_product(_quadratic(a_mat), _params(), v)
    chex.assert_trees_all_equal_shapes_and_dtypes(hv, v)
    expected = a_mat @ np.asarray(_flatten(v))
    np.testing.assert_allclose(_flatten(hv), expected, rtol=1e-12, atol=1e-12)


def test_hvp_rejects_mismatched_vector():
  params = _params(dtype=jnp.float32)
  loss_fn = _quadratic(np.eye(_DIM, dtype=np.float32))
  with pytest.raises(ValueError, match="structure"):
    flatness.hessian_vector_product(loss_fn, params, {"a": params["a"]})
  with pytest.raises(ValueError, match="shape"):
    flatness.hessian_vector_product(loss_fn, params, {"a": params["a"], "b": jnp.zeros(4)})


# ----------------------------------------------------------------------------
# Top Hessian eigenvalue.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("eigs", [_EIGS_POS, _EIGS_NEG], ids=["positive", "negative"])
def test_top_eigenvalue_matches_eigh(eigs):
  with jax.enable_x64(True):
    a_mat = _sym_matrix(eigs, seed=3)
    lam_ref, vec_ref = _largest_magnitude(a_mat)
    res = flatness.top_hessian_eigenvalue(_quadratic(a_mat), _params(), key=jax.random.PRNGKey(0), num_iters=60)
    assert isinstance(res, flatness.HessianEigenResult)
    np.testing.assert_allclose(res.eigenvalue, lam_ref, rtol=1e-4)
    assert int(res.num_iters) == 60
    vec = np.asarray(_flatten(res.eigenvector))
    np.testing.assert_allclose(np.linalg.norm(vec), 1.0, rtol=1e-10)
    assert abs(vec @ vec_ref) > 0.999
    chex.assert_trees_all_equal_shapes_and_dtypes(res.eigenvector, _params())


def test_top_eigenvalue_under_jit_and_tol():
  with jax.enable_x64(True):
    a_mat = _sym_matrix(_EIGS_POS, seed=4)
    lam_ref, _ = _largest_magnitude(a_mat)
    loss_fn = _quadratic(a_mat)

    @jax.jit
    def run(params, key):
      return flatness.top_hessian_eigenvalue(loss_fn, params, key=key, num_iters=100, tol=1e-10)

    res = run(_params(), jax.random.PRNGKey(1))
    np.testing.assert_allclose(res.eigenvalue, lam_ref, rtol=1e-4)
    assert 1 <= int(res.num_iters) < 100  # tol stopped it early


def test_top_eigenvalue_float32():
  a_mat = _sym_matrix(_EIGS_POS, seed=2).astype(np.float32)
  lam_ref, _ = _largest_magnitude(a_mat.astype(np.float64))
  params = _params(dtype=jnp.float32)
  res = jax.jit(
    lambda p: flatness.top_hessian_eigenvalue(_quadratic(a_mat), p, key=jax.random.PRNGKey(0), num_iters=40)
  )(params)
  assert res.eigenvalue.dtype == jnp.float32
  chex.assert_trees_all_equal_shapes_and_dtypes(res.eigenvector, params)
  np.testing.assert_allclose(res.eigenvalue, lam_ref, rtol=1e-4)


def test_top_eigenvalue_zero_hessian_is_zero():
  params = _params(dtype=jnp.float32)
  res = flatness.top_hessian_eigenvalue(
    lambda p: jnp.sum(p["a"]) + jnp.sum(p["b"]),
    params,
    key=jax.random.PRNGKey(0),
    num_iters=3,
  )
  assert float(res.eigenvalue) == 0.0
  assert np.all(np.isfinite(_flatten(res.eigenvector)))


def test_top_eigenvalue_errors():
  params = _params(dtype=jnp.float32)
  loss_fn = _quadratic(np.eye(_DIM, dtype=np.float32))
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="num_iters"):
    flatness.top_hessian_eigenvalue(loss_fn, params, key=key, num_iters=0)
  with pytest.raises(ValueError, match="num_iters"):
    flatness.top_hessian_eigenvalue(loss_fn, params, key=key, num_iters=2.5)
  with pytest.raises(ValueError, match="tol"):
    flatness.top_hessian_eigenvalue(loss_fn, params, key=key, tol=-1.0)
  with pytest.raises(ValueError, match="floating"):
    flatness.top_hessian_eigenvalue(loss_fn, {"a": params["a"], "b": jnp.zeros((2, 2), jnp.int32)}, key=key)


# ----------------------------------------------------------------------------
# Directions and filter normalisation.
# ----------------------------------------------------------------------------


def _net_params():
  rng = np.random.default_rng(0)
  return {
    "emb": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    },
    "conv": jnp.asarray(rng.normal(size=(2, 2, 3, 4)), jnp.bfloat16),
  }


def test_random_directions_deterministic_and_shaped():
  params = _net_params()
  d1, d2 = flatness.random_directions(params, jax.random.PRNGKey(7))
  e1, e2 = flatness.random_directions(params, jax.random.PRNGKey(7))
  f1, _ = flatness.random_directions(params, jax.random.PRNGKey(8))
  chex.assert_trees_all_equal((d1, d2), (e1, e2))
  chex.assert_trees_all_equal_shapes_and_dtypes(d1, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(d2, params)
  assert not np.allclose(d1["emb"], d2["emb"])
  assert not np.allclose(d1["emb"], f1["emb"])


def _filters(x, axis):
  """(n_filters, rest) float64 view of a leaf, one filter per row."""
  x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
  return x.reshape(x.shape[0], -1)


@pytest.mark.parametrize("filter_axis", [0, -1])
def test_filter_normalisation_row_norms(filter_axis):
  params = _net_params()
  d1, d2 = flatness.random_directions(params, jax.random.PRNGKey(3), filter_normalize=True, filter_axis=filter_axis)
  for d in (d1, d2):
    chex.assert_trees_all_equal_shapes_and_dtypes(d, params)
    for name, p, dl in (
      ("emb", params["emb"], d["emb"]),
      ("kernel", params["dense"]["kernel"], d["dense"]["kernel"]),
      ("conv", params["conv"], d["conv"]),
    ):
      p64 = _filters(p, filter_axis)
      d64 = _filters(dl, filter_axis)
      rtol = 1e-2 if p.dtype == jnp.bfloat16 else 1e-5
      np.testing.assert_allclose(
        np.linalg.norm(d64, axis=1),
        np.linalg.norm(p64, axis=1),
        rtol=rtol,
        err_msg=name,
      )
    np.testing.assert_array_equal(d["dense"]["bias"], 0.0)  # 1-D leaves are not moved


def test_filter_axis_out_of_range():
  params = _net_params()
  d1, _ = flatness.random_directions(params, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="filter_axis"):
    flatness.filter_normalize_direction(d1, params, filter_axis=2)  # "emb" is 2-D


def test_filter_normalisation_idempotent_and_zero_rows():
  params = {"emb": jnp.asarray([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])}
  raw, _ = flatness.random_directions(params, jax.random.PRNGKey(0))
  once = flatness.filter_normalize_direction(raw, params)
  twice = flatness.filter_normalize_direction(once, params)
  np.testing.assert_allclose(np.linalg.norm(once["emb"], axis=1), [5.0, 0.0, 1.0], rtol=1e-6)
  chex.assert_trees_all_close(once, twice, rtol=1e-6)
  # Direction of each row preserved (positive rescaling).
  cos = np.sum(np.asarray(once["emb"][0]) * np.asarray(raw["emb"][0]))
  assert cos > 0


# ----------------------------------------------------------------------------
# Loss landscape.
# ----------------------------------------------------------------------------


def _closed_form(a_mat, params, d1, d2, xs, ys):
  p, u, w = (np.asarray(_flatten(t), np.float64) for t in (params, d1, d2))
  out = np.empty((len(xs), len(ys)))
  for i, m in enumerate(xs):
    for j, n in enumerate(ys):
      x = p + m * u + n * w
      out[i, j] = 0.5 * x @ a_mat @ x
  return out


def test_landscape_matches_closed_form():
  with jax.enable_x64(True):
    a_mat = _sym_matrix(_EIGS_POS, seed=6)
    params = _params()
    loss_fn = _quadratic(a_mat)
    xs = np.linspace(-1.0, 1.0, 5)
    ys = np.linspace(-0.5, 2.0, 4)  # different length: checks the (xs, ys) orientation
    d1, d2 = flatness.random_directions(params, jax.random.PRNGKey(2))
    z = flatness.loss_landscape(loss_fn, params, grid=(xs, ys), directions=(d1, d2))
    assert z.shape == (5, 4)
    np.testing.assert_allclose(z, _closed_form(a_mat, params, d1, d2, xs, ys), rtol=1e-12)
    # Single grid for both axes, directions drawn from the same key.
    zk = flatness.loss_landscape(loss_fn, params, grid=xs, key=jax.random.PRNGKey(2))
    np.testing.assert_allclose(zk, _closed_form(a_mat, params, d1, d2, xs, xs), rtol=1e-12)
    np.testing.assert_allclose(zk[2, 2], loss_fn(params), rtol=1e-12)  # centre = loss(params)
    # Batched evaluation (7 does not divide 20 points) gives the same values.
    zb = flatness.loss_landscape(loss_fn, params, grid=(xs, ys), directions=(d1, d2), batch_size=7)
    np.testing.assert_allclose(zb, z, rtol=1e-12)


def test_landscape_filter_normalised_directions():
  with jax.enable_x64(True):
    a_mat = _sym_matrix(_EIGS_POS, seed=6)
    params = _params()
    loss_fn = _quadratic(a_mat)
    xs = np.linspace(-1.0, 1.0, 3)
    raw = flatness.random_directions(params, jax.random.PRNGKey(4))
    n1, n2 = (flatness.filter_normalize_direction(d, params) for d in raw)
    np.testing.assert_array_equal(n1["a"], 0.0)  # 1-D leaf "a" is held fixed
    z = flatness.loss_landscape(loss_fn, params, grid=xs, directions=raw, filter_normalize=True)
    np.testing.assert_allclose(z, _closed_form(a_mat, params, n1, n2, xs, xs), rtol=1e-12)
    zk = flatness.loss_landscape(loss_fn, params, grid=xs, key=jax.random.PRNGKey(4), filter_normalize=True)
    np.testing.assert_allclose(zk, z, rtol=1e-12)


def test_landscape_under_jit_float32():
  params = _params(dtype=jnp.float32)
  a_mat = _sym_matrix(_EIGS_POS, seed=6).astype(np.float32)
  loss_fn = _quadratic(a_mat)
  grid = jnp.linspace(-1.0, 1.0, 4)
  z = jax.jit(lambda p, g: flatness.loss_landscape(loss_fn, p, grid=g, key=jax.random.PRNGKey(0)))(params, grid)
  assert z.shape == (4, 4) and z.dtype == jnp.float32
  d1, d2 = flatness.random_directions(params, jax.random.PRNGKey(0))
  np.testing.assert_allclose(z, _closed_form(a_mat.astype(np.float64), params, d1, d2, grid, grid), rtol=1e-4)


def test_landscape_errors():
  params = _params(dtype=jnp.float32)
  loss_fn = _quadratic(np.eye(_DIM, dtype=np.float32))
  key = jax.random.PRNGKey(0)
  grid = jnp.linspace(-1.0, 1.0, 3)
  dirs = flatness.random_directions(params, key)
  with pytest.raises(ValueError, match="1-D"):
    flatness.loss_landscape(loss_fn, params, grid=jnp.zeros((3, 3)), key=key)
  with pytest.raises(ValueError, match="1-D"):
    flatness.loss_landscape(loss_fn, params, grid=1.0, key=key)
  with pytest.raises(ValueError, match="empty"):
    flatness.loss_landscape(loss_fn, params, grid=jnp.zeros((0,)), key=key)
  with pytest.raises(ValueError, match="key"):
    flatness.loss_landscape(loss_fn, params, grid=grid)
  with pytest.raises(ValueError, match="not both"):
    flatness.loss_landscape(loss_fn, params, grid=grid, directions=dirs, key=key)
  with pytest.raises(ValueError, match="pair"):
    flatness.loss_landscape(loss_fn, params, grid=grid, directions=dirs[0])
  with pytest.raises(ValueError, match="structure"):
    flatness.loss_landscape(loss_fn, params, grid=grid, directions=({"a": params["a"]}, dirs[1]))
  with pytest.raises(ValueError, match="shape"):
    bad = {"a": jnp.zeros(4), "b": params["b"]}
    flatness.loss_landscape(loss_fn, params, grid=grid, directions=(dirs[0], bad))
  with pytest.raises(ValueError, match="scalar"):
    flatness.loss_landscape(lambda p: p["a"], params, grid=grid, key=key)
  with pytest.raises(ValueError, match="batch_size"):
    flatness.loss_landscape(loss_fn, params, grid=grid, key=key, batch_size=0)
