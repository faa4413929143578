"""Tests of ``mirror_optax.mirror_gradient`` against independent computations.

Exactness tests run in float64 inside ``jax.enable_x64(True)`` (a context, so nothing leaks to other
modules). The references are plain NumPy: Algorithm 1 of the paper for SGD, and hand-written
two-update mirror steps for Adam, RMSprop and Adagrad.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mirror_optax import MirrorGradientState, mirror_gradient

# --- a non-quadratic test problem: L2-regularised logistic regression plus a quartic term -----------

_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(12, 5))
_Y = np.sign(_RNG.normal(size=12))
_W0 = _RNG.normal(size=5) * 0.5


def loss_jax(w):
  margins = _Y * (jnp.asarray(_X) @ w)
  return jnp.mean(jnp.log1p(jnp.exp(-margins))) + 0.05 * jnp.sum(w**4)


def grad_np(w):
  """Hand-derived gradient of ``loss_jax`` (independent of JAX autodiff)."""
  margins = _Y * (_X @ w)
  sig = 1.0 / (1.0 + np.exp(margins))  # d/dm log(1+e^-m) = -sigmoid(-m)
  return -(_X * (_Y * sig)[:, None]).mean(axis=0) + 0.2 * w**3


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def run_mg(tx, w0, steps, use_value_fn=False):
  """Runs ``steps`` jitted MG updates on the test problem; returns the trajectory."""
  params = jnp.asarray(w0)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss_jax)(params)
    if use_value_fn:
      updates, state = tx.update(g, state, params, value_fn=loss_jax)
    else:
      updates, state = tx.update(g, state, params, grad_fn=lambda p, _: jax.grad(loss_jax)(p))
    return optax.apply_updates(params, updates), state

  traj = []
  for _ in range(steps):
    params, state = step(params, state)
    traj.append(np.asarray(params))
  return np.stack(traj), state


# --- NumPy references -------------------------------------------------------------------------------


def algorithm1_sgd(w0, eta, a1, a2, beta, steps):
  """Algorithm 1 of the paper, verbatim, for plain SGD."""
  w, out = w0.copy(), []
  for t in range(steps):
    if t % beta == 0:
      w_prime = w - a1 * eta * grad_np(w)
      w = w_prime + a2 * eta * grad_np(w_prime)
    else:
      w = w - eta * grad_np(w)
    out.append(w.copy())
  return np.stack(out)


class NumpyAdam:
  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.m = self.v = 0.0
    self.t = 0

  def step(self, g):
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    m_hat = self.m / (1 - self.b1**self.t)
    v_hat = self.v / (1 - self.b2**self.t)
    return -self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


class NumpyRMSprop:
  def __init__(self, lr, decay=0.9, eps=1e-8):
    self.lr, self.decay, self.eps, self.nu = lr, decay, eps, 0.0

  def step(self, g):
    self.nu = self.decay * self.nu + (1 - self.decay) * g * g
    return -self.lr * g / np.sqrt(self.nu + self.eps)


class NumpyAdagrad:
  def __init__(self, lr, init=0.1, eps=1e-7):
    self.lr, self.eps, self.acc = lr, eps, init

  def step(self, g):
    self.acc = self.acc + g * g
    return -self.lr * g / np.sqrt(self.acc + self.eps)


def two_update_mirror(opt, w0, a1, a2, beta, steps):
  """The official generalisation: two inner-optimizer updates on a mirror step."""
  w, out = w0.copy(), []
  for t in range(steps):
    g = grad_np(w)
    if t % beta == 0:
      w1 = w + opt.step(a1 * g)
      w = w1 + opt.step(-a2 * grad_np(w1))
    else:
      w = w + opt.step(g)
    out.append(w.copy())
  return np.stack(out)


# --- exact equivalence --------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1, 2, 3, 5])
def test_sgd_equals_algorithm_1(x64, beta):
  eta, a1, a2, steps = 0.3, 1.0, 0.2, 12
  traj, state = run_mg(mirror_gradient(optax.sgd(eta), a1, a2, beta), _W0, steps)
  np.testing.assert_allclose(traj, algorithm1_sgd(_W0, eta, a1, a2, beta, steps), rtol=1e-12, atol=1e-12)
  assert int(state.count) == steps


@pytest.mark.parametrize("beta", [1, 2, 3, 5])
@pytest.mark.parametrize(
  "make_optax,make_numpy",
  [
    (lambda: optax.adam(0.05), lambda: NumpyAdam(0.05)),
    (lambda: optax.rmsprop(0.01), lambda: NumpyRMSprop(0.01)),
    (lambda: optax.adagrad(0.1), lambda: NumpyAdagrad(0.1)),
  ],
  ids=["adam", "rmsprop", "adagrad"],
)
def test_adaptive_optimizers_equal_two_update_reference(x64, beta, make_optax, make_numpy):
  a1, a2, steps = 1.0, 0.3, 11
  traj, _ = run_mg(mirror_gradient(make_optax(), a1, a2, beta), _W0, steps)
  expected = two_update_mirror(make_numpy(), _W0, a1, a2, beta, steps)
  np.testing.assert_allclose(traj, expected, rtol=1e-10, atol=1e-12)


def test_adam_state_advances_twice_on_mirror_steps():
  tx = mirror_gradient(optax.adam(1e-2), beta=3)
  _, state = run_mg(tx, _W0.astype(np.float32), 7)  # mirror steps 0, 3, 6 -> 7 + 3 inner updates
  adam_state = state.inner_state[0]
  assert int(adam_state.count) == 10
  assert isinstance(state, MirrorGradientState)


def test_value_fn_gives_same_trajectory_as_grad_fn():
  tx = mirror_gradient(optax.adam(1e-2), 1.0, 0.2, 3)
  w0 = _W0.astype(np.float32)
  a, _ = run_mg(tx, w0, 10)
  b, _ = run_mg(tx, w0, 10, use_value_fn=True)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta,steps", [(1, 7), (3, 10), (4, 9), (5, 5)])
def test_second_gradient_only_on_mirror_steps_and_no_retracing(beta, steps):
  calls, traces = [], []
  tx = mirror_gradient(optax.sgd(0.1), beta=beta)

  def grad_fn(p, i):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(loss_jax)(p)

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(loss_jax)(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  params = jnp.asarray(_W0, jnp.float32)
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  jax.block_until_ready(params)
  jax.effects_barrier()
  assert len(calls) == math.ceil(steps / beta)
  assert len(traces) == 1


# --- Theorem 3.2 --------------------------------------------------------------------------------------


def test_theorem_3_2_gap_shrinks_like_eta_cubed(x64):
  """One SGD mirror step vs one gradient step on L_M = (a1-a2) L + (a1 a2 eta / 2)||grad L||^2."""
  a1, a2 = 1.0, 0.3
  w = jnp.asarray(_W0)
  grad = jax.grad(loss_jax)
  etas = np.geomspace(1e-3, 3e-2, 8)
  gaps = []
  for eta in etas:
    tx = mirror_gradient(optax.sgd(eta), a1, a2, beta=1)
    updates, _ = tx.update(grad(w), tx.init(w), w, grad_fn=lambda p, _: grad(p))
    mirror = w + updates

    def loss_m(p, eta=eta):
      g = grad(p)
      return (a1 - a2) * loss_jax(p) + 0.5 * a1 * a2 * eta * jnp.sum(g * g)

    gd = w - eta * jax.grad(loss_m)(w)
    gaps.append(float(jnp.linalg.norm(mirror - gd)))
  slope = np.polyfit(np.log(etas), np.log(gaps), 1)[0]
  print(f"Theorem 3.2 fitted log-log slope: {slope:.4f}")
  assert abs(slope - 3.0) < 0.1, (slope, gaps)


# --- composition ----------------------------------------------------------------------------------------


def test_after_clip_by_global_norm_in_a_chain(x64):
  eta, a1, a2, beta, max_norm, steps = 0.5, 1.0, 0.2, 2, 0.05, 10
  tx = optax.chain(optax.clip_by_global_norm(max_norm), mirror_gradient(optax.sgd(eta), a1, a2, beta))
  traj, _ = run_mg(tx, _W0, steps)

  def clip(g):
    n = np.linalg.norm(g)
    return g if n < max_norm else g * max_norm / n

  w, expected = _W0.copy(), []
  for t in range(steps):  # the chain clips the incoming gradient; grad_fn's gradient is raw
    g = clip(grad_np(w))
    if t % beta == 0:
      w1 = w - a1 * eta * g
      w = w1 + a2 * eta * grad_np(w1)
    else:
      w = w - eta * g
    expected.append(w.copy())
  np.testing.assert_allclose(traj, np.stack(expected), rtol=1e-12, atol=1e-12)


def test_inject_hyperparams_schedules_alpha2(x64):
  eta, a1, beta, steps = 0.3, 1.0, 1, 6
  schedule = lambda count: 0.5 + (0.1 - 0.5) * jnp.minimum(count, 5).astype(jnp.float64) / 5
  tx = optax.inject_hyperparams(mirror_gradient, hyperparam_dtype=jnp.float64)(
    optax.sgd(eta), alpha1=a1, alpha2=schedule, beta=beta
  )
  traj, state = run_mg(tx, _W0, steps)
  w, expected = _W0.copy(), []
  for t in range(steps):
    a2 = 0.5 + (0.1 - 0.5) * min(t, 5) / 5
    w1 = w - a1 * eta * grad_np(w)
    w = w1 + a2 * eta * grad_np(w1)
    expected.append(w.copy())
  np.testing.assert_allclose(traj, np.stack(expected), rtol=1e-12, atol=1e-12)
  assert float(state.hyperparams["alpha2"]) == pytest.approx(0.1)


def test_inject_hyperparams_beta_is_respected(x64):
  tx = optax.inject_hyperparams(mirror_gradient)(optax.sgd(0.2), alpha1=1.0, alpha2=0.2, beta=3)
  traj, _ = run_mg(tx, _W0, 9)
  np.testing.assert_allclose(traj, algorithm1_sgd(_W0, 0.2, 1.0, 0.2, 3, 9), rtol=1e-12, atol=1e-12)


def test_apply_if_finite_inside_mg_skips_a_nan_second_gradient():
  """``apply_if_finite`` judges the gradient it is given, so to guard the second gradient it goes
  inside MG: the NaN second update is rejected, the first one stands, params stay finite."""
  eta = 0.1
  tx = mirror_gradient(optax.apply_if_finite(optax.sgd(eta), max_consecutive_errors=5), beta=2)
  params = jnp.asarray(_W0, jnp.float32)
  state = tx.init(params)
  nan_grad_fn = lambda p, _: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss_jax)(params), state, params, grad_fn=nan_grad_fn)
    return optax.apply_updates(params, updates), state

  p1, state = step(params, state)  # mirror step: first update applied, NaN second one skipped
  chex.assert_tree_all_finite(p1)
  np.testing.assert_allclose(np.asarray(p1), _W0 - 1.0 * eta * grad_np(_W0), rtol=1e-5, atol=1e-6)
  assert int(state.inner_state.total_notfinite) == 1
  p2, state = step(p1, state)  # ordinary step: grad_fn is not called, nothing rejected
  chex.assert_tree_all_finite(p2)
  assert int(state.inner_state.total_notfinite) == 1


def test_mg_inside_apply_if_finite_skips_a_nan_gradient_step_entirely():
  tx = optax.apply_if_finite(mirror_gradient(optax.sgd(0.1), beta=1), max_consecutive_errors=5)
  params = jnp.asarray(_W0, jnp.float32)
  state = tx.init(params)
  calls = []

  def grad_fn(p, _):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(loss_jax)(p)

  nan = jnp.full_like(params, jnp.nan)
  updates, state = jax.jit(lambda s: tx.update(nan, s, params, grad_fn=grad_fn))(state)
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(updates), 0.0)
  assert int(state.notfinite_count) == 1
  assert int(state.inner_state.count) == 0  # MG's state did not advance
  assert calls == []  # and its second gradient was never computed


def test_through_flax_nnx_optimizer():
  nnx = pytest.importorskip("flax.nnx")
  x = jnp.asarray(_X, jnp.float32)
  y = jnp.asarray(_Y, jnp.float32)

  def model_loss(model):
    return jnp.mean(jnp.log1p(jnp.exp(-y * model(x)[:, 0])))

  model = nnx.Linear(5, 1, rngs=nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = jax.tree.map(jnp.array, nnx.as_pure(params0))  # a copy: the model is updated in place
  tx = mirror_gradient(optax.sgd(0.5), 1.0, 0.2, 2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def grad_fn(params, _):
    return jax.grad(lambda p: model_loss(nnx.merge(graphdef, p)))(params)

  for _ in range(5):
    grads = nnx.grad(model_loss)(model)
    optimizer.update(model, grads, grad_fn=grad_fn)

  # Same thing, functionally.
  params = params0
  state = tx.init(params)
  for _ in range(5):
    updates, state = tx.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(model.kernel[...]), np.asarray(params["kernel"]), rtol=1e-6, atol=1e-7)
  assert int(optimizer.opt_state.count[...]) == 5


def test_one_grad_fn_drives_both_mg_and_sam():
  grad_fn = lambda p, _: jax.grad(loss_jax)(p)
  params = jnp.asarray(_W0, jnp.float32)
  for tx in [
    mirror_gradient(optax.adam(1e-2)),
    optax.contrib.sam(optax.adam(1e-2), optax.sgd(0.05), opaque_mode=True),
  ]:
    state = tx.init(params)
    updates, state = tx.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
    chex.assert_tree_all_finite(updates)
    assert float(jnp.linalg.norm(updates)) > 0


def test_unknown_extra_args_are_forwarded_to_the_inner_optimizer():
  seen = {}

  def update(updates, state, params=None, *, my_arg=None):
    seen["my_arg"] = my_arg
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = mirror_gradient(inner, beta=2)
  params = jnp.ones(3)
  tx.update(params, tx.init(params), params, grad_fn=lambda p, _: p, my_arg=7)
  assert seen["my_arg"] == 7


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(beta=0), "beta must be an integer >= 1.*beta=0"),
    (dict(beta=2.5), "beta must be an integer >= 1.*beta=2.5"),
    (dict(alpha1=0.2, alpha2=0.2), r"alpha1 > alpha2 > 0.*alpha1=0.2, alpha2=0.2"),
    (dict(alpha1=0.1, alpha2=0.3), r"alpha1 > alpha2 > 0.*alpha1=0.1, alpha2=0.3"),
    (dict(alpha1=1.0, alpha2=-0.1), r"alpha1 > alpha2 > 0.*alpha2=-0.1"),
    (dict(alpha1=1.0, alpha2=0.0), r"alpha1 > alpha2 > 0.*alpha2=0.0"),
  ],
)
def test_invalid_hyperparameters_raise_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    mirror_gradient(optax.sgd(0.1), **kwargs)


def test_update_without_params_raises():
  tx = mirror_gradient(optax.sgd(0.1))
  p = jnp.ones(3)
  with pytest.raises(ValueError, match=r"needs the current parameters.*tx.update\(grads, state, params"):
    tx.update(p, tx.init(p), grad_fn=lambda q, _: q)


@pytest.mark.parametrize(
  "kwargs,which",
  [({}, "neither"), ({"grad_fn": lambda q, _: q, "value_fn": jnp.sum}, "both")],
)
def test_update_needs_exactly_one_of_grad_fn_and_value_fn(kwargs, which):
  tx = mirror_gradient(optax.sgd(0.1))
  p = jnp.ones(3)
  with pytest.raises(ValueError, match=f"got {which} of grad_fn and value_fn: pass exactly one, grad_fn="):
    tx.update(p, tx.init(p), p, **kwargs)
