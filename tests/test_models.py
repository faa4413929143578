"""Tests for models/: each loss against an independent NumPy computation of DESIGN.md section 3,
the interface (embed/scores/split-merge-jit), variable kinds, errors, MG compatibility, training sanity."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
from models import BM3, VBPR, Interactions, LightGCN, common
from models.common import FeatureTable, FrozenFeatures, GraphConstant

# ------------------------------------------------------------------------------------------------
# A tiny hand-made data set: 5 users x 7 items, text 6-d, image 5-d.
# ------------------------------------------------------------------------------------------------
N_USERS, N_ITEMS, DIM = 5, 7, 4
TRAIN_USER = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0], np.int32)  # (0, 1) twice: binary graph
TRAIN_ITEM = np.array([0, 1, 2, 2, 3, 1, 4, 5, 0, 6, 5, 1], np.int32)
_rng = np.random.default_rng(0)
FEATURES = {
  "text": _rng.normal(size=(N_ITEMS, 6)).astype(np.float32),
  "image": _rng.normal(size=(N_ITEMS, 5)).astype(np.float32),
}
DATA = Interactions(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM, FEATURES)
BATCH_NP = {
  "user": np.array([0, 1, 2, 3, 4, 0], np.int32),
  "pos": np.array([1, 3, 4, 6, 5, 2], np.int32),
  "neg": np.array([6, 0, 3, 2, 1, 5], np.int32),
}
BATCH = {k: jnp.asarray(v) for k, v in BATCH_NP.items()}
KEY = jax.random.key(42)

HPARAMS = {
  "vbpr": dict(embedding_dim=DIM, reg_weight=0.5),
  "lightgcn": dict(embedding_dim=DIM, n_layers=2, reg_weight=0.3),
  "bm3": dict(embedding_dim=DIM, n_layers=2, reg_weight=0.1, dropout=0.5, cl_weight=2.0),
  "layergcn": dict(embedding_dim=DIM, n_layers=2, reg_weight=0.3, dropout=0.2),
  "selfcf": dict(embedding_dim=DIM, n_layers=2, dropout=0.5, reg_weight=0.1),
}


def build(name: str, seed: int = 0, **overrides):
  cls = models.get_model(name)
  return cls(DATA, rngs=nnx.Rngs(seed), **{**HPARAMS[name], **overrides})


def interactions_of(ds) -> Interactions:
  """The training interactions of a ``benchmarks.data.dataset.Dataset``."""
  return Interactions(ds.n_users, ds.n_items, ds.train.user, ds.train.item, ds.features)


def npv(variable) -> np.ndarray:
  return np.asarray(variable[...], dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Independent NumPy references (float64)
# ------------------------------------------------------------------------------------------------
def np_bpr(pos, neg):
  return -np.mean(np.log(1e-10 + 1.0 / (1.0 + np.exp(-(pos - neg)))))


def np_emb_loss(*embs):
  return sum(np.sqrt(np.sum(e**2)) for e in embs) / embs[-1].shape[0]


def np_norm_adj():
  n = N_USERS + N_ITEMS
  a = np.zeros((n, n))
  a[TRAIN_USER, N_USERS + TRAIN_ITEM] = 1.0
  a[N_USERS + TRAIN_ITEM, TRAIN_USER] = 1.0
  d = np.power(a.sum(1) + 1e-7, -0.5)
  return np.diag(d) @ a @ np.diag(d)


def np_lightgcn(user0, item0, n_layers):
  a, e = np_norm_adj(), np.concatenate([user0, item0])
  layers = [e]
  for _ in range(n_layers):
    layers.append(a @ layers[-1])
  out = np.mean(layers, axis=0)
  return out[:N_USERS], out[N_USERS:]


def np_cos(a, b, eps=1e-8):
  """torch.cosine_similarity: a.b / (max(|a|, eps) max(|b|, eps)); a dropped-out (zero) row gives 0."""
  na = np.maximum(np.linalg.norm(a, axis=-1), eps)
  nb = np.maximum(np.linalg.norm(b, axis=-1), eps)
  return np.sum(a * b, -1) / (na * nb)


def np_linear(x, lin):
  return x @ npv(lin.kernel) + npv(lin.bias)


def np_vbpr_loss(m: VBPR, b, reg):
  p = npv(m.user_embedding.embedding)
  feats = np.concatenate([FEATURES["text"], FEATURES["image"]], 1)  # text first
  items = np.concatenate([npv(m.item_embedding.embedding), np_linear(feats, m.item_linear)], 1)
  u, ip, ineg = p[b["user"]], items[b["pos"]], items[b["neg"]]
  return np_bpr((u * ip).sum(1), (u * ineg).sum(1)) + reg * np_emb_loss(u, ip, ineg)


def np_lightgcn_loss(m: LightGCN, b, n_layers, reg):
  u0, i0 = npv(m.user_embedding.embedding), npv(m.item_embedding.embedding)
  users, items = np_lightgcn(u0, i0, n_layers)
  u, ip, ineg = users[b["user"]], items[b["pos"]], items[b["neg"]]
  return np_bpr((u * ip).sum(1), (u * ineg).sum(1)) + reg * np_emb_loss(u0[b["user"]], i0[b["pos"]], i0[b["neg"]])


def np_bm3_loss(m: BM3, b, key, n_layers, reg, p, cl):
  h = npv(m.item_id_embedding.embedding)
  u_g, i_g = np_lightgcn(npv(m.user_embedding.embedding), h, n_layers)
  u_on, i_on = u_g, i_g + h
  t_on = np_linear(npv(m.text_features), m.text_trs)
  v_on = np_linear(npv(m.image_features), m.image_trs)
  # F.dropout on the full tables; the masks are consecutive row blocks of one bernoulli draw
  keep = np.asarray(jax.random.bernoulli(key, 1.0 - p, (N_USERS + 3 * N_ITEMS, DIM)))
  blocks = np.split(keep, [N_USERS, N_USERS + N_ITEMS, N_USERS + 2 * N_ITEMS])

  def target(x, mask):
    return np.where(mask, x / (1.0 - p), 0.0)

  u_t, i_t, t_t, v_t = (target(x, k) for x, k in zip((u_on, i_on, t_on, v_on), blocks))
  pred = lambda x: np_linear(x, m.predictor)  # noqa: E731
  us, its = b["user"], b["pos"]
  c = lambda x, y: 1.0 - np.mean(np_cos(x, y))  # noqa: E731
  loss = c(pred(u_on)[us], i_t[its]) + c(pred(i_on)[its], u_t[us])
  loss += reg * (np.linalg.norm(u_on) + np.linalg.norm(i_on)) / N_ITEMS
  loss += cl * (
    c(pred(t_on)[its], i_t[its])
    + c(pred(v_on)[its], i_t[its])
    + c(pred(t_on)[its], t_t[its])
    + c(pred(v_on)[its], v_t[its])
  )
  return loss


# ------------------------------------------------------------------------------------------------
# Loss == NumPy formula
# ------------------------------------------------------------------------------------------------
def test_vbpr_loss_matches_numpy():
  m = build("vbpr")
  assert m.user_embedding.embedding[...].shape == (N_USERS, 2 * DIM)
  assert m.item_embedding.embedding[...].shape == (N_ITEMS, DIM)
  assert m.item_linear.kernel[...].shape == (6 + 5, DIM)
  np.testing.assert_allclose(float(m.loss(BATCH, KEY)), np_vbpr_loss(m, BATCH_NP, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_layers", [0, 2])
@pytest.mark.parametrize("propagation", ["segment_sum", "sparse"])
def test_lightgcn_loss_matches_numpy(n_layers, propagation):
  m = build("lightgcn", n_layers=n_layers, propagation=propagation)
  np.testing.assert_allclose(
    float(m.loss(BATCH, KEY)), np_lightgcn_loss(m, BATCH_NP, n_layers, 0.3), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("n_layers", [1, 2])
def test_bm3_loss_matches_numpy(n_layers):
  m = build("bm3", n_layers=n_layers)
  for key in (KEY, jax.random.key(7)):
    np.testing.assert_allclose(
      float(m.loss(BATCH, key)), np_bm3_loss(m, BATCH_NP, key, n_layers, 0.1, 0.5, 2.0), rtol=1e-5, atol=1e-6
    )


def test_bm3_dropout_comes_from_key():
  m = build("bm3")
  a, b = m.loss(BATCH, KEY), m.loss(BATCH, KEY)
  assert float(a) == float(b)
  assert float(m.loss(BATCH, jax.random.key(1))) != float(a)
  no_drop = build("bm3", dropout=0.0)
  assert float(no_drop.loss(BATCH, KEY)) == float(no_drop.loss(BATCH, jax.random.key(1)))


def test_bm3_targets_carry_no_gradient():
  """With dropout 0 and the predictor set to identity, d loss_ui / d target = 0 is visible in the
  gradient of the item table only through the online branch: compare with NumPy finite check."""
  m = build("bm3", dropout=0.0, reg_weight=0.0, cl_weight=0.0, n_layers=0)
  m.predictor.kernel[...] = jnp.eye(DIM)
  m.predictor.bias[...] = jnp.zeros(DIM)
  # loss = (1 - cos(u_b, i_b)) + (1 - cos(i_b, u_b)) with targets stopped: gradient w.r.t. users
  # comes only from the first term, so it equals half of the gradient without stop_gradient.
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def f(p):
    return nnx.merge(graphdef, p, rest).loss(BATCH, KEY)

  g = jax.jit(jax.grad(f))(params)["user_embedding"]["embedding"][...]
  u = m.user_embedding.embedding[...][BATCH["user"]]
  i = m.item_id_embedding.embedding[...][BATCH["pos"]] * 2.0  # n_layers=0: i_on = E_0 + H = 2H

  def full(uu):
    return 2 * (1 - jnp.mean(common.cosine_similarity(uu, i)))

  g_full = jax.grad(full)(u)
  expect = jnp.zeros_like(g).at[BATCH["user"]].add(g_full / 2)
  np.testing.assert_allclose(np.asarray(g), np.asarray(expect), rtol=1e-5, atol=1e-7)


def test_cosine_of_a_dropped_out_row_is_zero_with_finite_gradient():
  a = jnp.array([[1.0, 2.0], [0.5, -1.0]])
  b = jnp.array([[0.0, 0.0], [1.0, 1.0]])  # first target row fully dropped out
  cos = common.cosine_similarity(a, b)
  assert float(cos[0]) == 0.0
  np.testing.assert_allclose(float(cos[1]), -0.5 / (np.sqrt(1.25) * np.sqrt(2)), rtol=1e-6)
  assert bool(jnp.all(jnp.isfinite(jax.grad(lambda x: common.cosine_similarity(x, x * 0).sum())(a))))


# ------------------------------------------------------------------------------------------------
# Interface
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vbpr", "lightgcn", "bm3"])
def test_scores_equal_embed_product(name):
  m = build(name)
  users, items = m.embed()
  assert users.shape[0] == N_USERS and items.shape[0] == N_ITEMS
  uids = jnp.array([3, 0, 4], jnp.int32)
  s = m.scores(uids)
  assert s.shape == (3, N_ITEMS)
  np.testing.assert_allclose(np.asarray(s), np.asarray(users[uids] @ items.T), rtol=1e-5, atol=1e-6)


def test_embed_definitions():
  vb = build("vbpr")
  u, i = vb.embed()
  np.testing.assert_allclose(np.asarray(i[:, :DIM]), np.asarray(vb.item_embedding.embedding[...]))
  lg = build("lightgcn")
  u, i = lg.embed()
  ru, ri = np_lightgcn(npv(lg.user_embedding.embedding), npv(lg.item_embedding.embedding), 2)
  np.testing.assert_allclose(np.asarray(u), ru, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(i), ri, rtol=1e-5, atol=1e-6)
  bm = build("bm3")
  u, i = bm.embed()
  h = npv(bm.item_id_embedding.embedding)
  ru, ri = np_lightgcn(npv(bm.user_embedding.embedding), h, 2)
  np.testing.assert_allclose(np.asarray(u), np_linear(ru, bm.predictor), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(i), np_linear(ri + h, bm.predictor), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vbpr", "lightgcn", "bm3"])
def test_jit_split_merge_equals_eager_and_grads_finite(name):
  m = build(name)
  eager = float(m.loss(BATCH, KEY))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  @jax.jit
  def value_and_grad(params, rest, batch, key):
    return jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest).loss(batch, key))(params)

  value, grads = value_and_grad(params, rest, BATCH, KEY)
  np.testing.assert_allclose(float(value), eager, rtol=1e-6)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_variable_kinds():
  vb, lg, bm = build("vbpr"), build("lightgcn"), build("bm3")
  # constants are never parameters
  for m in (vb, lg, bm):
    params = nnx.state(m, nnx.Param)
    assert "graph" not in params
  assert set(nnx.state(lg, GraphConstant)["graph"].keys()) == {"rows", "cols", "values"}
  assert set(nnx.state(vb, FrozenFeatures).keys()) == {"text_features", "image_features"}
  assert "text_features" not in nnx.state(vb, nnx.Param)
  # BM3's feature tables are trainable, initialised from the features
  tables = nnx.state(bm, FeatureTable)
  assert set(tables.keys()) == {"text_features", "image_features"}
  assert "text_features" in nnx.state(bm, nnx.Param)
  np.testing.assert_array_equal(np.asarray(bm.text_features[...]), FEATURES["text"])
  # ID tables are nnx.Embed
  assert isinstance(lg.user_embedding, nnx.Embed) and isinstance(bm.item_id_embedding, nnx.Embed)


def test_init_schemes():
  """xavier-uniform ID tables (bounded by sqrt(6/(fan_in+fan_out))), zero VBPR bias, torch BM3 bias."""
  big = LightGCN(Interactions(300, 200, np.arange(300) % 200, np.arange(300) % 200), rngs=nnx.Rngs(0))
  w = np.asarray(big.user_embedding.embedding[...])
  bound = math.sqrt(6 / (300 + 64))
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
  np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.05)
  vb = build("vbpr")
  np.testing.assert_array_equal(np.asarray(vb.item_linear.bias[...]), 0.0)
  k = common.xavier_normal()(jax.random.key(0), (400, 300))
  np.testing.assert_allclose(float(jnp.std(k)), math.sqrt(2 / 700), rtol=0.02)
  assert float(jnp.abs(k).max()) > 2.5 * math.sqrt(2 / 700)  # not truncated at 2 sd
  bm = build("bm3")
  assert 0 < float(jnp.abs(bm.predictor.bias[...]).max()) <= 1 / math.sqrt(DIM)


def test_every_model_is_built_from_interactions_only():
  """One construction: ``Model(interactions, *, rngs, **hparams)``; the arrays may come in any integer /
  real dtype (converted as the models always did), and the old five-argument form is gone."""
  loose = Interactions(
    np.int64(N_USERS),
    N_ITEMS,
    TRAIN_USER.astype(np.int64),
    TRAIN_ITEM.tolist(),
    {m: t.astype(np.float64) for m, t in FEATURES.items()},
  )
  for name in models.MODELS:
    cls = models.get_model(name)
    a = cls(loose, rngs=nnx.Rngs(0), **HPARAMS[name])
    b = build(name)
    assert float(a.loss(BATCH, KEY)) == float(b.loss(BATCH, KEY))
    assert not hasattr(cls, "from_dataset")
    with pytest.raises(TypeError):
      cls(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM, FEATURES, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=rf"{cls.__name__} is built from a models.Interactions.*got dict"):
      cls({"n_users": N_USERS}, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError):
      cls(interactions=DATA, rngs=nnx.Rngs(0))  # positional only: no clash with a hyper-parameter


def test_interactions_are_converted_and_immutable():
  data = Interactions(N_USERS, N_ITEMS, TRAIN_USER.astype(np.int64), TRAIN_ITEM, {"text": FEATURES["text"]})
  assert data.train_user.dtype == data.train_item.dtype == np.int32
  assert data.features["text"].dtype == np.float32
  np.testing.assert_array_equal(data.train_user, TRAIN_USER)
  assert (
    len(data) == len(TRAIN_USER) and repr(data) == "Interactions(n_users=5, n_items=7, train=12, features={text: 7x6})"
  )
  with pytest.raises(dataclasses.FrozenInstanceError):
    data.n_users = 6
  with pytest.raises(ValueError, match="read-only"):
    data.train_item[0] = 1
  with pytest.raises(ValueError, match="read-only"):
    data.features["text"][0, 0] = 1.0
  with pytest.raises(TypeError):
    data.features["image"] = FEATURES["image"]
  assert dict(Interactions(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM).features) == {}
  assert Interactions(1, 1, np.array([], np.int32), np.array([], np.int32)).train_user.shape == (0,)


#: (field changes, the ValueError's message): every error names the field it is about.
BAD_INTERACTIONS = [
  (dict(n_users=0), r"Interactions\.n_users must be positive, got 0"),
  (dict(n_users=5.0), r"Interactions\.n_users must be an integer, got 5\.0"),
  (dict(n_users=True), r"Interactions\.n_users must be an integer, got True"),
  (dict(n_items=-7), r"Interactions\.n_items must be positive, got -7"),
  (dict(n_items="7"), r"Interactions\.n_items must be an integer, got '7'"),
  (dict(train_user=TRAIN_USER[None]), r"Interactions\.train_user must be 1-D, got shape \(1, 12\)"),
  (
    dict(train_user=TRAIN_USER.astype(np.float32)),
    r"Interactions\.train_user must hold integer ids, got dtype float32",
  ),
  (dict(train_user=TRAIN_USER - 1), r"Interactions\.train_user ids must lie in \[0, n_users=5\), got range \[-1, 3\]"),
  (dict(train_item=TRAIN_ITEM + 1), r"Interactions\.train_item ids must lie in \[0, n_items=7\), got range \[1, 7\]"),
  (dict(train_item=TRAIN_ITEM > 2), r"Interactions\.train_item must hold integer ids, got dtype bool"),
  (
    dict(train_item=TRAIN_ITEM[:-1]),
    r"Interactions\.train_user and Interactions\.train_item differ in length \(12 vs 11\)",
  ),
  (dict(features=[FEATURES["text"]]), r"Interactions\.features must be a mapping .*got list"),
  (dict(features={0: FEATURES["text"]}), r"Interactions\.features keys must be modality names \(str\), got 0"),
  (dict(features={"text": None}), r"Interactions\.features\['text'\] is None"),
  (
    dict(features={"text": FEATURES["text"][:3]}),
    r"Interactions\.features\['text'\] must have shape \(n_items=7, dim\), got \(3, 6\)",
  ),
  (
    dict(features={"image": FEATURES["image"][0]}),
    r"Interactions\.features\['image'\] must have shape \(n_items=7, dim\), got \(5,\)",
  ),
  (
    dict(features={"text": FEATURES["text"].astype(str)}),
    r"Interactions\.features\['text'\] must hold real numbers, got dtype <U",
  ),
  (
    dict(features={"text": np.where(FEATURES["text"] > 1, np.nan, 0.0)}),
    r"Interactions\.features\['text'\] contains NaN or inf",
  ),
  (dict(features={"text": np.full((N_ITEMS, 2), 1e300)}), r"Interactions\.features\['text'\] contains NaN or inf"),
]


@pytest.mark.parametrize(
  "changes,message", BAD_INTERACTIONS, ids=[f"{i}-{next(iter(c))}" for i, (c, _) in enumerate(BAD_INTERACTIONS)]
)
def test_interactions_validation_names_the_field(changes, message):
  fields = dict(n_users=N_USERS, n_items=N_ITEMS, train_user=TRAIN_USER, train_item=TRAIN_ITEM, features=FEATURES)
  with pytest.raises(ValueError, match=message):
    Interactions(**{**fields, **changes})


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def test_feature_missing_errors():
  with pytest.raises(ValueError, match=r"VBPR.*'text', 'image'.*no features"):
    VBPR(Interactions(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM, {}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"BM3.*modality 'image'.*\['text'\]"):
    BM3(Interactions(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM, {"text": FEATURES["text"]}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"Interactions.features\['text'\] must have shape \(n_items=7"):
    VBPR(
      Interactions(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM, {**FEATURES, "text": FEATURES["text"][:3]}),
      rngs=nnx.Rngs(0),
    )
  # ID-only LightGCN builds without features
  LightGCN(Interactions(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM), rngs=nnx.Rngs(0))
  assert LightGCN.requires == () and set(VBPR.requires) == set(BM3.requires) == {"text", "image"}


def test_bad_arguments():
  with pytest.raises(ValueError, match="train_item ids must lie in"):
    LightGCN(Interactions(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM + 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="differ in length"):
    BM3(Interactions(N_USERS, N_ITEMS, TRAIN_USER, TRAIN_ITEM[:-1], FEATURES), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dropout must be in"):
    build("bm3", dropout=1.0)
  with pytest.raises(ValueError, match="embedding_dim must be > 0"):
    build("vbpr", embedding_dim=0)
  with pytest.raises(TypeError):
    build("lightgcn", n_layer=3)  # misspelt hyper-parameter


def test_models_share_helpers_through_public_names_only():
  """No module of models/ imports an underscore name from another, and only models/graph.py names the
  propagation kernels (one table, ``graph.KERNELS``)."""
  root = Path(models.__file__).parent
  for file in sorted(root.glob("*.py")):
    tree = ast.parse(file.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("models"):
        private = [a.name for a in node.names if a.name.startswith("_")]
        assert not private, f"{file.name} imports {private} from {node.module}"
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("graph", "common"):
        assert not node.attr.startswith("_"), f"{file.name} uses {node.value.id}.{node.attr}"
    if file.name != "graph.py":
      assert "propagate_" not in file.read_text(), f"{file.name} names a propagation kernel itself"


def test_get_model():
  assert models.get_model("VBPR") is VBPR and models.MODELS["bm3"] is BM3
  with pytest.raises(ValueError, match="unknown model 'bpr'; valid names: bm3, layergcn, lightgcn, selfcf, vbpr"):
    models.get_model("bpr")


# ------------------------------------------------------------------------------------------------
# Mirror Gradient compatibility
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vbpr", "lightgcn", "bm3"])
def test_one_mirror_gradient_adam_step(name):
  mirror_optax = pytest.importorskip("mirror_optax")
  if not hasattr(mirror_optax, "mirror_gradient"):
    pytest.skip("mirror_optax.mirror_gradient not available yet")
  m = build(name)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  tx = mirror_optax.mirror_gradient(optax.adam(1e-2), alpha1=1.0, alpha2=0.2, beta=1)
  state = tx.init(params)

  @jax.jit
  def step(params, state, rest, batch, key):  # constants are arguments, not closed-over literals
    k1, k2 = jax.random.split(key)

    def loss_fn(p, k):
      return nnx.merge(graphdef, p, rest).loss(batch, k)

    loss, grads = jax.value_and_grad(loss_fn)(params, k1)
    grad_fn = lambda p, i: jax.grad(loss_fn)(p, jax.random.fold_in(k2, i))  # noqa: E731
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, loss

  new_params, state, loss = step(params, state, rest, BATCH, KEY)
  assert math.isfinite(float(loss))
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params))]
  assert max(moved) > 0 and all(math.isfinite(x) for x in moved)
  after = float(nnx.merge(graphdef, new_params, rest).loss(BATCH, KEY))
  assert math.isfinite(after)


# ------------------------------------------------------------------------------------------------
# Training sanity: a few hundred Adam steps learn more than item popularity
# ------------------------------------------------------------------------------------------------
SANITY = {  # name: (hyper-parameters, learning rate, steps, required Recall@20 / popularity's)
  "vbpr": (dict(embedding_dim=32, reg_weight=1e-4), 5e-3, 300, 1.5),
  "lightgcn": (dict(embedding_dim=32, n_layers=2, reg_weight=1e-4), 1e-2, 300, 1.5),
  "bm3": (dict(embedding_dim=32, n_layers=1, reg_weight=0.1, dropout=0.3), 1e-2, 300, 1.2),
}


@pytest.mark.parametrize("name", ["vbpr", "lightgcn", "bm3"])
def test_training_sanity(name, sanity_data):
  ds, pop_recall = sanity_data
  metrics = pytest.importorskip("benchmarks.training.metrics")
  sampling = pytest.importorskip("benchmarks.data.sampling")
  hparams, lr, steps, factor = SANITY[name]
  model = models.get_model(name)(interactions_of(ds), rngs=nnx.Rngs(0), **hparams)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rest, batch, key):
    loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest).loss(batch, key))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  scores = jax.jit(lambda p, r, u: nnx.merge(graphdef, p, r).scores(u))
  sampler, rng, key, losses = sampling.NegativeSampler(ds), np.random.default_rng(0), KEY, []
  while len(losses) < steps:
    epoch = sampler.epoch(rng)
    for start in range(0, len(sampler), 256):
      if len(losses) == steps:
        break
      batch = {k: jnp.asarray(v[start : start + 256]) for k, v in epoch.items()}
      key, sub = jax.random.split(key)
      params, opt_state, loss = step(params, opt_state, rest, batch, sub)
      losses.append(float(loss))
  recall = metrics.evaluate(lambda u: scores(params, rest, u), ds, "valid", ks=(20,))["recall@20"]
  print(
    f"{name}: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}; "
    f"valid Recall@20 {recall:.3f} vs popularity {pop_recall:.3f}"
  )
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
  assert recall > factor * pop_recall
