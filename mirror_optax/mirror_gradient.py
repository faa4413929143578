"""Mirror Gradient (MG) as an Optax gradient transformation.

Mirror Gradient (Zhong, Huang et al., "Mirror Gradient: Towards Robust Multimodal Recommender
Systems via Exploring Flat Local Minima", WWW 2024, Algorithm 1) steers training towards flat
minima. Every ``beta``-th iteration is a *mirror step*; with plain SGD and step size ``eta``::

    theta' = theta  - alpha1 * eta * g(theta)        # a step down the gradient
    theta  = theta' + alpha2 * eta * g(theta')       # a smaller step back up, at theta'

with ``alpha1 > alpha2 > 0``; all other iterations are ordinary steps. Theorem 3.2 (eq. 6) shows a
mirror step equals, up to ``O(eta**3)``, one gradient step of size ``eta`` on::

    L_M(theta) = (alpha1 - alpha2) * L(theta) + (alpha1 * alpha2 * eta / 2) * ||grad L(theta)||^2,

i.e. training on the loss plus an implicit gradient-norm penalty, which prefers flat regions.

Like the authors' code (``Qrange-group/Mirror-Gradient``, ``src/common/trainer.py``), this
transformation generalises the formula to any inner optimizer ``opt``: on a mirror step it calls
``opt`` twice on the same batch::

    u1, s1 = opt.update(alpha1 * g, s, p)           # g: the incoming gradient at p
    p1     = p + u1
    g2     = grad_fn(p1, 0)                         # a second gradient, at the moved parameters
    u2, s2 = opt.update(-alpha2 * g2, s1, p1)
    return u1 + u2, s2

so the inner state (Adam moments, step counts) advances twice on a mirror step. With
``optax.sgd(eta)`` this is exactly Algorithm 1. Other steps are ``opt.update(g, s, p)``.

The second gradient comes from ``grad_fn(params, i)`` -- the same signature as the opaque mode of
``optax.contrib.sam``, so one closure drives both -- or from ``value_fn(params) -> loss`` (optax's
line-search convention), which MG differentiates itself. It is evaluated only on mirror steps (in a
``jax.lax.while_loop`` of trip count 0 or 1, which keeps the optimizer state in place), so on
average a step costs ``(beta + 1) / beta`` gradient evaluations (SAM: 2). The update is not
reverse-differentiable for ``beta > 1`` (``while_loop``); nothing in training needs that.

Cost beyond the gradients: because whether a step mirrors is decided at run time, the update tree
leaves the ``while_loop`` as a materialised buffer, so the caller's ``optax.apply_updates`` cannot fuse
into the inner optimizer's elementwise update as it does without MG -- one extra write and read of an
update-sized tree per step. That is negligible where the gradient dominates a step, and visible where a
dense optimizer pass over a large table does. Measured through the benchmarks' trainer, a non-mirror
step costs 2-6 % more than a plain one for VBPR and LightGCN but 16-35 % more for BM3, whose
7,050 x 4,096 image table is trainable; so with ``beta=3`` MG sits at about 1.0x its ideal ``4/3`` for
VBPR and LightGCN and about 1.06x for BM3 (``python -m benchmarks.speed``).

Step counting: a global counter starting at 0 -- steps ``0, beta, 2 * beta, ...`` are mirror
steps. (The official loop restarts its batch counter each epoch; with ``beta`` dividing the number
of batches per epoch the two agree.)

Known optax pitfalls: ``optax.MultiSteps(...).gradient_transformation()`` and ``optax.lookahead``
drop extra arguments, so ``grad_fn`` does not reach an MG nested inside them; put MG outside.
Line searches reject unknown keyword arguments, so put MG outside a line search as well.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = ["MirrorGradientState", "mirror_gradient"]


class MirrorGradientState(NamedTuple):
  """State of :func:`mirror_gradient`.

  Attributes:
    count: number of updates applied so far (int32); step ``count`` is a mirror step when
      ``count % beta == 0``.
    inner_state: the state of the wrapped optimizer.
  """

  count: jax.Array
  inner_state: optax.OptState


def _concrete_float(value: Any) -> Optional[float]:
  """``float(value)`` if the value is known at trace time, else ``None`` (e.g. a tracer)."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _validate(alpha1: Any, alpha2: Any, beta: Any) -> None:
  """Raises ``ValueError`` for invalid concrete hyper-parameters (tracers are skipped)."""
  beta_f = _concrete_float(beta)
  if beta_f is not None:
    if not math.isfinite(beta_f) or beta_f != int(beta_f) or beta_f < 1:
      raise ValueError(
          f"mirror_gradient: beta must be an integer >= 1 (the mirror-step interval), got beta={beta!r}."
      )
  a1, a2 = _concrete_float(alpha1), _concrete_float(alpha2)
  if a1 is not None and a2 is not None and not (a1 > a2 > 0):
    raise ValueError(
        "mirror_gradient: need alpha1 > alpha2 > 0, got "
        f"alpha1={alpha1!r}, alpha2={alpha2!r}."
    )
  elif a2 is not None and not a2 > 0:
    raise ValueError(f"mirror_gradient: need alpha2 > 0, got alpha2={alpha2!r}.")
  elif a1 is not None and not a1 > 0:
    raise ValueError(f"mirror_gradient: need alpha1 > 0, got alpha1={alpha1!r}.")


def _scale(factor: Any, tree: Any) -> Any:
  """Multiplies every leaf by ``factor``, keeping each leaf's dtype."""
  return jax.tree.map(lambda x: (factor * x).astype(x.dtype), tree)


def mirror_gradient(
    optimizer: optax.GradientTransformation,
    alpha1: float = 1.0,
    alpha2: float = 0.2,
    beta: int = 3,
    *,
    batch_axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``optimizer`` with Mirror Gradient (Zhong, Huang et al., WWW 2024, Algorithm 1).

  See the module docstring for the math. Example::

    tx = mirror_gradient(optax.adam(1e-3), alpha1=1.0, alpha2=0.2, beta=3)
    state = tx.init(params)
    grad_fn = lambda p, i: jax.grad(loss)(p, batch)
    updates, state = tx.update(jax.grad(loss)(params, batch), state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)

  Args:
    optimizer: any optax transformation (``GradientTransformationExtraArgs`` or plain).
    alpha1: scale of the first (descent) update on a mirror step; must exceed ``alpha2``.
    alpha2: scale of the second (ascent) update on a mirror step; must be positive.
    beta: mirror-step interval (integer >= 1): steps ``0, beta, 2*beta, ...`` are mirror steps.
    batch_axis_name: when the update runs under ``pmap``/``shard_map`` with the batch split over
      this axis, the second gradient is averaged with ``jax.lax.pmean`` over it (the incoming
      gradient is the caller's to average, as in optax.contrib.sam).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update(updates, state, params, *, grad_fn=None,
    value_fn=None, **extra_args)`` needs ``params`` and exactly one of ``grad_fn(params, i) ->
    grads`` or ``value_fn(params) -> scalar loss``. Other keyword arguments are forwarded to
    ``optimizer``. Hyper-parameters can be injected/scheduled with ``optax.inject_hyperparams``.

  Raises:
    ValueError: ``beta`` is not an integer >= 1, or not ``alpha1 > alpha2 > 0``.
  """
  _validate(alpha1, alpha2, beta)
  inner = optax.with_extra_args_support(optimizer)
  always_mirror = _concrete_float(beta) == 1.0

  def init_fn(params: optax.Params) -> MirrorGradientState:
    return MirrorGradientState(
        count=jnp.zeros([], jnp.int32), inner_state=inner.init(params)
    )

  def update_fn(
      updates: optax.Updates,
      state: MirrorGradientState,
      params: Optional[optax.Params] = None,
      *,
      grad_fn: Optional[Callable[[optax.Params, int], optax.Updates]] = None,
      value_fn: Optional[Callable[[optax.Params], jax.Array]] = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, MirrorGradientState]:
    if params is None:
      raise ValueError(
          "mirror_gradient needs the current parameters: call "
          "tx.update(grads, state, params, grad_fn=grad_fn)."
      )
    if (grad_fn is None) == (value_fn is None):
      given = "both" if grad_fn is not None else "neither"
      raise ValueError(
          f"mirror_gradient.update got {given} of grad_fn and value_fn: pass exactly one, "
          "grad_fn=lambda params, i: <gradient of the loss at params> "
          "(the optax.contrib.sam opaque-mode signature) or value_fn=lambda params: <scalar loss>."
      )
    second_grad = grad_fn if grad_fn is not None else (lambda p, _: jax.grad(value_fn)(p))

    def second_half(u1, s1):
      """The mirror step's second update, at ``p1 = params + u1``; returns ``(u1 + u2, s2)``."""
      p1 = optax.apply_updates(params, u1)
      g2 = second_grad(p1, 0)
      if batch_axis_name is not None:
        g2 = jax.lax.pmean(g2, axis_name=batch_axis_name)
      u2, s2 = inner.update(_scale(-alpha2, g2), s1, p1, **extra_args)
      return jax.tree.map(lambda a, b: (a + b).astype(a.dtype), u1, u2), s2

    if always_mirror:
      u1, s1 = inner.update(_scale(alpha1, updates), state.inner_state, params, **extra_args)
      new_updates, new_inner = second_half(u1, s1)
    else:
      # The first update is shared by both kinds of step (scaled by alpha1 on a mirror step, by 1
      # otherwise); the second half runs in a while_loop of trip count 0 or 1. Unlike lax.cond,
      # a while_loop updates its carry in place, so inside a lax.scan the optimizer state is not
      # copied on every step (measured 2-3x slower updates for 33M parameters with lax.cond).
      is_mirror = state.count % beta == 0
      u1, s1 = inner.update(
          _scale(jnp.where(is_mirror, alpha1, 1.0), updates), state.inner_state, params, **extra_args
      )

      def body(carry):
        return (*second_half(carry[0], carry[1]), jnp.array(True))

      new_updates, new_inner, _ = jax.lax.while_loop(
          lambda carry: jnp.logical_and(is_mirror, jnp.logical_not(carry[2])),
          body,
          (u1, s1, jnp.array(False)),
      )
    return new_updates, MirrorGradientState(
        count=optax.safe_increment(state.count), inner_state=new_inner
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
