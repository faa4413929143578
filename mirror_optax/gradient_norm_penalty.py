"""Explicit gradient-norm penalty (GNP) as an Optax gradient transformation.

Theorem 3.2 of Mirror Gradient (Zhong, Huang et al., WWW 2024, eq. 6) says an SGD mirror step
descends, up to ``O(eta**3)``, the loss ``(alpha1 - alpha2) L + (alpha1 alpha2 eta / 2) ||grad L||^2``:
MG regularises the gradient norm *implicitly*. This transformation does it *explicitly*, as a
baseline to compare MG with: it feeds the inner optimizer the gradient of::

    L_GNP(theta) = L(theta) + penalty * ||grad L(theta)||^2,
    grad L_GNP   = g + 2 * penalty * H g,             g = grad L(theta), H = hess L(theta)

where the Hessian-vector product ``H g`` is the forward-mode derivative (``jax.jvp``) of the
caller's ``grad_fn`` at ``theta`` in the direction ``g`` (Pearlmutter, 1994) -- so ``grad_fn`` must be
differentiable, as ``jax.grad`` closures are. Cost: one gradient plus one Hessian-vector product per
update (about two gradient evaluations, like SAM). ``grad_fn(params, i)`` has the signature of
``optax.contrib.sam``'s opaque mode, so the same closure drives plain, MG, SAM and GNP training.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

__all__ = ["gradient_norm_penalty"]


def gradient_norm_penalty(
  optimizer: optax.GradientTransformation, penalty: float = 0.01
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``optimizer`` so it descends ``L + penalty * ||grad L||^2`` (see module docstring).

  Args:
    optimizer: any optax transformation.
    penalty: weight of the squared gradient norm; must be >= 0 (0 gives plain training).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update(grads, state, params, *, grad_fn,
    **extra_args)`` needs ``params`` and ``grad_fn(params, i) -> grads``; the incoming ``grads`` must
    be the gradient at ``params``. The state is the inner optimizer's.

  Raises:
    ValueError: ``penalty`` is negative.
  """
  try:
    concrete = float(penalty)
  except (TypeError, jax.errors.ConcretizationTypeError):
    concrete = None
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
    _, hvp = jax.jvp(lambda p: grad_fn(p, 0), (params,), (updates,))
    penalised = jax.tree.map(lambda g, h: (g + 2 * penalty * h).astype(g.dtype), updates, hvp)
    return inner.update(penalised, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
