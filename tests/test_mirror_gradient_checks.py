"""``mirror_gradient`` says so when it is misused: the "Nothing silent" issue, one section per class.

1. A second gradient of the wrong tree structure or leaf shape raises, naming the leaf; another dtype
   is cast to the parameter dtype.
2. Traced (injected, scheduled) hyper-parameters are guarded at run time; concrete ones still raise
   at construction.
3. ``value_fn`` over complex parameters follows optax's conjugate-gradient convention.
4. The documented ``optax.MultiSteps`` pitfall is what the installed optax does.
5. MG with momentum: the analytic instability bands of the mirror cycle match simulations.
"""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.polynomial import Polynomial

from mirror_optax import mirror_gradient

README = Path(__file__).resolve().parents[1] / "mirror_optax" / "README.md"  # the library's notes
_MG_MODULE = sys.modules["mirror_optax.mirror_gradient"]  # the package re-exports the function


def _flat(text):
  return " ".join(text.split())


def _module_doc():
  return _flat(_MG_MODULE.__doc__)


def _readme_notes():
  """The library README (moved there from the top-level README's "The transformation"), whitespace collapsed."""
  return _flat(README.read_text())


def _params():
  return {"b": jnp.zeros(()), "w": jnp.array([0.5, -1.0, 2.0])}


def _loss(p):
  return jnp.sum((p["w"] - 1.0) ** 2) + p["b"] ** 2


def _update(tx, grad_fn, params=None):
  params = _params() if params is None else params
  return tx.update(jax.grad(_loss)(params), tx.init(params), params, grad_fn=grad_fn)


# --- 1. the second gradient must match params -------------------------------------------------------


@pytest.mark.parametrize("beta", [1, 3])
@pytest.mark.parametrize("bad_shape", [(), (1, 3)], ids=["scalar", "1x3"])
def test_second_gradient_of_another_leaf_shape_raises_naming_the_leaf(beta, bad_shape):
  tx = mirror_gradient(optax.sgd(0.1), beta=beta)
  grad_fn = lambda p, _: {"b": jnp.zeros(()), "w": jnp.ones(bad_shape)}
  message = (
    rf"second gradient \(from grad_fn\) has shape {re.escape(str(bad_shape))} at params\['w'\], "
    r"but the parameter has shape \(3,\)"
  )
  with pytest.raises(ValueError, match=message):
    _update(tx, grad_fn)
  with pytest.raises(ValueError, match=message):  # the same at trace time under jit
    jax.jit(lambda p: _update(tx, grad_fn, p))(_params())


@pytest.mark.parametrize(
  "bad,detail",
  [
    (lambda p: {"w": p["w"]}, r"; leaves of params missing from it: \['b'\]"),
    (lambda p: {"b": p["b"], "w": p["w"], "c": p["b"]}, r"; leaves not in params: \['c'\]"),
    (lambda p: (p["b"], p["w"]), r"; leaves of params missing from it: \['b'\], \['w'\]"),
  ],
  ids=["missing", "extra", "tuple"],
)
def test_second_gradient_of_another_tree_structure_raises_clearly(bad, detail):
  tx = mirror_gradient(optax.sgd(0.1), beta=1)
  with pytest.raises(
    ValueError,
    match=r"second gradient \(from grad_fn\) must have the tree structure of params; "
    r"expected PyTreeDef\(\{'b': \*, 'w': \*\}\), got PyTreeDef\(.*\)" + detail,
  ):
    _update(tx, lambda p, _: bad(p))


def test_complex_second_gradient_for_real_parameters_raises():
  tx = mirror_gradient(optax.sgd(0.1), beta=1)
  grad_fn = lambda p, _: jax.tree.map(lambda x: x.astype(jnp.complex64), p)
  message = r"is complex \(complex64\) at params\['b'\], but the parameter is real \(float32\)"
  with pytest.raises(ValueError, match=message):
    _update(tx, grad_fn)


@pytest.mark.parametrize("beta", [1, 3])
def test_float32_second_gradient_is_cast_to_bfloat16_params(beta):
  """bf16 params with an f32 ``grad_fn``: beta=3 used to fail inside the while_loop and beta=1 to
  turn Adam's moments into f32; now the gradient is cast, as if ``grad_fn`` returned bf16."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  f32_grad_fn = lambda p, _: jax.grad(_loss)(jax.tree.map(lambda x: x.astype(jnp.float32), p))
  bf16_grad_fn = lambda p, _: jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32_grad_fn(p, _))
  tx = mirror_gradient(optax.adam(0.1), beta=beta)
  state0 = tx.init(params)
  runs = []
  for grad_fn in (f32_grad_fn, bf16_grad_fn):

    @jax.jit
    def step(p, s, grad_fn=grad_fn):
      updates, s = tx.update(jax.grad(_loss)(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, updates), s, updates

    p, s = params, state0
    for _ in range(4):
      p, s, updates = step(p, s)
    runs.append((p, s, updates))
  (p, s, updates), reference = runs
  assert jax.tree.map(lambda x: x.dtype, s) == jax.tree.map(lambda x: x.dtype, state0)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((p, updates)))
  jax.tree.map(np.testing.assert_array_equal, (p, s, updates), reference)


# --- 2. hyper-parameters: construction-time and run-time checks ---------------------------------------


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(beta=jnp.asarray(0)), "beta must be an integer >= 1"),
    (dict(beta=np.asarray(2.5)), "beta must be an integer >= 1"),
    (dict(alpha1=jnp.asarray(0.1), alpha2=jnp.asarray(0.3)), r"alpha1 > alpha2 > 0"),
  ],
)
def test_concrete_arrays_are_checked_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    mirror_gradient(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize(
  "kwargs,message",
  [(dict(beta=0), "beta must be an integer >= 1"), (dict(alpha2=1.5), r"alpha1 > alpha2 > 0")],
)
def test_injected_invalid_constants_raise_in_an_unjitted_init(kwargs, message):
  """inject_hyperparams passes constants as concrete arrays outside jit: MG validates them there."""
  tx = optax.inject_hyperparams(mirror_gradient)(optax.sgd(0.1), **kwargs)
  with pytest.raises(ValueError, match=message):
    tx.init(_params())


def _run_injected(tx, steps, edit=None):
  """Jitted init and updates (the hyper-parameters are tracers); returns the updates of each step."""
  grad_fn = lambda p, _: jax.grad(_loss)(p)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(_loss)(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), s, updates

  p, s = _params(), jax.jit(tx.init)(_params())
  if edit is not None:
    edit(s)
  out = []
  for _ in range(steps):
    p, s, updates = step(p, s)
    out.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(updates)]))
  return np.stack(out)


@pytest.mark.parametrize("beta", [0, -2, 2.5, float("inf")])
def test_invalid_traced_beta_gives_nan_updates(beta):
  tx = optax.inject_hyperparams(mirror_gradient)(optax.sgd(0.1), beta=beta)
  assert np.isnan(_run_injected(tx, 3)).all()  # was finite (beta = 0 mirrored every step)


def test_beta_edited_in_the_injected_state_is_guarded():
  tx = optax.inject_hyperparams(mirror_gradient)(optax.sgd(0.1), beta=3)
  assert np.isfinite(_run_injected(tx, 3)).all()

  def edit(state):
    state.hyperparams["beta"] = jnp.asarray(0, jnp.int32)

  assert np.isnan(_run_injected(tx, 3, edit)).all()


def test_alpha2_scheduled_above_alpha1_gives_nan_from_that_step_on():
  schedule = lambda count: 0.2 + 0.3 * count  # alpha2 = 0.2, 0.5, 0.8, 1.1 > alpha1 = 1.0, ...
  tx = optax.inject_hyperparams(mirror_gradient)(optax.sgd(0.1), alpha1=1.0, alpha2=schedule, beta=2)
  updates = _run_injected(tx, 5)
  assert np.isfinite(updates[:3]).all()
  assert np.isnan(updates[3:]).all()  # step 3 is an ordinary step, yet the config is invalid there
  valid = optax.inject_hyperparams(mirror_gradient)(
    optax.sgd(0.1), alpha1=1.0, alpha2=lambda c: 0.2 + 0.3 * jnp.minimum(c, 2), beta=2
  )
  np.testing.assert_allclose(_run_injected(valid, 3), updates[:3], rtol=1e-6)


# --- 3. complex parameters: value_fn follows optax's conjugate convention --------------------------


_RNG = np.random.default_rng(0)
_A = jnp.asarray(_RNG.normal(size=(4, 3)) + 1j * _RNG.normal(size=(4, 3)))
_TARGET = jnp.asarray([1.0 + 2.0j, -0.5j, 0.3, 1.0 - 1.0j])


def _complex_loss(z):
  r = _A @ z - _TARGET
  return jnp.sum((r.conj() * r).real) + 0.1 * jnp.sum(jnp.abs(z) ** 4)


def _run_complex(tx, z0, steps, **second):
  """MG steps fed optax's gradient convention, conj(jax.grad(loss))."""

  @jax.jit
  def step(z, s):
    updates, s = tx.update(optax.tree.conj(jax.grad(_complex_loss)(z)), s, z, **second)
    return optax.apply_updates(z, updates), s

  z, s, traj = z0, tx.init(z0), []
  for _ in range(steps):
    z, s = step(z, s)
    traj.append(np.asarray(z))
  return np.stack(traj)


def test_value_fn_equals_the_conjugated_grad_fn_on_complex_params():
  with jax.enable_x64(True):
    z0 = jnp.asarray([0.3 - 0.2j, 1.0j, -0.5 + 0.1j])
    tx = mirror_gradient(optax.adam(0.05), 1.0, 0.3, beta=2)
    by_value = _run_complex(tx, z0, 6, value_fn=_complex_loss)
    conj_grad_fn = lambda z, _: optax.tree.conj(jax.grad(_complex_loss)(z))
    np.testing.assert_array_equal(by_value, _run_complex(tx, z0, 6, grad_fn=conj_grad_fn))


def test_complex_mg_equals_mg_on_the_real_and_imaginary_parts():
  """With the conjugate convention a complex run is the run on (Re z, Im z); without it, it is not."""
  with jax.enable_x64(True):
    z0 = jnp.asarray([0.3 - 0.2j, 1.0j, -0.5 + 0.1j])
    tx = mirror_gradient(optax.sgd(0.02), 1.0, 0.3, beta=2)
    real_loss = lambda xy: _complex_loss(xy[0] + 1j * xy[1])

    @jax.jit
    def real_step(xy, s):
      updates, s = tx.update(jax.grad(real_loss)(xy), s, xy, value_fn=real_loss)
      return optax.apply_updates(xy, updates), s

    xy, s, real_traj = jnp.stack([z0.real, z0.imag]), tx.init(jnp.zeros((2, 3))), []
    for _ in range(6):
      xy, s = real_step(xy, s)
      real_traj.append(np.asarray(xy[0] + 1j * xy[1]))
    real_traj = np.stack(real_traj)
    complex_traj = _run_complex(tx, z0, 6, value_fn=_complex_loss)
    np.testing.assert_allclose(complex_traj, real_traj, rtol=1e-12, atol=1e-12)
    unconjugated = _run_complex(tx, z0, 6, grad_fn=lambda z, _: jax.grad(_complex_loss)(z))
    assert np.max(np.abs(unconjugated - real_traj)) > 1e-3


# --- 4. optax.MultiSteps: what forwards extra arguments and what drops them -------------------------


def test_multisteps_forwards_grad_fn_and_chain_or_with_extra_args_support_drop_it():
  params = jnp.ones(3)
  mg = mirror_gradient(optax.sgd(0.1), beta=1)
  multi = optax.MultiSteps(mg, every_k_schedule=1)
  grad_fn = lambda p, _: 2.0 * p
  expected, _ = mg.update(2.0 * params, mg.init(params), params, grad_fn=grad_fn)
  for tx in (multi, multi.gradient_transformation()):  # their own update forwards grad_fn
    updates, _ = tx.update(2.0 * params, tx.init(params), params, grad_fn=grad_fn)
    np.testing.assert_array_equal(updates, expected)
  for tx in (optax.chain(multi), optax.with_extra_args_support(multi.gradient_transformation())):
    with pytest.raises(ValueError, match="got neither of grad_fn and value_fn"):
      tx.update(2.0 * params, tx.init(params), params, grad_fn=grad_fn)
  lookahead = optax.lookahead(mg, sync_period=2, slow_step_size=0.5)
  synced = optax.LookaheadParams.init_synced(params)
  with pytest.raises(TypeError, match="grad_fn"):
    lookahead.update(2.0 * params, lookahead.init(synced), synced, grad_fn=grad_fn)


def test_docs_state_the_multisteps_pitfall_as_optax_behaves():
  notes, doc = _readme_notes(), _module_doc()
  old_claim = "`optax.MultiSteps(...).gradient_transformation()` and `optax.lookahead` drop extra"
  assert old_claim not in notes
  assert "`optax.MultiSteps(...).update` forwards extra arguments" in notes
  assert "`optax.chain` / `optax.with_extra_args_support` wrapping them drop the extra" in notes
  assert "``optax.MultiSteps(...).update`` forwards extra keyword arguments" in doc
  assert "``optax.chain`` and ``optax.with_extra_args_support``" in doc


# --- 5. momentum: the mirror cycle's instability bands -----------------------------------------------

_MU, _A1, _A2, _BETA = 0.9, 1.0, 0.2, 3


def _heavy_ball(h, s, mu=_MU):
  """One ``optax.sgd(lr, momentum=mu)`` step on ``s * g`` for ``L = lam x^2 / 2``, ``h = lr * lam``,
  acting on ``(x, v = lr * m)``: ``v' = s h x + mu v``, ``x' = x - v'``. Works on Polynomials in h."""
  return np.array([[1 - s * h, -mu], [s * h, mu]], dtype=object)


def _cycle(h):
  """One mirror step (heavy ball on alpha1 g, then on -alpha2 g' at the moved point), then beta - 1
  ordinary steps."""
  c = _heavy_ball(h, -_A2).dot(_heavy_ball(h, _A1))
  for _ in range(_BETA - 1):
    c = _heavy_ball(h, 1.0).dot(c)
  return c


def _spectral_radius(h, cycle=_cycle):
  return float(np.max(np.abs(np.linalg.eigvals(cycle(h).astype(float)))))


def test_analytic_instability_bands_of_the_mirror_cycle():
  h = Polynomial([0.0, 1.0])
  c = _cycle(h)
  trace, det = c[0, 0] + c[1, 1], c[0, 0] * c[1, 1] - c[0, 1] * c[1, 0]
  np.testing.assert_allclose(det.trim(1e-12).coef, [_MU ** (_BETA + 1)])  # every step has det mu
  assert trace.degree() == _BETA + 1
  # A real 2x2 matrix with 0 < det < 1 has spectral radius > 1 exactly when |trace| > 1 + det.
  edge = 1 + _MU ** (_BETA + 1)
  roots = np.concatenate([(trace - edge).roots(), (trace + edge).roots()])
  bounds = np.sort([r.real for r in roots if abs(r.imag) < 1e-9 and 0 < r.real < 4])
  np.testing.assert_allclose(bounds, [0.5739, 1.0287, 1.9088, 2.9223, 3.2442], atol=1e-4)
  # The docstring and the README state these bands, to three decimals.
  for text, q in ((_module_doc(), "``"), (_readme_notes(), "")):
    for lo, hi in (bounds[0:2], bounds[2:4]):
      assert f"{q}({lo:.3f}, {hi:.3f}){q}" in text, (lo, hi)
    assert f"above {q}{bounds[4]:.3f}{q}" in text
  for k, b in enumerate(bounds):  # unstable on (b0, b1), (b2, b3), (b4, ...)
    below, above = _spectral_radius(b - 1e-6), _spectral_radius(b + 1e-6)
    assert (below < 1 < above) if k % 2 == 0 else (above < 1 < below), (b, below, above)
  # Plain heavy ball: trace 1 + mu - h, det mu; stable for 0 < h < 2 (1 + mu) = 3.8.
  plain = lambda h: _heavy_ball(h, 1.0)
  assert _spectral_radius(3.79, plain) < 1 < _spectral_radius(3.81, plain)


def test_mirror_cycle_stability_matches_simulation_of_the_transformation():
  """The real transformation on ``L = lam x^2 / 2`` (lr = 1, so ``h = lam``): MG diverges exactly
  where the cycle's spectral radius exceeds 1, at that rate per cycle; heavy ball converges."""
  hs = np.array([0.3, 0.7, 1.5, 2.5, 3.0, 3.5])
  cycles = 40
  with jax.enable_x64(True):

    def simulate(tx, lam):
      loss = lambda x: 0.5 * lam * x**2

      def step(carry, _):
        x, s = carry
        updates, s = tx.update(jax.grad(loss)(x), s, x, grad_fn=lambda p, _: jax.grad(loss)(p))
        x = optax.apply_updates(x, updates)
        return (x, s), jnp.stack([x, jax.tree.leaves(s)[-1]])  # (x, momentum buffer)

      x0 = jnp.asarray(1.0)
      _, states = jax.lax.scan(step, (x0, tx.init(x0)), None, length=_BETA * cycles)
      return states

    mg = mirror_gradient(optax.sgd(1.0, momentum=_MU), _A1, _A2, _BETA)
    plain = optax.with_extra_args_support(optax.sgd(1.0, momentum=_MU))
    mg_states = np.asarray(jax.jit(jax.vmap(lambda lam: simulate(mg, lam)))(jnp.asarray(hs)))
    hb_states = np.asarray(jax.jit(jax.vmap(lambda lam: simulate(plain, lam)))(jnp.asarray(hs)))
  norms = np.linalg.norm(mg_states[:, _BETA - 1 :: _BETA], axis=-1)  # at the end of each cycle
  for h, norm, hb in zip(hs, norms, np.linalg.norm(hb_states[:, -1], axis=-1)):
    rho = _spectral_radius(h)
    assert hb < 0.05, (h, hb)  # plain heavy ball converges at every one of these step sizes
    if rho > 1:
      assert norm[-1] > 1e3, (h, norm[-1])
      np.testing.assert_allclose(norm[-1] / norm[-2], rho, rtol=1e-6)
    else:  # |eigenvalues| = sqrt(det) = mu**2 = 0.81 per cycle
      assert norm[-1] < 0.05 and norm[-5:].max() < 0.01 * norm[:5].max(), (h, norm)
  assert _spectral_radius(0.7) > 1 and norms[1, -1] > 1e3  # the example: lr * lam = 0.7
