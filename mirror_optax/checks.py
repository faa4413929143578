"""Argument checks shared by the transformations and the flatness tools of ``mirror_optax``.

Two kinds of check recur across the library:

* hyper-parameters that may be concrete (Python numbers, NumPy or concrete JAX arrays: checkable when
  the transformation is built) or traced (under ``jit``, e.g. what ``optax.inject_hyperparams`` passes):
  :func:`concrete_float` tells them apart;
* a tree that must match ``params`` leaf for leaf (a second gradient, a Hessian-vector direction, a
  landscape direction): :func:`check_like_params` raises a ``ValueError`` naming the offending leaf by
  its key path, and :func:`cast_like_params` also casts the leaves to the parameter dtypes.

The checks run in Python, on shapes and dtypes, so under ``jit`` they run once, at trace time.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

__all__ = ["cast_like_params", "check_like_params", "concrete_float"]


def concrete_float(value: Any) -> Optional[float]:
  """``float(value)`` if the value is known at trace time, else ``None`` (e.g. a tracer).

  Args:
    value: a hyper-parameter: a Python number, a NumPy or JAX scalar, or a tracer.

  Returns:
    The value as a Python float, or ``None`` when it is only known at run time.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from mirror_optax.checks import concrete_float
    >>> concrete_float(3), concrete_float(jnp.asarray(0.5))
    (3.0, 0.5)
    >>> def f(x):
    ...   print(concrete_float(x))  # under jit, x is a tracer
    ...   return x
    >>> _ = jax.jit(f)(1.0)
    None
  """
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _short(treedef: Any, limit: int = 300) -> str:
  text = str(treedef)
  return text if len(text) <= limit else text[:limit] + "..."


def _first(keys: list[str], n: int = 5) -> str:
  return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


def check_like_params(tree: Any, params: Any, what: str) -> list[tuple[str, Any, Any]]:
  """Raises ``ValueError`` unless ``tree`` has the tree structure and leaf shapes of ``params``.

  Args:
    tree: the tree to check.
    params: the reference tree.
    what: how the messages name ``tree``, e.g. ``"mirror_gradient: the second gradient (from grad_fn)"``.

  Returns:
    ``(where, param_leaf, tree_leaf)`` for every leaf, in ``params`` order; ``where`` names the leaf as
    ``params`` plus its key path, e.g. ``"params['w']"``.

  Raises:
    ValueError: another tree structure (the message gives both structures and the leaves missing or
      extra by key path) or a leaf of another shape (the message names the leaf and both shapes).

  Example:
    >>> import jax.numpy as jnp
    >>> from mirror_optax.checks import check_like_params
    >>> params = {"b": jnp.zeros(()), "w": jnp.zeros(3)}
    >>> [where for where, _, _ in check_like_params(params, params, "`grads`")]
    ["params['b']", "params['w']"]
    >>> check_like_params({"b": jnp.zeros(()), "w": jnp.zeros((1, 3))}, params, "`grads`")
    Traceback (most recent call last):
    ...
    ValueError: `grads` has shape (1, 3) at params['w'], but the parameter has shape (3,); it must be shaped like params.
  """
  param_leaves, param_def = jax.tree_util.tree_flatten_with_path(params)
  tree_leaves, tree_def = jax.tree_util.tree_flatten_with_path(tree)
  if tree_def != param_def:
    param_keys = [jax.tree_util.keystr(k) for k, _ in param_leaves]
    tree_keys = [jax.tree_util.keystr(k) for k, _ in tree_leaves]
    missing = [k for k in param_keys if k not in set(tree_keys)]
    extra = [k for k in tree_keys if k not in set(param_keys)]
    detail = f"; leaves of params missing from it: {_first(missing)}" if missing else ""
    detail += f"; leaves not in params: {_first(extra)}" if extra else ""
    raise ValueError(
      f"{what} must have the tree structure of params; expected {_short(param_def)}, got {_short(tree_def)}{detail}."
    )
  out = []
  for (path, p), (_, t) in zip(param_leaves, tree_leaves):
    where = "params" + jax.tree_util.keystr(path)
    if jnp.shape(t) != jnp.shape(p):
      raise ValueError(
        f"{what} has shape {jnp.shape(t)} at {where}, but the parameter has shape {jnp.shape(p)}; "
        "it must be shaped like params."
      )
    out.append((where, p, t))
  return out


def cast_like_params(tree: Any, params: Any, what: str) -> Any:
  """:func:`check_like_params`, then casts every leaf of ``tree`` to the dtype of its parameter.

  A leaf already of the parameter's dtype is returned as it is; a complex leaf for a real parameter
  raises rather than silently dropping its imaginary part.

  Args:
    tree: the tree to check and cast (e.g. a gradient).
    params: the reference tree.
    what: how the messages name ``tree``.

  Returns:
    ``tree`` with the tree structure of ``params`` and, leaf for leaf, its dtypes.

  Raises:
    ValueError: as :func:`check_like_params`, or a complex leaf for a real parameter.
  """
  checked = check_like_params(tree, params, what)
  out = []
  for where, p, t in checked:
    p_dtype, t_dtype = jnp.result_type(p), jnp.result_type(t)  # canonical: what the arrays hold
    if t_dtype != p_dtype:
      if jnp.issubdtype(t_dtype, jnp.complexfloating) and not jnp.issubdtype(p_dtype, jnp.complexfloating):
        raise ValueError(f"{what} is complex ({t_dtype}) at {where}, but the parameter is real ({p_dtype}).")
      t = jnp.asarray(t).astype(p_dtype)
    out.append(t)
  return jax.tree.unflatten(jax.tree.structure(tree), out)
