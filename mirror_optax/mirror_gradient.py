"""Mirror Gradient (MG) as an Optax gradient transformation.

Mirror Gradient (Zhong, Huang et al., WWW 2024, Algorithm 1) steers training towards flat minima.
Every ``beta``-th step, counting from step 0, is a *mirror step*; with ``optax.sgd(eta)`` it is::

    theta' = theta  - alpha1 * eta * grad L(theta)
    theta  = theta' + alpha2 * eta * grad L(theta')        # alpha1 > alpha2 > 0

and, up to ``O(eta**3)``, one gradient step on ``(alpha1 - alpha2) L + (alpha1 alpha2 eta / 2) ||grad L||^2``
(Theorem 3.2). :func:`mirror_gradient` wraps any optimizer as the authors' code does: a mirror step
calls it twice, on ``alpha1 * g`` at ``theta`` and on ``-alpha2 * g'`` at the moved parameters, so its
state advances twice. The second gradient comes from ``grad_fn(params, i)`` (the signature of
``optax.contrib.sam``'s opaque mode) or ``value_fn(params) -> loss``, on mirror steps only.

Momentum narrows the stable step sizes: with ``optax.sgd(lr, momentum=0.9)``, ``alpha1=1``,
``alpha2=0.2`` and ``beta=3``, on a quadratic of curvature ``lam``, MG diverges for ``lr * lam`` in
``(0.574, 1.029)``, ``(1.909, 2.922)`` and above ``3.244``; heavy ball alone only above 3.8.

Pitfalls: ``optax.MultiSteps(...).update`` forwards extra keyword arguments such as ``grad_fn``, but
``optax.chain`` and ``optax.with_extra_args_support`` drop them when they wrap a ``MultiSteps``;
``optax.lookahead`` and the line searches reject them. Call the ``MultiSteps`` update directly, or
put MG outside those.

The semantics in full, the cost per step, complex parameters and the derivations are in
``mirror_optax/README.md``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mirror_optax.checks import cast_like_params, concrete_float

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


def _validate(alpha1: Any, alpha2: Any, beta: Any) -> None:
  """Raises ``ValueError`` for invalid concrete hyper-parameters (tracers are skipped)."""
  beta_f = concrete_float(beta)
  if beta_f is not None:
    if not math.isfinite(beta_f) or beta_f != int(beta_f) or beta_f < 1:
      raise ValueError(f"mirror_gradient: beta must be an integer >= 1 (the mirror-step interval), got beta={beta!r}.")
  a1, a2 = concrete_float(alpha1), concrete_float(alpha2)
  if a1 is not None and a2 is not None and not (a1 > a2 > 0):
    raise ValueError(f"mirror_gradient: need alpha1 > alpha2 > 0, got alpha1={alpha1!r}, alpha2={alpha2!r}.")
  elif a2 is not None and not a2 > 0:
    raise ValueError(f"mirror_gradient: need alpha2 > 0, got alpha2={alpha2!r}.")
  elif a1 is not None and not a1 > 0:
    raise ValueError(f"mirror_gradient: need alpha1 > 0, got alpha1={alpha1!r}.")


def _run_time_ok(alpha1: Any, alpha2: Any, beta: Any) -> Optional[jax.Array]:
  """A scalar bool: do the traced hyper-parameters satisfy the rules? ``None`` if none is traced.

  Concrete values were checked by :func:`_validate`; only the traced ones are tested here.
  """
  # Traced values (every inject_hyperparams value under jit, constants and schedules alike, and an
  # edited state.hyperparams) cannot raise; the rules are checked here, on every step, instead.
  checks = []
  if concrete_float(alpha1) is None or concrete_float(alpha2) is None:
    checks.append(jnp.logical_and(alpha1 > alpha2, alpha2 > 0))
  if concrete_float(beta) is None:
    b = jnp.asarray(beta)
    ok = b >= 1
    if jnp.issubdtype(b.dtype, jnp.inexact):
      ok = jnp.logical_and(ok, jnp.logical_and(jnp.isfinite(b), b == jnp.floor(b)))
    checks.append(ok)
  if not checks:
    return None
  return checks[0] if len(checks) == 1 else jnp.logical_and(*checks)


def _scale(factor: Any, tree: Any) -> Any:
  """Multiplies every leaf by ``factor``, keeping each leaf's dtype."""
  return jax.tree.map(lambda x: (factor * x).astype(x.dtype), tree)


def _nan_like(tree: Any) -> Any:
  """NaN in every inexact leaf (other leaves pass unchanged)."""
  return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def mirror_gradient(
  optimizer: optax.GradientTransformation,
  alpha1: float = 1.0,
  alpha2: float = 0.2,
  beta: int = 3,
  *,
  batch_axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Mirror Gradient: every ``beta``-th step, a step down and a smaller step back up.

  Steps ``0, beta, 2 * beta, ...`` are mirror steps. On a mirror step, with ``g`` the incoming
  gradient at ``params`` and ``s`` the state of ``optimizer``::

    u1, s1 = optimizer.update(alpha1 * g, s, params)
    p1 = params + u1
    u2, s2 = optimizer.update(-alpha2 * grad_fn(p1, 0), s1, p1)
    return u1 + u2, s2

  and on any other step ``optimizer.update(g, s, params)``. With ``optax.sgd`` this is Algorithm 1
  of the paper; with another optimizer it is what the authors' code does (its state advances twice
  on a mirror step). The second gradient is computed on mirror steps only: ``(beta + 1) / beta``
  gradient evaluations per step on average.

  Args:
    optimizer: the optax transformation to wrap (``GradientTransformationExtraArgs`` or plain).
    alpha1: scale of the first (descent) update of a mirror step; must exceed ``alpha2``.
    alpha2: scale of the second (ascent) update of a mirror step; must be positive.
    beta: the mirror-step interval, an integer >= 1 (``1``: every step mirrors).
    batch_axis_name: under ``pmap`` / ``shard_map`` with the batch split over this axis, the second
      gradient is averaged over it with ``jax.lax.pmean`` (the incoming gradient is the caller's to
      average, as in ``optax.contrib.sam``). Not needed under ``jit`` with sharded inputs.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` with state :class:`MirrorGradientState`. Its
    ``update(updates, state, params, *, grad_fn=None, value_fn=None, **extra_args)`` needs ``params``
    and exactly one of ``grad_fn(params, i) -> grads`` (shaped like ``params``, in the convention of
    ``updates``) or ``value_fn(params) -> scalar loss``; other keyword arguments are forwarded to
    ``optimizer``. The hyper-parameters can be injected or scheduled with
    ``optax.inject_hyperparams``: traced values that break the rules make that step's updates NaN.

  Raises:
    ValueError: at construction, for values known at trace time: ``beta`` is not an integer >= 1,
      or not ``alpha1 > alpha2 > 0``. When ``update`` is traced: no ``params``, not exactly one of
      ``grad_fn`` / ``value_fn``, or a second gradient whose tree structure or leaf shapes differ
      from ``params`` (or complex for a real parameter).

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from mirror_optax import mirror_gradient
    >>> loss = lambda params: jnp.sum(params**2)
    >>> tx = mirror_gradient(optax.sgd(0.1), alpha1=1.0, alpha2=0.2, beta=3)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = tx.init(params)
    >>> grad_fn = lambda p, i: jax.grad(loss)(p)  # also drives optax.contrib.sam(..., opaque_mode=True)
    >>> for _ in range(2):  # step 0 mirrors: x * 0.8, then * 1.04; step 1 is plain SGD: x * 0.8
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    ...   params = optax.apply_updates(params, updates)
    ...   print(params)
    [0.832 1.664]
    [0.6656 1.3312]
    >>> state.count
    Array(2, dtype=int32)
    >>> fresh = tx.init(params)  # at step 0 again, so a mirror step; value_fn=loss does what grad_fn does
    >>> by_grad_fn, _ = tx.update(jax.grad(loss)(params), fresh, params, grad_fn=grad_fn)
    >>> by_value_fn, _ = tx.update(jax.grad(loss)(params), fresh, params, value_fn=loss)
    >>> bool(jnp.array_equal(by_grad_fn, by_value_fn))
    True

  References:
    Zhong, Huang, Wen, Qin, Li, Lin, `Mirror Gradient: Towards Robust Multimodal Recommender Systems
    via Exploring Flat Local Minima <https://github.com/Qrange-group/Mirror-Gradient>`_, WWW 2024
    (Algorithm 1; Theorem 3.2, eq. 6)
  """
  _validate(alpha1, alpha2, beta)
  inner = optax.with_extra_args_support(optimizer)
  always_mirror = concrete_float(beta) == 1.0

  def init_fn(params: optax.Params) -> MirrorGradientState:
    return MirrorGradientState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

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
        "mirror_gradient needs the current parameters: call tx.update(grads, state, params, grad_fn=grad_fn)."
      )
    if (grad_fn is None) == (value_fn is None):
      given = "both" if grad_fn is not None else "neither"
      raise ValueError(
        f"mirror_gradient.update got {given} of grad_fn and value_fn: pass exactly one, "
        "grad_fn=lambda params, i: <gradient of the loss at params> "
        "(the optax.contrib.sam opaque-mode signature) or value_fn=lambda params: <scalar loss>."
      )
    if grad_fn is not None:
      second_grad, source = grad_fn, "grad_fn"
    else:
      # optax's update expects the conjugate of jax.grad for complex parameters (jax.grad returns
      # conj(dL/dx + i dL/dy); see optax.contrib.split_real_and_imaginary), the convention of the
      # incoming gradient. So value_fn=loss equals grad_fn=lambda p, i: optax.tree.conj(jax.grad(loss)(p)),
      # and a complex run equals the run on the real and imaginary parts. Real leaves pass unchanged.
      second_grad = lambda p, _: optax.tree.conj(jax.grad(value_fn)(p))
      source = "value_fn"

    def second_half(u1, s1):
      """The mirror step's second update, at ``p1 = params + u1``; returns ``(u1 + u2, s2)``."""
      p1 = optax.apply_updates(params, u1)
      # Checked at trace time: another tree structure or leaf shape raises (a (1, 3) gradient for a
      # (3,) parameter would otherwise broadcast the update and reshape the parameter); another dtype
      # is cast to the parameter's (a float32 grad_fn over bfloat16 parameters), so the optimizer
      # state keeps its dtypes; a complex gradient for a real parameter raises.
      g2 = cast_like_params(second_grad(p1, 0), params, f"mirror_gradient: the second gradient (from {source})")
      if batch_axis_name is not None:
        g2 = jax.lax.pmean(g2, axis_name=batch_axis_name)
      u2, s2 = inner.update(_scale(-alpha2, g2), s1, p1, **extra_args)
      return jax.tree.map(lambda a, b: (a + b).astype(a.dtype), u1, u2), s2

    if always_mirror:
      u1, s1 = inner.update(_scale(alpha1, updates), state.inner_state, params, **extra_args)
      new_updates, new_inner = second_half(u1, s1)
    else:
      # Step counting: a global counter from 0, so steps 0, beta, 2 * beta, ... mirror. (The official
      # loop restarts its batch counter each epoch; with beta dividing the batches per epoch they agree.)
      # The first update is shared by both kinds of step (scaled by alpha1 on a mirror step, by 1
      # otherwise); the second half runs in a while_loop of trip count 0 or 1. Unlike lax.cond, a
      # while_loop updates its carry in place, so inside a lax.scan the optimizer state is not copied
      # on every step. Costs of this choice: the update is not reverse-differentiable (nothing in
      # training needs that), and the update tree leaves the loop as a materialised buffer, so the
      # caller's optax.apply_updates cannot fuse into the inner optimizer's elementwise update: one
      # extra write and read of an update-sized tree per step (see mirror_optax/README.md).
      is_mirror = state.count % beta == 0
      u1, s1 = inner.update(_scale(jnp.where(is_mirror, alpha1, 1.0), updates), state.inner_state, params, **extra_args)

      def body(carry):
        return (*second_half(carry[0], carry[1]), jnp.array(True))

      new_updates, new_inner, _ = jax.lax.while_loop(
        lambda carry: jnp.logical_and(is_mirror, jnp.logical_not(carry[2])),
        body,
        (u1, s1, jnp.array(False)),
      )

    ok = _run_time_ok(alpha1, alpha2, beta)  # None unless a hyper-parameter is traced
    if ok is not None:
      # Run-time guard: when the traced values break the rules at this step (beta not a finite integer
      # >= 1, or not alpha1 > alpha2 > 0, e.g. alpha2 scheduled above alpha1), every update is NaN, so
      # the parameters turn NaN at the first offending step instead of MG silently mirroring every
      # step (beta = 0) or ascending. A separate while_loop of trip count 0 (1 when invalid) leaves the
      # fused arithmetic above untouched, so valid values give bit-identical updates; a jnp.where
      # folded into it (into alpha1's scale), or clamping beta with jnp.maximum, changed the last bit
      # of results on XLA:CPU by altering its fused kernels (and a clamped beta would still mirror).
      new_updates, _ = jax.lax.while_loop(
        lambda carry: jnp.logical_and(jnp.logical_not(ok), jnp.logical_not(carry[1])),
        lambda carry: (_nan_like(carry[0]), jnp.array(True)),
        (new_updates, jnp.array(False)),
      )
    return new_updates, MirrorGradientState(count=optax.safe_increment(state.count), inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
