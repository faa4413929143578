r"""Flatness tools: Hessian-vector products, top Hessian eigenvalue, loss landscapes.

Mirror Gradient is motivated by the claim that it drives training towards *flat*
minima (Zhong, Huang et al., WWW 2024, section 5, fig. 3). This module provides
the two standard, model-agnostic ways to check such a claim on any JAX loss
``loss_fn(params) -> scalar`` whose ``params`` is an arbitrary pytree of floating
point arrays (for instance the ``nnx.Param`` state of a Flax NNX model, with the
batch, model graph and non-trainable state closed over):

**Sharpness as a number.** The curvature of the loss at :math:`\theta` is the
Hessian :math:`H = \nabla^2 L(\theta)`; its largest eigenvalue is the usual scalar
measure of sharpness. :math:`H` is never materialised. A Hessian-vector product
(Pearlmutter, 1994) is the directional derivative of the gradient,

.. math::

   H v = \frac{\partial}{\partial \epsilon} \nabla L(\theta + \epsilon v) \Big|_{\epsilon=0},

computed forward-over-reverse (``jax.jvp`` of ``jax.grad``) at the cost of a small
multiple of one gradient. Power iteration on these products,

.. math::

   v_{k+1} = \frac{H v_k}{\lVert H v_k \rVert}, \qquad
   \lambda_k = v_k^\top H v_k \quad (\lVert v_k \rVert = 1),

(norms and inner products taken over the whole pytree, i.e. on the flattened
parameter vector) converges to the eigenvalue of largest **magnitude**
:math:`|\lambda|_{\max}` and its eigenvector, at a rate set by
:math:`|\lambda_2| / |\lambda_1|`. Near a minimum the Hessian is (close to) positive
semi-definite, and that eigenvalue is the largest one; away from a minimum it may
be a negative one — the sign of the returned Rayleigh quotient tells which.

**Sharpness as a picture.** Following Li et al. (2018), the loss is evaluated on
the plane spanned by two random Gaussian directions :math:`n_1, n_2` through
:math:`\theta`,

.. math::

   Z[i, j] = L(\theta + m_i n_1 + n_j n_2),

optionally after *filter normalisation*: each filter of a direction is rescaled to
the norm of the corresponding filter of the parameters,
:math:`d_{i,k} \leftarrow d_{i,k} \, \lVert \theta_{i,k} \rVert / \lVert d_{i,k} \rVert`,
which removes the scale invariance that otherwise makes landscapes of differently
scaled networks incomparable. Here a *filter* of a leaf with two or more
dimensions is one slice along ``filter_axis`` (default 0: one row — for a
recommender's embedding table, one user's or one item's embedding; for a PyTorch
``(out, in)`` weight, one output neuron as in Li et al.). Flax ``Dense`` kernels
are stored ``(in, out)`` and convolution kernels ``(..., in, out)``: pass
``filter_axis=-1`` to normalise per output unit as Li et al. do. Leaves with fewer
than two dimensions (biases, normalisation scales) get a **zero** direction under
filter normalisation, as in Li et al.'s experiments (biases and batch-norm
parameters are not perturbed; option ``biasbn`` of their reference code), so they
stay at their trained values on the whole plane.

References:
    Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation 6(1), 1994.
    Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets",
    NeurIPS 2018.
    Zhong, Huang et al., "Mirror Gradient: Towards Robust Multimodal Recommender
    Systems via Exploring Flat Local Minima", WWW 2024, section 5, fig. 3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mirror_optax.checks import check_like_params

__all__ = [
  "HessianEigenResult",
  "filter_normalize_direction",
  "hessian_vector_product",
  "loss_landscape",
  "random_directions",
  "top_hessian_eigenvalue",
]

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

# Li et al. guard the division with this constant; a zero parameter filter gives a
# zero direction filter.
_FILTER_EPS = 1e-10


class HessianEigenResult(NamedTuple):
  """Result of :func:`top_hessian_eigenvalue`.

  Attributes:
      eigenvalue: scalar Rayleigh quotient :math:`v^\\top H v` of the returned
          vector: the estimate of the Hessian eigenvalue of largest magnitude (it keeps
          its sign).
      eigenvector: unit-norm (global norm over all leaves) pytree with the structure,
          shapes and dtypes of ``params``. Its sign is arbitrary.
      num_iters: int32 scalar, the number of power-iteration steps performed (equal to
          the ``num_iters`` argument unless ``tol`` stopped the iteration earlier).
  """

  eigenvalue: jax.Array
  eigenvector: PyTree
  num_iters: jax.Array


# ----------------------------------------------------------------------------
# Pytree helpers.
# ----------------------------------------------------------------------------


def _accum_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype for reductions: at least float32 (bf16/f16 leaves)."""
  return jnp.promote_types(dtype, jnp.float32)


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Inner product of two pytrees, accumulated in at least float32."""
  terms = [
    jnp.sum(x.astype(_accum_dtype(x.dtype)) * y.astype(_accum_dtype(y.dtype)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ]
  return sum(terms[1:], terms[0])


def _tree_norm(a: PyTree) -> jax.Array:
  return jnp.sqrt(_tree_vdot(a, a))


def _tree_scale(tree: PyTree, scale: jax.Array) -> PyTree:
  return jax.tree.map(lambda x: (x * scale).astype(x.dtype), tree)


def _check_params(params: PyTree, name: str = "params") -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError(f"`{name}` has no array leaves; nothing to differentiate.")
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f"`{name}` must be a pytree of real floating-point arrays; leaf "
        f"{jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}. Close over "
        "integer / non-trainable state in `loss_fn` instead."
      )


def _gaussian_like(params: PyTree, key: jax.Array) -> PyTree:
  """Standard normal pytree with the structure, shapes and dtypes of `params`."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef,
    [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)],
  )


# ----------------------------------------------------------------------------
# Hessian-vector products and the top eigenvalue.
# ----------------------------------------------------------------------------


def hessian_vector_product(loss_fn: LossFn, params: PyTree, vector: PyTree) -> PyTree:
  r"""Hessian-vector product :math:`\nabla^2 L(\theta)\, v` (Pearlmutter, 1994).

  Forward-over-reverse: ``jax.jvp`` of ``jax.grad(loss_fn)`` at ``params`` in
  direction ``vector``. Costs a small constant times one gradient evaluation and
  never forms the Hessian.

  Args:
      loss_fn: ``loss_fn(params) -> scalar``. Close over data, keys and
          non-trainable state.
      params: pytree of floating-point arrays, the point :math:`\theta`.
      vector: pytree with the structure and leaf shapes of ``params`` (the direction
          :math:`v`); leaves are cast to the dtypes of the ``params`` leaves.

  Returns:
      :math:`H v`, a pytree like ``params``.

  Raises:
      ValueError: if ``vector`` does not match ``params`` or ``params`` has
          non-floating leaves.
  """
  _check_params(params)
  check_like_params(vector, params, "`vector`")
  vector = jax.tree.map(lambda v, p: jnp.asarray(v, jnp.result_type(p)), vector, params)
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def top_hessian_eigenvalue(
  loss_fn: LossFn,
  params: PyTree,
  *,
  key: jax.Array,
  num_iters: int = 20,
  tol: float | None = None,
) -> HessianEigenResult:
  r"""Hessian eigenvalue of largest magnitude, by power iteration on HVPs.

  Starting from a Gaussian vector drawn from ``key`` and normalised to unit global
  norm, repeats :math:`v \leftarrow Hv / \lVert Hv \rVert` and reports the Rayleigh
  quotient :math:`\lambda = v^\top H v` of the final vector. The Hessian is
  linearised once (``jax.linearize`` of ``jax.grad``) and each step is one
  forward-over-reverse Hessian-vector product, so the total cost is about
  ``num_iters + 1`` HVPs. The loop is a ``lax.fori_loop`` (or a ``lax.while_loop``
  when ``tol`` is given), so the function can be called under ``jax.jit`` with
  ``loss_fn`` closed over.

  Power iteration converges to the eigenvalue of largest **magnitude**, not the
  algebraically largest one: if the Hessian has a negative eigenvalue larger in
  absolute value than every positive one (a saddle, or far from a minimum), that
  negative eigenvalue is returned. Convergence is geometric in
  :math:`|\lambda_2/\lambda_1|`; with two eigenvalues of (nearly) equal magnitude
  and opposite sign it does not converge — check ``eigenvalue`` against a second
  ``key`` or a larger ``num_iters`` when in doubt.

  Args:
      loss_fn: ``loss_fn(params) -> scalar``, twice differentiable.
      params: pytree of floating-point arrays at which the Hessian is taken.
      key: PRNG key for the random start vector.
      num_iters: maximum number of power-iteration steps (>= 1), a Python int.
      tol: optional relative tolerance: stop once
          :math:`|\lambda_k - \lambda_{k-1}| \le \mathrm{tol}\,|\lambda_k|`. ``None``
          (default) always runs ``num_iters`` steps.

  Returns:
      A :class:`HessianEigenResult` ``(eigenvalue, eigenvector, num_iters)``; the
      eigenvector has the structure and dtypes of ``params``.

  Raises:
      ValueError: if ``num_iters < 1``, ``tol < 0`` or ``params`` has
          non-floating leaves.
  """
  if isinstance(num_iters, bool) or not isinstance(num_iters, int):
    raise ValueError(f"`num_iters` must be a Python int >= 1, got {num_iters!r}.")
  if num_iters < 1:
    raise ValueError(f"`num_iters` must be >= 1, got {num_iters}.")
  if tol is not None and not tol >= 0:
    raise ValueError(f"`tol` must be None or >= 0, got {tol!r}.")
  _check_params(params)

  # Linearise the gradient once; each call of `hvp` is then one HVP.
  _, hvp = jax.linearize(jax.grad(loss_fn), params)

  def normalise(w, fallback):
    norm = _tree_norm(w)
    safe = jnp.where(norm > 0, norm, 1.0)
    # A zero product (v in the null space, e.g. a zero Hessian) keeps v; its
    # Rayleigh quotient is then exactly 0.
    return jax.tree.map(lambda x, f: jnp.where(norm > 0, (x / safe).astype(x.dtype), f), w, fallback)

  v0 = _gaussian_like(params, key)
  v0 = _tree_scale(v0, 1.0 / _tree_norm(v0))
  hv0 = hvp(v0)
  lam0 = _tree_vdot(v0, hv0)

  def step(carry):
    v, hv, lam, _, i = carry
    v_new = normalise(hv, v)
    hv_new = hvp(v_new)
    return v_new, hv_new, _tree_vdot(v_new, hv_new), lam, i + 1

  init = (v0, hv0, lam0, lam0, jnp.asarray(0, jnp.int32))
  if tol is None:
    v, _, lam, _, iters = jax.lax.fori_loop(0, num_iters, lambda _, c: step(c), init)
  else:

    def cond(carry):
      _, _, lam, lam_prev, i = carry
      converged = jnp.abs(lam - lam_prev) <= tol * jnp.abs(lam)
      return (i < num_iters) & ((i == 0) | ~converged)

    v, _, lam, _, iters = jax.lax.while_loop(cond, step, init)
  return HessianEigenResult(eigenvalue=lam, eigenvector=v, num_iters=iters)


# ----------------------------------------------------------------------------
# Loss landscapes (Li et al., 2018).
# ----------------------------------------------------------------------------


def _filter_normalize_leaf(d: jax.Array, p: jax.Array, filter_axis: int) -> jax.Array:
  if jnp.ndim(p) < 2:
    return jnp.zeros_like(d)
  if not -jnp.ndim(p) <= filter_axis < jnp.ndim(p):
    raise ValueError(f"`filter_axis={filter_axis}` is out of range for a parameter leaf of shape {jnp.shape(p)}.")
  axis = filter_axis % jnp.ndim(p)
  reduce_axes = tuple(a for a in range(jnp.ndim(p)) if a != axis)
  acc = _accum_dtype(jnp.result_type(p))
  d_acc, p_acc = d.astype(acc), p.astype(acc)
  d_norm = jnp.sqrt(jnp.sum(d_acc * d_acc, axis=reduce_axes, keepdims=True))
  p_norm = jnp.sqrt(jnp.sum(p_acc * p_acc, axis=reduce_axes, keepdims=True))
  return (d_acc * (p_norm / (d_norm + _FILTER_EPS))).astype(d.dtype)


def filter_normalize_direction(direction: PyTree, params: PyTree, *, filter_axis: int = 0) -> PyTree:
  r"""Filter normalisation of one direction (Li et al., 2018, section 4).

  For every leaf with two or more dimensions, each filter (slice along
  ``filter_axis``; rows by default) of ``direction`` is rescaled to the Frobenius
  norm of the same filter of ``params``:
  :math:`d_k \leftarrow d_k \lVert \theta_k \rVert / (\lVert d_k \rVert + 10^{-10})`.
  Leaves with fewer than two dimensions (biases, norm scales, scalars) are set to
  zero, as Li et al. do for biases and batch-norm parameters. The operation is
  idempotent.

  Args:
      direction: pytree with the structure and leaf shapes of ``params``.
      params: the parameters the landscape is centred on.
      filter_axis: the axis whose slices are filters, for every leaf with >= 2
          dimensions. 0 (rows: embedding tables, PyTorch ``(out, in)`` weights) by
          default; -1 for Flax ``(in, out)`` kernels.

  Returns:
      The normalised direction, with the dtypes of ``direction``.
  """
  check_like_params(direction, params, "`direction`")
  if not isinstance(filter_axis, int) or isinstance(filter_axis, bool):
    raise ValueError(f"`filter_axis` must be an int, got {filter_axis!r}.")
  return jax.tree.map(
    lambda d, p: _filter_normalize_leaf(jnp.asarray(d), jnp.asarray(p), filter_axis),
    direction,
    params,
  )


def random_directions(
  params: PyTree,
  key: jax.Array,
  *,
  filter_normalize: bool = False,
  filter_axis: int = 0,
) -> tuple[PyTree, PyTree]:
  """Two independent Gaussian directions shaped like ``params``.

  Each leaf is standard normal with the shape and dtype of the matching ``params``
  leaf; the same ``key`` always gives the same directions, so several trained
  models with the same parameter shapes (plain / MG / SAM runs) can be plotted on
  the same random plane.

  With ``filter_normalize=True`` the directions are passed through
  :func:`filter_normalize_direction` and therefore **depend on ``params``** (only
  their scale per filter; the raw Gaussian draw depends on ``key`` and the shapes
  alone). To compare methods, draw raw directions once
  (``filter_normalize=False``) and let :func:`loss_landscape` normalise them
  against each model's own parameters (``filter_normalize=True`` there).

  Args:
      params: pytree of floating-point arrays.
      key: PRNG key.
      filter_normalize: apply filter normalisation against ``params``.
      filter_axis: see :func:`filter_normalize_direction`.

  Returns:
      ``(d1, d2)``, two pytrees like ``params``.
  """
  _check_params(params)
  k1, k2 = jax.random.split(key)
  d1, d2 = _gaussian_like(params, k1), _gaussian_like(params, k2)
  if filter_normalize:
    d1 = filter_normalize_direction(d1, params, filter_axis=filter_axis)
    d2 = filter_normalize_direction(d2, params, filter_axis=filter_axis)
  return d1, d2


def _parse_grid(grid: Any) -> tuple[jax.Array, jax.Array]:
  """A 1-D array (both axes) or a pair of 1-D arrays -> (xs, ys)."""
  if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(jnp.ndim(g) == 1 for g in grid):
    axes = (jnp.asarray(grid[0]), jnp.asarray(grid[1]))
  else:
    try:
      g = jnp.asarray(grid)
    except (TypeError, ValueError) as e:
      raise ValueError(f"`grid` must be a 1-D array of coefficients or a pair of 1-D arrays, got {grid!r}.") from e
    if g.ndim != 1:
      raise ValueError(
        "`grid` must be a 1-D array of coefficients (used for both axes) or a "
        f"pair (tuple/list) of 1-D arrays; got an array of shape {g.shape}."
      )
    axes = (g, g)
  for name, a in zip(("first", "second"), axes):
    if a.size == 0:
      raise ValueError(f"`grid` {name} axis is empty.")
    if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
      raise ValueError(f"`grid` {name} axis must be real numbers, got dtype {a.dtype}.")
  return axes


def loss_landscape(
  loss_fn: LossFn,
  params: PyTree,
  *,
  grid: Any,
  directions: tuple[PyTree, PyTree] | None = None,
  key: jax.Array | None = None,
  filter_normalize: bool = False,
  filter_axis: int = 0,
  batch_size: int | None = None,
) -> jax.Array:
  r"""Loss on the 2-D plane :math:`\theta + m\, n_1 + n\, n_2` (Li et al., 2018).

  Evaluates ``Z[i, j] = loss_fn(params + xs[i] * n1 + ys[j] * n2)`` for every pair
  of coefficients, vectorised with ``jax.vmap`` over grid points (all at once, or
  ``batch_size`` points at a time under ``lax.map`` to bound memory). ``Z`` is
  indexed ``ij`` (first axis: ``n1`` coefficients): for ``matplotlib`` use
  ``plt.contour(xs, ys, Z.T)``.

  Exactly one of ``directions`` and ``key`` must be given. With ``key`` the two
  directions are ``random_directions(params, key)``. With ``filter_normalize=True``
  the directions — drawn or given — are filter-normalised against ``params`` (see
  :func:`filter_normalize_direction`; leaves with < 2 dimensions are not moved).
  To plot several trained models on the same random plane, draw raw directions
  once with :func:`random_directions` and pass them to each call with
  ``filter_normalize=True``.

  Args:
      loss_fn: ``loss_fn(params) -> scalar``; data, keys and non-trainable state
          closed over.
      params: pytree of floating-point arrays, the centre of the plane.
      grid: 1-D array of coefficients used on both axes, or a pair ``(xs, ys)`` of
          1-D arrays (may differ in length).
      directions: optional pair ``(n1, n2)`` of pytrees like ``params``.
      key: PRNG key used to draw Gaussian directions when ``directions`` is None.
      filter_normalize: apply filter normalisation to the directions.
      filter_axis: see :func:`filter_normalize_direction`.
      batch_size: optional number of grid points evaluated per vectorised batch.

  Returns:
      Array of shape ``(len(xs), len(ys))`` with the loss values.

  Raises:
      ValueError: on a malformed ``grid``, missing/duplicate ``directions``/``key``,
          directions not matching ``params``, a non-scalar loss or a bad
          ``batch_size``.
  """
  _check_params(params)
  xs, ys = _parse_grid(grid)
  if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
    raise ValueError(f"`batch_size` must be None or an int >= 1, got {batch_size!r}.")

  if directions is None:
    if key is None:
      raise ValueError("Pass either `directions=(n1, n2)` or a PRNG `key` to draw them.")
    d1, d2 = random_directions(params, key)
  else:
    if key is not None:
      raise ValueError("Pass either `directions` or `key`, not both (`key` would be ignored).")
    if not isinstance(directions, (tuple, list)) or len(directions) != 2:
      raise ValueError(
        f"`directions` must be a pair (n1, n2) of pytrees shaped like `params`, got {type(directions).__name__}."
      )
    d1, d2 = directions
    check_like_params(d1, params, "`directions[0]`")
    check_like_params(d2, params, "`directions[1]`")
  if filter_normalize:
    d1 = filter_normalize_direction(d1, params, filter_axis=filter_axis)
    d2 = filter_normalize_direction(d2, params, filter_axis=filter_axis)

  out = jax.eval_shape(loss_fn, params)
  if not hasattr(out, "shape") or out.shape != ():
    raise ValueError(f"`loss_fn` must return a scalar; got {getattr(out, 'shape', type(out).__name__)}.")

  def point_loss(coeffs):
    def move(p, u, w):
      a, b = coeffs[0].astype(p.dtype), coeffs[1].astype(p.dtype)
      return p + a * u.astype(p.dtype) + b * w.astype(p.dtype)

    return loss_fn(jax.tree.map(move, params, d1, d2))

  dtype = jnp.result_type(xs.dtype, ys.dtype, float)
  mesh_x, mesh_y = jnp.meshgrid(xs.astype(dtype), ys.astype(dtype), indexing="ij")
  coeffs = jnp.stack([mesh_x.ravel(), mesh_y.ravel()], axis=-1)  # (P, 2)
  n_points = coeffs.shape[0]

  if batch_size is None or batch_size >= n_points:
    values = jax.vmap(point_loss)(coeffs)
  else:
    n_batches = -(-n_points // batch_size)
    pad = n_batches * batch_size - n_points
    padded = jnp.concatenate([coeffs, jnp.zeros((pad, 2), coeffs.dtype)])
    values = jax.lax.map(jax.vmap(point_loss), padded.reshape(n_batches, batch_size, 2))
    values = values.reshape(-1)[:n_points]
  return values.reshape(xs.shape[0], ys.shape[0])
