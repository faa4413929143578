"""LayerGCN and SelfCF (MMRec SELFCFED_LGN): losses against independent NumPy computations of the MMRec
formulas, LayerGCN's per-epoch edge dropout (sampling law, renormalisation, the trainer's hook and its
replay after a resume), scores as full_sort_predict, gradients, one MG step, training sanity."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
from benchmarks.data import dataset as data_lib
from benchmarks.training import loop as train_lib
from benchmarks.training.methods import make_method
from models import Interactions, LayerGCN, SelfCF, common

# ------------------------------------------------------------------------------------------------
# A tiny hand-made data set: 5 users x 7 items (the one of tests/test_models.py)
# ------------------------------------------------------------------------------------------------
N_USERS, N_ITEMS, DIM = 5, 7, 4
TRAIN_USER = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0], np.int32)  # (0, 1) twice: binary graph
TRAIN_ITEM = np.array([0, 1, 2, 2, 3, 1, 4, 5, 0, 6, 5, 1], np.int32)
PAIRS = sorted(set(zip(TRAIN_USER.tolist(), TRAIN_ITEM.tolist())))  # the 11 distinct pairs
DATA = Interactions(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM)
BATCH_NP = {
  "user": np.array([0, 1, 2, 3, 4, 0], np.int32),
  "pos": np.array([1, 3, 4, 6, 5, 2], np.int32),
  "neg": np.array([6, 0, 3, 2, 1, 5], np.int32),
}
BATCH = {k: jnp.asarray(v) for k, v in BATCH_NP.items()}
KEY = jax.random.key(42)


def layergcn(**overrides) -> LayerGCN:
  hp = dict(embedding_dim=DIM, n_layers=2, reg_weight=0.3, dropout=0.0, propagation="segment_sum")
  return LayerGCN(DATA, rngs=nnx.Rngs(0), **{**hp, **overrides})


def selfcf(**overrides) -> SelfCF:
  hp = dict(embedding_dim=DIM, n_layers=2, dropout=0.5, reg_weight=0.1, propagation="segment_sum")
  return SelfCF(DATA, rngs=nnx.Rngs(0), **{**hp, **overrides})


def npv(variable) -> np.ndarray:
  return np.asarray(variable[...], dtype=np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _jit_loss(graphdef, state, batch, key):
  return nnx.merge(graphdef, state).loss(batch, key)


def loss_of(m, batch=BATCH, key=KEY) -> float:
  """``m.loss(batch, key)``, compiled once per model structure (eager op-by-op dispatch is slow)."""
  graphdef, state = nnx.split(m)
  return float(_jit_loss(graphdef, state, batch, key))


# ------------------------------------------------------------------------------------------------
# Independent NumPy references (float64)
# ------------------------------------------------------------------------------------------------
def np_adjacency(keep=None) -> np.ndarray:
  """Dense symmetric graph of the kept distinct pairs, normalised on the kept degrees (+1e-7)."""
  keep = np.ones(len(PAIRS), bool) if keep is None else np.asarray(keep)
  pu = np.array([p[0] for p in PAIRS])[keep]
  pi = np.array([p[1] for p in PAIRS])[keep]
  du = np.bincount(pu, minlength=N_USERS) + 1e-7
  di = np.bincount(pi, minlength=N_ITEMS) + 1e-7
  a = np.zeros((N_USERS + N_ITEMS,) * 2)
  v = du[pu] ** -0.5 * di[pi] ** -0.5
  a[pu, N_USERS + pi] = v
  a[N_USERS + pi, pu] = v
  return a


def np_cos(a, b, eps=1e-8):
  na = np.maximum(np.linalg.norm(a, axis=-1), eps)
  nb = np.maximum(np.linalg.norm(b, axis=-1), eps)
  return np.sum(a * b, -1) / (na * nb)


def np_layer_refined(user0, item0, n_layers, a):
  ego = np.concatenate([user0, item0])
  e, total = ego, np.zeros_like(ego)
  for _ in range(n_layers):
    h = a @ e
    e = np_cos(h, ego)[:, None] * h
    total += e
  return total[:N_USERS], total[N_USERS:]


def np_layergcn_loss(m: LayerGCN, b, a, reg):
  u0, i0 = npv(m.user_embedding.embedding), npv(m.item_embedding.embedding)
  users, items = np_layer_refined(u0, i0, m.n_layers, a)
  u = users[b["user"]]
  x = (u * items[b["pos"]]).sum(1) - (u * items[b["neg"]]).sum(1)
  bpr = np.sum(np.log1p(np.exp(-x)))  # sum_b -log sigmoid(x_b)
  l2 = sum(0.5 * np.sum(e**2) for e in (u0[b["user"]], i0[b["pos"]], i0[b["neg"]]))
  return bpr + reg * l2


def np_linear(x, lin):
  return x @ npv(lin.kernel) + npv(lin.bias)


def np_lightgcn_mean(user0, item0, n_layers, a):
  layers = [np.concatenate([user0, item0])]
  for _ in range(n_layers):
    layers.append(a @ layers[-1])
  out = np.mean(layers, axis=0)
  return out[:N_USERS], out[N_USERS:]


def np_selfcf_loss(m: SelfCF, b, key, p, reg, ratio):
  """MMRec SELFCFED_LGN.calculate_loss with the draws named in models/selfcf.py's docstring."""
  k_rate, k_edge, k_target = jax.random.split(key, 3)
  a_full = np_adjacency()
  rows, cols = np.asarray(m.graph.rows[...]), np.asarray(m.graph.cols[...])
  rate = ratio * float(jax.random.uniform(k_rate))
  x = np.asarray(jax.random.uniform(k_edge, rows.shape), np.float64)
  a = np.zeros_like(a_full)
  a[rows, cols] = np.where(x >= rate, a_full[rows, cols] / (1.0 - rate), 0.0) if ratio else a_full[rows, cols]
  users, items = np_lightgcn_mean(npv(m.user_embedding.embedding), npv(m.item_embedding.embedding), m.n_layers, a)
  u, i = users[b["user"]], items[b["pos"]]
  n = len(b["user"])
  keep = np.asarray(jax.random.bernoulli(k_target, 1.0 - p, (2 * n, DIM)))
  u_t, i_t = np.where(keep[:n], u / (1 - p), 0.0), np.where(keep[n:], i / (1 - p), 0.0)
  pred = lambda z: np_linear(z, m.predictor)  # noqa: E731
  loss = -np.mean(np_cos(pred(u), i_t)) / 2 - np.mean(np_cos(pred(i), u_t)) / 2
  return loss + reg * 0.5 * (np.sum(u**2) + np.sum(i**2))


# ------------------------------------------------------------------------------------------------
# LayerGCN
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers,propagation", [(1, "segment_sum"), (3, "sparse"), (4, "chunked")])
def test_layergcn_loss_matches_numpy_on_the_full_graph(n_layers, propagation):
  m = layergcn(n_layers=n_layers, propagation=propagation)
  np.testing.assert_allclose(np.asarray(m.graph.dense()), np_adjacency(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss_of(m), np_layergcn_loss(m, BATCH_NP, np_adjacency(), 0.3), rtol=1e-5, atol=1e-6)


def test_layergcn_loss_with_a_fixed_mask_matches_numpy_renormalisation():
  m = layergcn(dropout=0.3)
  keep = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1], bool)  # a hand-picked mask of the 11 pairs
  m.train_values[...] = m.masked_values(jnp.asarray(keep))
  a = np_adjacency(keep)
  assert np.count_nonzero(a) == 2 * keep.sum()
  np.testing.assert_allclose(loss_of(m), np_layergcn_loss(m, BATCH_NP, a, 0.3), rtol=1e-5, atol=1e-6)
  # the epoch hook installs the mask it samples, renormalised the same way
  for epoch in (0, 1):
    m.pre_epoch(KEY, epoch)
    sampled = np.asarray(m.edge_keep_mask(KEY, epoch))
    assert sampled.sum() == int(len(PAIRS) * (1 - 0.3))
    np.testing.assert_allclose(
      loss_of(m), np_layergcn_loss(m, BATCH_NP, np_adjacency(sampled), 0.3), rtol=1e-5, atol=1e-6
    )
  # inference always uses the full graph
  users, items = m.embed()
  ru, ri = np_layer_refined(npv(m.user_embedding.embedding), npv(m.item_embedding.embedding), 2, np_adjacency())
  np.testing.assert_allclose(np.asarray(users), ru, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(items), ri, rtol=1e-5, atol=1e-6)


def _ppswor_inclusion(w: np.ndarray, k: int) -> np.ndarray:
  """Exact inclusion probabilities of sequential sampling without replacement proportional to ``w``
  (torch.multinomial(w, k, replacement=False)), by dynamic programming over drawn subsets."""
  n = len(w)
  prob = {frozenset(): 1.0}
  for _ in range(k):
    nxt: dict[frozenset, float] = {}
    for s, ps in prob.items():
      rest = w.sum() - sum(w[j] for j in s)
      for j in range(n):
        if j not in s:
          t = s | {j}
          nxt[t] = nxt.get(t, 0.0) + ps * w[j] / rest
    prob = nxt
  out = np.zeros(n)
  for s, ps in prob.items():
    out[list(s)] += ps
  return out


def test_layergcn_edge_sampling_law():
  """Even epochs: degree-sensitive (torch.multinomial on the normalised values); odd: uniform."""
  m = layergcn(dropout=0.5)
  k = int(len(PAIRS) * 0.5)
  d_u = np.bincount([p[0] for p in PAIRS], minlength=N_USERS)
  d_i = np.bincount([p[1] for p in PAIRS], minlength=N_ITEMS)
  v = np.array([(d_u[u] + 1e-7) ** -0.5 * (d_i[i] + 1e-7) ** -0.5 for u, i in PAIRS])
  np.testing.assert_allclose(np.asarray(m.edge_values[...]), v, rtol=1e-6)
  keys = jax.random.split(jax.random.key(0), 4000)
  for epoch, expect in ((0, _ppswor_inclusion(v, k)), (1, np.full(len(PAIRS), k / len(PAIRS)))):
    masks = np.asarray(jax.jit(jax.vmap(lambda kk: m.edge_keep_mask(kk, epoch)))(keys))
    assert (masks.sum(1) == k).all()
    np.testing.assert_allclose(masks.mean(0), expect, atol=0.035)  # ~4 standard errors
  assert np.ptp(_ppswor_inclusion(v, k)) > 0.15  # the degree-sensitive law is far from uniform


def test_layergcn_without_dropout_trains_on_the_full_graph():
  m = layergcn(dropout=0.0)
  before = np.asarray(m.train_values[...])
  m.pre_epoch(KEY, 0)
  np.testing.assert_array_equal(np.asarray(m.train_values[...]), before)
  np.testing.assert_array_equal(before, np.asarray(m.graph.values[...]))


def test_epoch_constants_hook_is_keyed_by_seed_and_epoch():
  m = layergcn(dropout=0.4)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  assert train_lib.has_epoch_hook(LayerGCN)
  assert not any(train_lib.has_epoch_hook(models.get_model(n)) for n in ("vbpr", "lightgcn", "bm3", "selfcf"))
  tv = lambda seed, epoch: np.asarray(  # noqa: E731
    train_lib.epoch_constants(graphdef, params, rest, seed, epoch)["train_values"]
  )
  out = train_lib.epoch_constants(graphdef, params, rest, 0, 3)
  assert jax.tree.structure(out) == jax.tree.structure(rest)  # same pytree: no retrace of the train step
  np.testing.assert_array_equal(np.asarray(out["graph"]["values"]), np.asarray(rest["graph"]["values"]))
  np.testing.assert_array_equal(tv(0, 3), tv(0, 3))
  assert not np.array_equal(tv(0, 2), tv(0, 3)) or not np.array_equal(tv(0, 2), tv(1, 2))
  # the hook's mask is the model's mask for the documented key
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 2**32 - 1), 6)
  np.testing.assert_allclose(tv(5, 6), np.asarray(m.masked_values(m.edge_keep_mask(key, 6))), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  return data_lib.synthetic_preset("tiny", seed=0)


def test_layergcn_resumed_run_replays_the_masks(tiny, tmp_path, monkeypatch):
  # batch 155 divides tiny's 465 training pairs: no remainder batch, one compilation
  config = train_lib.TrainConfig(
    model="layergcn",
    max_epochs=4,
    patience=50,
    batch_size=155,
    seed=1,
    learning_rate=5e-3,
    model_hparams={"n_layers": 1, "dropout": 0.2},
  )
  full = train_lib.train(tiny, config, progress=False)

  real, calls = train_lib.evaluate_params, []

  def interrupted(*args, **kwargs):  # dies at the validation of epoch 2 (checkpoint of epoch 1 saved)
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(train_lib, "evaluate_params", interrupted)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train(tiny, config, checkpoint_dir=tmp_path, progress=False)
  monkeypatch.setattr(train_lib, "evaluate_params", real)
  resumed = train_lib.train(tiny, config, checkpoint_dir=tmp_path, resume=True, progress=False)
  assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
  assert [h["valid"] for h in resumed["history"]] == [h["valid"] for h in full["history"]]
  assert resumed["test"] == full["test"]


def test_layergcn_bad_arguments():
  with pytest.raises(ValueError, match="n_layers must be > 0"):
    layergcn(n_layers=0)
  with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
    layergcn(dropout=1.0)
  with pytest.raises(ValueError, match="reg_weight must be >= 0"):
    layergcn(reg_weight=-1.0)


# ------------------------------------------------------------------------------------------------
# SelfCF
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, 0.0])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_selfcf_loss_matches_numpy(ratio, n_layers):
  m = selfcf(edge_drop_ratio=ratio, n_layers=n_layers)
  for key in (KEY, jax.random.key(7), jax.random.key(8)):
    np.testing.assert_allclose(
      loss_of(m, BATCH, key), np_selfcf_loss(m, BATCH_NP, key, 0.5, 0.1, ratio), rtol=1e-5, atol=1e-6
    )


def test_selfcf_randomness_comes_from_the_key_and_ignores_negatives():
  m = selfcf()
  assert loss_of(m) == loss_of(m)
  assert loss_of(m, BATCH, jax.random.key(1)) != loss_of(m)
  other_neg = {**BATCH, "neg": BATCH["neg"][::-1]}
  assert loss_of(m, other_neg) == loss_of(m)
  det = selfcf(dropout=0.0, edge_drop_ratio=0.0)
  assert loss_of(det) == loss_of(det, BATCH, jax.random.key(1))


def test_selfcf_targets_carry_no_gradient():
  """Identity predictor, no dropout, no layers: loss = -cos(u, sg(i))/2 - cos(i, sg(u))/2, so the
  user-table gradient is that of the first term only (half the gradient without stop_gradient)."""
  m = selfcf(dropout=0.0, edge_drop_ratio=0.0, reg_weight=0.0, n_layers=0)
  m.predictor.kernel[...] = jnp.eye(DIM)
  m.predictor.bias[...] = jnp.zeros(DIM)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  g = jax.grad(lambda p: nnx.merge(graphdef, p, rest).loss(BATCH, KEY))(params)
  g = g["user_embedding"]["embedding"][...]
  u = m.user_embedding.embedding[...][BATCH["user"]]
  i = m.item_embedding.embedding[...][BATCH["pos"]]
  g_half = jax.grad(lambda uu: -jnp.mean(common.cosine_similarity(uu, i)) / 2)(u)
  expect = jnp.zeros_like(g).at[BATCH["user"]].add(g_half)
  np.testing.assert_allclose(np.asarray(g), np.asarray(expect), rtol=1e-5, atol=1e-7)


def test_selfcf_scores_are_full_sort_predict():
  m = selfcf()
  u, i = np_lightgcn_mean(npv(m.user_embedding.embedding), npv(m.item_embedding.embedding), 2, np_adjacency())
  expect = np_linear(u, m.predictor) @ i.T + u @ np_linear(i, m.predictor).T
  uids = jnp.array([3, 0, 4], jnp.int32)
  np.testing.assert_allclose(np.asarray(m.scores(uids)), expect[[3, 0, 4]], rtol=1e-5, atol=1e-6)
  users, items = m.embed()
  assert users.shape == (N_USERS, 2 * DIM) and items.shape == (N_ITEMS, 2 * DIM)
  np.testing.assert_allclose(np.asarray(users @ items.T), expect, rtol=1e-5, atol=1e-6)


def test_selfcf_init_and_bad_arguments():
  m = SelfCF(DATA, rngs=nnx.Rngs(0))
  assert (m.embedding_dim, m.n_layers, m.dropout, m.reg_weight) == (64, 2, 0.5, 0.0)
  bound = 1 / math.sqrt(64)  # PyTorch's nn.Linear default: weight and bias U(-1/sqrt(in), 1/sqrt(in))
  for w in (m.predictor.kernel[...], m.predictor.bias[...]):
    assert 0.8 * bound < float(jnp.abs(w).max()) <= bound
  with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
    selfcf(dropout=1.0)
  with pytest.raises(ValueError, match=r"edge_drop_ratio must be in \[0, 1\]"):
    selfcf(edge_drop_ratio=1.5)


# ------------------------------------------------------------------------------------------------
# Both: registration, defaults, gradients, one MG step, training sanity
# ------------------------------------------------------------------------------------------------
def test_registered_with_mmrec_defaults():
  assert models.get_model("LayerGCN") is LayerGCN and models.get_model("selfcf") is SelfCF
  lg = LayerGCN(DATA, rngs=nnx.Rngs(0))
  assert (lg.embedding_dim, lg.n_layers, lg.reg_weight, lg.dropout) == (64, 4, 1e-2, 0.0)
  assert LayerGCN.requires == SelfCF.requires == ()


BUILDERS = {"layergcn": lambda: layergcn(dropout=0.3), "selfcf": selfcf}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_jit_split_merge_equals_eager_and_grads_finite(name):
  m = BUILDERS[name]()
  if name == "layergcn":
    m.pre_epoch(KEY, 0)
  eager = float(m.loss(BATCH, KEY))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  value, grads = jax.jit(jax.value_and_grad(lambda p, r: nnx.merge(graphdef, p, r).loss(BATCH, KEY)))(params, rest)
  np.testing.assert_allclose(float(value), eager, rtol=1e-6)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_one_mirror_gradient_step_through_grad_fn(name):
  m = BUILDERS[name]()
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  tx = make_method("mg", learning_rate=1e-2, alpha1=1.0, alpha2=0.2, beta=1).tx
  state = tx.init(params)
  seen = []

  def loss_fn(p, k):
    return nnx.merge(graphdef, p, rest).loss(BATCH, k)

  def grad_fn(p, i):  # as benchmarks.train: a fresh key for the second gradient
    g = jax.grad(loss_fn)(p, jax.random.fold_in(KEY, 1000 + i))
    seen.append(i)
    return g

  loss, grads = jax.value_and_grad(loss_fn)(params, KEY)
  updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
  new = optax.apply_updates(params, updates)
  assert seen, "MG with beta=1 must call grad_fn on the first step"
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params))]
  assert math.isfinite(float(loss)) and max(moved) > 0 and all(math.isfinite(x) for x in moved)
  assert math.isfinite(float(loss_fn(new, KEY)))
  if name == "selfcf":  # dropout from the key: the second gradient's draw differs from the first's
    g2 = jax.grad(loss_fn)(params, jax.random.fold_in(KEY, 1000))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g2)))


#: name: (hyper-parameters, learning rate, batch size, epochs, required Recall@20 / popularity's). The
#: batch sizes divide the 4,836 training pairs (no remainder batch: one compilation).
SANITY = {
  "layergcn": (dict(embedding_dim=32, n_layers=2, reg_weight=1e-3, dropout=0.1), 1e-2, 372, 2, 1.8),
  "selfcf": (dict(embedding_dim=32, n_layers=1), 3e-2, 124, 3, 1.5),
}


@pytest.mark.parametrize("name", list(SANITY))
def test_training_sanity_through_the_trainer(name, sanity_data):
  ds, pop = sanity_data
  hparams, lr, batch, epochs, factor = SANITY[name]
  config = train_lib.TrainConfig(
    model=name,
    max_epochs=epochs,
    eval_every=epochs,
    patience=100,
    batch_size=batch,
    learning_rate=lr,
    model_hparams=hparams,
  )
  record = train_lib.train(ds, config, progress=False)
  recall = record["valid"]["recall@20"]
  print(
    f"{name}: losses {[round(h['loss'], 3) for h in record['history']]}; "
    f"valid Recall@20 {recall:.3f} vs popularity {pop:.3f}"
  )
  assert all(math.isfinite(h["loss"]) for h in record["history"])
  assert recall > factor * pop
