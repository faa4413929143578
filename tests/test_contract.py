"""The contract every transformation of ``mirror_optax`` keeps, in the manner of optax's ``contrib/_common_test.py``.

Every transformation -- Mirror Gradient given ``grad_fn``, Mirror Gradient given ``value_fn``, and the
gradient-norm penalty (GNP) -- wrapped around ``sgd``, ``sgd`` with momentum and ``adam``, goes through
the same checks. The expected values come from :func:`_reference`: the semantics of DESIGN section 2
restated with the *unwrapped* inner optimizer and NumPy gradients of a quadratic (whose Hessian-vector
products are differences of gradients), so each check compares a wrapper with something computed
without it.

``optax.MultiSteps`` is used the supported way: its own ``update`` takes the extra arguments and
forwards them; ``optax.chain(MultiSteps(...))`` drops them (checked too, as the documented pitfall).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mirror_optax import MirrorGradientState, gradient_norm_penalty, mirror_gradient

A1, A2, BETA, PENALTY = 1.0, 0.3, 2, 0.05  # beta = 2: steps 0, 2, 4, ... mirror

INNER = {
  "sgd": lambda: optax.sgd(0.1),
  "momentum": lambda: optax.sgd(0.05, momentum=0.9),
  "adam": lambda: optax.adam(0.05),
}

# name -> (build the transformation around an inner optimizer, the keyword argument that drives it)
WRAPPERS = {
  "mg_grad_fn": (lambda inner: mirror_gradient(inner, A1, A2, BETA), lambda loss: {"grad_fn": _grad_fn(loss)}),
  "mg_value_fn": (lambda inner: mirror_gradient(inner, A1, A2, BETA), lambda loss: {"value_fn": loss}),
  "gnp": (lambda inner: gradient_norm_penalty(inner, PENALTY), lambda loss: {"grad_fn": _grad_fn(loss)}),
}


def _grad_fn(loss):
  return lambda params, i: jax.grad(loss)(params)


def _inner_state(name, state):
  """The wrapped optimizer's state inside a wrapper's state (GNP keeps the inner state as its own)."""
  return state if name == "gnp" else state.inner_state


# --- the problem: a quadratic 0.5 (x - c)^T A (x - c) over a two-leaf tree (x: its flattened leaves) ---

_RNG = np.random.default_rng(0)
_Q = np.linalg.qr(_RNG.normal(size=(6, 6)))[0]
_A = (_Q * np.linspace(0.5, 2.0, 6)) @ _Q.T  # eigenvalues 0.5 ... 2
_C = _RNG.normal(size=6)  # the minimum
_C2 = _RNG.normal(size=6)  # a second "batch" (another minimum), for MultiSteps
_P0 = {"b": np.zeros(2), "w": np.zeros((2, 2))}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _unflat(vec, like):
  leaves, treedef = jax.tree.flatten(like)
  sizes = np.cumsum([np.size(x) for x in leaves])[:-1]
  return jax.tree.unflatten(treedef, [v.reshape(np.shape(x)) for v, x in zip(np.split(vec, sizes), leaves)])


def _loss(c=_C):
  def loss(params):
    x = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(params)])
    d = x - jnp.asarray(c, x.dtype)
    return 0.5 * d @ jnp.asarray(_A, x.dtype) @ d

  return loss


def _grad_np(c=_C):
  return lambda params: _unflat(_A @ (_flat(params) - c), params)


def _params(dtype=jnp.float32):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), _P0)


# --- the reference: DESIGN section 2 with the unwrapped inner optimizer -------------------------------


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _reference(name, inner, grads, state, params, count, grad_np):
  """One update of ``name`` computed with ``inner`` itself; returns ``(updates, inner_state)``."""
  grads, params = _f32(grads), _f32(params)
  if name == "gnp":  # g + 2 * penalty * H g, with H g = grad(p + g) - grad(p) exactly for a quadratic
    hg = jax.tree.map(lambda a, b: a - b, grad_np(jax.tree.map(jnp.add, params, grads)), grad_np(params))
    return inner.update(jax.tree.map(lambda g, h: g + 2 * PENALTY * h, grads, _f32(hg)), state, params)
  if count % BETA:
    return inner.update(grads, state, params)
  u1, s1 = inner.update(jax.tree.map(lambda g: A1 * g, grads), state, params)
  p1 = optax.apply_updates(params, u1)
  u2, s2 = inner.update(jax.tree.map(lambda g: -A2 * g, _f32(grad_np(p1))), s1, p1)
  return jax.tree.map(jnp.add, u1, u2), s2


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol), actual, expected
  )


@functools.lru_cache(maxsize=None)
def _reference_run(name, inner_name, steps, transform_grads=None):
  """``[(updates, inner_state)]`` of ``steps`` reference updates from the zero parameters."""
  inner, grad_np = INNER[inner_name](), _grad_np()
  transform_grads = transform_grads or (lambda g: g)
  params = _params()
  state, out = inner.init(params), []
  for t in range(steps):
    updates, state = _reference(name, inner, transform_grads(grad_np(params)), state, params, t, grad_np)
    params = optax.apply_updates(params, updates)
    out.append((updates, state))
  return out


_CASES = pytest.mark.parametrize("inner_name", list(INNER))
_WRAPPERS = pytest.mark.parametrize("name", list(WRAPPERS))


def _make(name, inner_name, loss=None):
  build, driver = WRAPPERS[name]
  return build(INNER[inner_name]()), driver(_loss() if loss is None else loss)


# --- the checks --------------------------------------------------------------------------------------


@_WRAPPERS
@_CASES
def test_jit_compiles_once_and_matches_the_reference(name, inner_name):
  tx, kwargs = _make(name, inner_name)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(_loss())(params), state, params, **kwargs)
    return optax.apply_updates(params, updates), state, updates

  params, state = _params(), tx.init(_params())
  for updates_ref, state_ref in _reference_run(name, inner_name, 2 * BETA + 1):  # mirror, plain, mirror, ...
    params, state, updates = step(params, state)
    _assert_close(updates, updates_ref)
    _assert_close(_inner_state(name, state), state_ref)
  assert len(traces) == 1 and step._cache_size() == 1  # no recompilation after the first call
  if name != "gnp":
    assert isinstance(state, MirrorGradientState) and int(state.count) == 2 * BETA + 1


def _recording(inner, seen):
  """``inner`` that records, when it runs, the ``my_arg`` it was given (a keyword it alone knows)."""

  def update(updates, state, params=None, *, my_arg):
    jax.debug.callback(lambda v: seen.append(int(v)), my_arg)
    return inner.update(updates, state, params)

  return optax.GradientTransformationExtraArgs(inner.init, update)


@_WRAPPERS
@_CASES
def test_unknown_extra_args_are_forwarded_to_the_inner_transformation(name, inner_name):
  build, driver = WRAPPERS[name]
  kwargs = driver(_loss())
  seen = []
  tx = build(_recording(INNER[inner_name](), seen))
  step = jax.jit(lambda p, s, a: tx.update(jax.grad(_loss())(p), s, p, my_arg=a, **kwargs))
  params, state = _params(), tx.init(_params())
  calls = []
  for t in range(2):  # a mirror step (for MG: two inner updates, both get the argument), then a plain one
    _, state = step(params, state, jnp.asarray(t + 7))
    jax.effects_barrier()
    calls.append(list(seen))
    seen.clear()
  assert calls == ([[7], [8]] if name == "gnp" else [[7, 7], [8]])
  # A plain optax inner optimizer ignores an argument it does not know, and nothing else changes.
  tx, kwargs = _make(name, inner_name)
  grads, state = jax.grad(_loss())(params), tx.init(params)
  with_extra, _ = jax.jit(lambda s: tx.update(grads, s, params, unexpected_extra_arg=1, **kwargs))(state)
  _assert_close(with_extra, _reference_run(name, inner_name, 1)[0][0])


@_WRAPPERS
@_CASES
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_dtypes_are_kept(name, inner_name, dtype):
  tx, kwargs = _make(name, inner_name)
  params = _params(dtype)
  state0 = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss())(p), s, p, **kwargs))
  updates, state = step(params, state0)  # a mirror step
  updates2, state = step(optax.apply_updates(params, updates), state)  # an ordinary one
  assert all(u.dtype == dtype for u in jax.tree.leaves((updates, updates2)))
  assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, state0)
  # The values are those of float32 arithmetic, to the precision of the dtype.
  expected = _reference_run(name, inner_name, 1)[0][0]
  scale = max(np.max(np.abs(np.asarray(u))) for u in jax.tree.leaves(expected))
  _assert_close(updates, expected, rtol=0, atol=(3e-2 if dtype == jnp.bfloat16 else 1e-6) * scale)


@_WRAPPERS
@_CASES
def test_works_under_inject_hyperparams(name, inner_name):
  build, driver = WRAPPERS[name]
  kwargs = driver(_loss())
  if name == "gnp":
    tx = optax.inject_hyperparams(gradient_norm_penalty)(INNER[inner_name](), penalty=PENALTY)
  else:
    tx = optax.inject_hyperparams(mirror_gradient)(INNER[inner_name](), alpha1=A1, alpha2=A2, beta=BETA)

  @jax.jit
  def step(params, state):  # under jit every injected hyper-parameter is a tracer
    updates, state = tx.update(jax.grad(_loss())(params), state, params, **kwargs)
    return optax.apply_updates(params, updates), state, updates

  params, state = _params(), jax.jit(tx.init)(_params())
  for updates_ref, state_ref in _reference_run(name, inner_name, BETA + 1):
    params, state, updates = step(params, state)
    _assert_close(updates, updates_ref)
    _assert_close(_inner_state(name, state.inner_state), state_ref)
  expected = {"penalty": PENALTY} if name == "gnp" else {"alpha1": A1, "alpha2": A2, "beta": BETA}
  assert {k: float(v) for k, v in state.hyperparams.items()} == pytest.approx(expected)


@_WRAPPERS
@_CASES
def test_works_inside_multisteps_through_its_own_update(name, inner_name):
  """``MultiSteps(tx, k).update(..., grad_fn=...)`` forwards the argument: every k-th call emits the
  update of ``tx`` on the mean of the k gradients, with the ``grad_fn`` / ``value_fn`` of that call."""
  build, driver = WRAPPERS[name]
  multi = optax.MultiSteps(build(INNER[inner_name]()), every_k_schedule=2)

  @jax.jit
  def micro_step(params, state, c):  # each micro-batch has its own loss: here, its own minimum c
    loss = _loss(c)
    return multi.update(jax.grad(loss)(params), state, params, **driver(loss))

  inner, grad_np, grad_np2 = INNER[inner_name](), _grad_np(_C), _grad_np(_C2)
  params, state, state_ref = _params(), multi.init(_params()), inner.init(_params())
  for t in range(2):  # MG: a mirror step, then an ordinary one
    zeros, state = micro_step(params, state, _C)
    _assert_close(zeros, jax.tree.map(np.zeros_like, _P0), rtol=0, atol=0)
    updates, state = micro_step(params, state, _C2)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, grad_np(params), grad_np2(params))
    updates_ref, state_ref = _reference(name, inner, mean, state_ref, params, t, grad_np2)
    _assert_close(updates, updates_ref)
    _assert_close(_inner_state(name, state.inner_opt_state), state_ref)
    params = optax.apply_updates(params, updates)
  # The pitfall: optax.chain (like with_extra_args_support) wraps MultiSteps in an update that drops them.
  chained = optax.chain(multi)
  message = "got neither of grad_fn and value_fn" if name != "gnp" else "needs params and grad_fn"
  with pytest.raises(ValueError, match=message):
    chained.update(jax.grad(_loss())(params), chained.init(params), params, **driver(_loss()))


_MAX_NORM = 0.5


def _clip(g):
  """``optax.clip_by_global_norm(_MAX_NORM)``, in NumPy."""
  norm = np.linalg.norm(_flat(g))
  return g if norm <= _MAX_NORM else jax.tree.map(lambda x: x * (_MAX_NORM / norm), g)


@_WRAPPERS
@_CASES
def test_works_inside_optax_chain(name, inner_name):
  """After ``clip_by_global_norm`` in a chain: the incoming gradient is clipped, the second one is not."""
  build, driver = WRAPPERS[name]
  tx = optax.chain(optax.clip_by_global_norm(_MAX_NORM), build(INNER[inner_name]()))
  kwargs = driver(_loss())

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(_loss())(params), state, params, **kwargs)
    return optax.apply_updates(params, updates), state, updates

  params, state = _params(), tx.init(_params())
  assert np.linalg.norm(_flat(_grad_np()(params))) > 2 * _MAX_NORM  # the clip is active
  for updates_ref, _ in _reference_run(name, inner_name, BETA + 1, transform_grads=_clip):
    params, state, updates = step(params, state)
    _assert_close(updates, updates_ref)


@_WRAPPERS
@_CASES
def test_works_with_flax_nnx_optimizer(name, inner_name):
  nnx = pytest.importorskip("flax.nnx")
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)

  def model_loss(model):
    return jnp.mean((model(x) - y) ** 2)

  def grad_np(p):  # d/dK, d/db of mean((x K + b - y)^2), by hand
    r = np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"]) - np.asarray(y)
    return {"bias": 2 * r.sum(0) / r.size, "kernel": 2 * np.asarray(x, np.float64).T @ r / r.size}

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(model, nnx.Param)
  params_loss = lambda p: model_loss(nnx.merge(graphdef, p))  # p: the nnx.State of the parameters
  build, driver = WRAPPERS[name]
  optimizer = nnx.Optimizer(model, build(INNER[inner_name]()), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    optimizer.update(model, nnx.grad(model_loss)(model), **driver(params_loss))

  inner = INNER[inner_name]()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state_ref = inner.init(params)
  for t in range(BETA + 1):
    train_step(model, optimizer)
    updates_ref, state_ref = _reference(name, inner, grad_np(params), state_ref, params, t, grad_np)
    params = optax.apply_updates(params, updates_ref)
    _assert_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params)
  assert int(optimizer.step[...]) == BETA + 1


@_WRAPPERS
@_CASES
def test_converges_on_a_quadratic(name, inner_name):
  tx, kwargs = _make(name, inner_name)
  loss = _loss()

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params, **kwargs)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=600))((_params(), tx.init(_params())))
  np.testing.assert_allclose(_flat(params), _C, atol=3e-2)  # the minimum, as optax's contract asks
  assert float(loss(params)) < 1e-3 * float(loss(_params()))
