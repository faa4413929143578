"""Explicit gradient-norm penalty (GNP) as an Optax gradient transformation.

Theorem 3.2 of Mirror Gradient (Zhong, Huang et al., WWW 2024, eq. 6) says an SGD mirror step
descends, up to ``O(eta**3)``, ``(alpha1 - alpha2) L + (alpha1 alpha2 eta / 2) ||grad L||^2``: MG
penalises the gradient norm *implicitly*. :func:`gradient_norm_penalty` does it *explicitly*, as a
baseline to compare MG with. Beside the caller's gradient it costs one Hessian-vector product per step,
which forward-over-reverse computes for about two gradients: about three gradient evaluations a step
(SAM: two). It takes the same ``grad_fn(params, i)`` as MG and ``optax.contrib.sam``'s opaque mode, so
one closure drives plain, MG, SAM and GNP training.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

from mirror_optax.checks import check_like_params, concrete_float

__all__ = ["gradient_norm_penalty"]


def gradient_norm_penalty(
  optimizer: optax.GradientTransformation, penalty: float = 0.01
) -> optax.GradientTransformationExtraArgs:
  """Gradient-norm penalty: feeds ``optimizer`` the gradient of ``L + penalty * ||grad L||^2``.

  With ``g = grad L(params)`` the incoming gradient and ``H`` the Hessian of ``L`` at ``params``, the
  update is ``optimizer.update(g + 2 * penalty * H g, state, params)``; ``H g`` is the forward-mode
  derivative of ``grad_fn`` at ``params`` in the direction ``g``, so ``grad_fn`` must be
  differentiable, as ``jax.grad`` closures are.

  Args:
    optimizer: the optax transformation to wrap.
    penalty: weight of the squared gradient norm; must be >= 0 (0 gives plain training).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` with the state of ``optimizer``. Its
    ``update(grads, state, params, *, grad_fn, **extra_args)`` needs ``params`` and
    ``grad_fn(params, i) -> grads``, and ``grads`` must be the gradient at ``params``; other keyword
    arguments are forwarded to ``optimizer``.

  Raises:
    ValueError: ``penalty`` is negative (when known at trace time); ``update`` without ``params`` or
      ``grad_fn``, or with a ``grad_fn`` whose output differs from ``params`` in tree structure or
      leaf shapes.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from mirror_optax import gradient_norm_penalty
    >>> loss = lambda params: jnp.sum(params**4) / 4  # gradient params**3, Hessian diag(3 params**2)
    >>> tx = gradient_norm_penalty(optax.sgd(0.5), penalty=0.5)
    >>> params = jnp.array([1.0, 2.0])
    >>> grad_fn = lambda p, i: jax.grad(loss)(p)
    >>> updates, state = tx.update(grad_fn(params, 0), tx.init(params), params, grad_fn=grad_fn)
    >>> print(updates)  # -0.5 * (g + 2 * 0.5 * H g) = -0.5 * (p**3 + 3 * p**5)
    [ -2. -52.]

  References:
    Zhong, Huang, Wen, Qin, Li, Lin, `Mirror Gradient: Towards Robust Multimodal Recommender Systems
    via Exploring Flat Local Minima <https://github.com/Qrange-group/Mirror-Gradient>`_, WWW 2024
    (Theorem 3.2, eq. 6)

    Pearlmutter, Fast Exact Multiplication by the Hessian, Neural Computation 6(1), 1994
  """
  concrete = concrete_float(penalty)  # None when traced (inject_hyperparams under jit)
  if concrete is not None and not concrete >= 0:
    raise ValueError(f"gradient_norm_penalty: penalty must be >= 0, got penalty={penalty!r}.")
  inner = optax.with_extra_args_support(optimizer)

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: Optional[optax.Params] = None,
    *,
    grad_fn: Optional[Callable[[optax.Params, int], optax.Updates]] = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    if params is None or grad_fn is None:
      raise ValueError(
        "gradient_norm_penalty needs params and grad_fn: call "
        "tx.update(grads, state, params, grad_fn=lambda params, i: <gradient at params>)."
      )
    # grad ||grad L||^2 = 2 H g. H g is a Hessian-vector product (Pearlmutter, 1994): the derivative
    # of grad_fn at params in the direction g, by forward mode (jax.jvp), without forming H.
    _, hvp = jax.jvp(lambda p: grad_fn(p, 0), (params,), (updates,))
    # The product has grad_fn's tree and shapes: a leaf shaped unlike its parameter would broadcast.
    check_like_params(hvp, params, "gradient_norm_penalty: the gradient from grad_fn")
    penalised = jax.tree.map(lambda g, h: (g + 2 * penalty * h).astype(g.dtype), updates, hvp)
    return inner.update(penalised, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
