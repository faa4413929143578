"""Training methods by name: plain, Mirror Gradient, SAM and an explicit gradient-norm penalty.

Every method is an optax ``GradientTransformationExtraArgs`` driven the same way::

    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

with ``grad_fn(params, i)`` the gradient of the batch loss at ``params`` (optax.contrib.sam's
opaque-mode signature). Plain training ignores ``grad_fn`` (``optax.with_extra_args_support``);
MG (``mirror_optax.mirror_gradient``) calls it on mirror steps; SAM
(``optax.contrib.sam(opaque_mode=True)`` with a normalised ascent of radius ``rho``) calls it every
step; GNP (``mirror_optax.gradient_norm_penalty``) differentiates it once per step. The trainer
never needs to know which method it runs.

Base optimizers are those of the paper's table 6: Adam (default), SGD, RMSprop, Adagrad.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable

import optax

import mirror_optax

__all__ = [
  "METHODS",
  "METHOD_DEFAULTS",
  "OPTIMIZERS",
  "Method",
  "make_method",
  "make_optimizer",
  "resolve_method_hparams",
]

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
  "adam": optax.adam,
  "sgd": optax.sgd,
  "rmsprop": optax.rmsprop,
  "adagrad": optax.adagrad,
}

METHODS = ("plain", "mg", "sam", "gnp")

#: Method hyper-parameters and their defaults (official MG configs; SAM's usual radius).
METHOD_DEFAULTS = {"alpha1": 1.0, "alpha2": 0.2, "beta": 3, "rho": 0.05, "gnp_penalty": 0.01}


def resolve_method_hparams(given: Mapping[str, Any]) -> dict[str, Any]:
  """``given`` over :data:`METHOD_DEFAULTS`: the full set of method hyper-parameters, in the defaults' order.

  Raises:
    ValueError: a name that is not a method hyper-parameter (the message lists the valid ones).
  """
  unknown = set(given) - set(METHOD_DEFAULTS)
  if unknown:
    raise ValueError(f"unknown method hyper-parameter(s) {sorted(unknown)}; valid: {sorted(METHOD_DEFAULTS)}")
  return {**METHOD_DEFAULTS, **given}


@dataclasses.dataclass(frozen=True)
class Method:
  """A named training method.

  Attributes:
    name: one of ``METHODS``.
    tx: the optax transformation; call ``tx.update(grads, state, params, grad_fn=...)``.
    grad_evals: ``grad_evals(n)`` is the number of gradient evaluations (a Hessian-vector product
      counts as one) that ``n`` updates cost, the incoming gradient included.
  """

  name: str
  tx: optax.GradientTransformationExtraArgs
  grad_evals: Callable[[int], int]


def _check_name(kind: str, name: str, valid) -> str:
  key = name.lower()
  if key not in valid:
    raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")
  return key


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """The base optimizer ``name`` (``adam``, ``sgd``, ``rmsprop``, ``adagrad``)."""
  return OPTIMIZERS[_check_name("optimizer", name, tuple(OPTIMIZERS))](learning_rate)


def make_method(
  name: str,
  *,
  optimizer: str = "adam",
  learning_rate: float = 1e-3,
  alpha1: float = METHOD_DEFAULTS["alpha1"],
  alpha2: float = METHOD_DEFAULTS["alpha2"],
  beta: int = METHOD_DEFAULTS["beta"],
  rho: float = METHOD_DEFAULTS["rho"],
  gnp_penalty: float = METHOD_DEFAULTS["gnp_penalty"],
) -> Method:
  """Builds method ``name`` over the base optimizer ``optimizer``.

  Raises:
    ValueError: unknown method or optimizer name (the message lists the valid ones), or invalid
      hyper-parameters (from the transformations themselves).
  """
  name = _check_name("method", name, METHODS)
  base = make_optimizer(optimizer, learning_rate)
  if name == "plain":
    return Method(name, optax.with_extra_args_support(base), lambda n: n)
  if name == "mg":
    tx = mirror_optax.mirror_gradient(base, alpha1=alpha1, alpha2=alpha2, beta=beta)
    return Method(name, tx, lambda n: n + math.ceil(n / beta))
  if name == "sam":
    if not rho > 0:
      raise ValueError(f"sam: rho must be > 0, got rho={rho!r}")
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    tx = optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)
    return Method(name, tx, lambda n: 2 * n)
  tx = mirror_optax.gradient_norm_penalty(base, penalty=gnp_penalty)
  return Method(name, tx, lambda n: 2 * n)
