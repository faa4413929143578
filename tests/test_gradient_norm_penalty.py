"""Tests of ``mirror_optax.gradient_norm_penalty`` against a hand-derived Hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mirror_optax import gradient_norm_penalty

_RNG = np.random.default_rng(1)
_X = _RNG.normal(size=(10, 4))
_W0 = _RNG.normal(size=4)


def loss_jax(w):
  return jnp.mean(jnp.log(jnp.cosh(jnp.asarray(_X) @ w))) + 0.1 * jnp.sum(w**4)


def grad_np(w):
  return (_X * np.tanh(_X @ w)[:, None]).mean(0) + 0.4 * w**3


def hess_np(w):
  sech2 = 1.0 / np.cosh(_X @ w) ** 2
  return (_X.T * sech2) @ _X / len(_X) + np.diag(1.2 * w**2)


def test_sgd_steps_on_the_penalised_gradient():
  eta, lam = 0.1, 0.3
  with jax.enable_x64(True):
    tx = gradient_norm_penalty(optax.sgd(eta), penalty=lam)
    w = jnp.asarray(_W0)
    state = tx.init(w)
    step = jax.jit(lambda w, s: tx.update(jax.grad(loss_jax)(w), s, w, grad_fn=lambda p, _: jax.grad(loss_jax)(p)))
    expected = _W0.copy()
    for _ in range(5):
      updates, state = step(w, state)
      w = w + updates
      g = grad_np(expected)
      expected = expected - eta * (g + 2 * lam * hess_np(expected) @ g)
      np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-10, atol=1e-12)


def test_zero_penalty_is_the_inner_optimizer():
  tx = gradient_norm_penalty(optax.adam(0.1), penalty=0.0)
  ref = optax.adam(0.1)
  w = jnp.asarray(_W0, jnp.float32)
  g = jax.grad(loss_jax)(w)
  u, _ = tx.update(g, tx.init(w), w, grad_fn=lambda p, _: jax.grad(loss_jax)(p))
  u_ref, _ = ref.update(g, ref.init(w), w)
  np.testing.assert_allclose(np.asarray(u), np.asarray(u_ref), rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="penalty must be >= 0, got penalty=-1"):
    gradient_norm_penalty(optax.sgd(0.1), penalty=-1)
  tx = gradient_norm_penalty(optax.sgd(0.1))
  w = jnp.ones(3)
  with pytest.raises(ValueError, match="needs params and grad_fn"):
    tx.update(w, tx.init(w), w)


@pytest.mark.parametrize(
  "bad,message",
  [
    (
      lambda p: {"b": p["b"], "w": p["w"][None, :]},
      r"has shape \(1, 3\) at params\['w'\], but the parameter has shape \(3,\)",
    ),
    (lambda p: {"w": p["w"]}, r"must have the tree structure of params; .*; leaves of params missing from it: \['b'\]"),
  ],
  ids=["shape", "structure"],
)
def test_grad_fn_output_unlike_params_raises_naming_the_leaf(bad, message):
  """A (1, 3) gradient for a (3,) parameter would broadcast the update (and reshape the parameter)."""
  tx = gradient_norm_penalty(optax.sgd(0.1))
  params = {"b": jnp.zeros(()), "w": jnp.ones(3)}
  with pytest.raises(ValueError, match="gradient_norm_penalty: the gradient from grad_fn " + message):
    tx.update(params, tx.init(params), params, grad_fn=lambda p, _: bad(p))
