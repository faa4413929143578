"""BM3 (Zhou et al., WWW 2023, "Bootstrap Latent Representations for Multi-modal Recommendation") as a
Flax NNX module, following MMRec ``src/models/bm3.py``.

Math. ``d = embedding_dim``. LightGCN (:mod:`models.graph`) on ID tables ``U`` (users) and ``H``
(items), both xavier-uniform, gives ``[U_g; I_g] = mean(E_0..E_L)``; the online representations are

    u_on = U_g,      i_on = I_g + H          (the item-ID residual is added after propagation)
    t_on = text_trs(T),   v_on = image_trs(V)

where ``T``/``V`` are trainable feature tables initialised from the text/image features
(:class:`models.common.FeatureTable`), ``text_trs``/``image_trs`` are ``Linear(dim -> d)``. One shared
predictor ``pred = Linear(d -> d)``. Targets are dropped-out, gradient-stopped copies of the online
representations (``x~ = dropout(stop_gradient(x), p)``, inverted dropout as ``F.dropout``). For a batch
of (user ``u``, item ``i``) pairs (no negatives), with ``c(a, b) = 1 - mean cos(a, b)`` over the batch:

    loss = c(pred(u_on)_u, i~_i) + c(pred(i_on)_i, u~_u)
         + reg_weight * (||U_g||_F + ||i_on||_F) / n_items           (full tables, plain norms)
         + cl_weight * [ c(pred(t_on)_i, i~_i) + c(pred(v_on)_i, i~_i)
                         + c(pred(t_on)_i, t~_i) + c(pred(v_on)_i, v~_i) ]

    score(u, i) = pred(u_on)_u . pred(i_on)_i

Randomness: the four dropout masks cover the full tables (as ``F.dropout`` on the whole table in
MMRec, so a user or item repeated in a batch shares its mask). They are drawn in one call,
``keep = jax.random.bernoulli(key, 1 - p, (n_users + 3 n_items, d))`` (:func:`models.common.dropout_mask`),
whose consecutive row blocks are the masks of ``u_on`` (``n_users`` rows), ``i_on``, ``t_on``, ``v_on``
(``n_items`` rows each); one call compiles and runs faster than four. A call with another ``key``
draws fresh targets.

Initialisation as MMRec: the predictor and the two feature transforms have xavier-normal kernels and
PyTorch-default biases ``U(+-1/sqrt(fan_in))``.

Defaults (MMRec ``BM3.yaml``): ``embedding_dim=64``, ``n_layers=1`` (grid {1, 2}), ``reg_weight=0.1``
({0.1, 0.01}), ``dropout=0.3`` ({0.3, 0.5}), ``cl_weight=2.0``.
``propagation``: ``"chunked"`` (default), ``"sparse"`` (BCOO) or ``"segment_sum"`` -- see
:mod:`models.graph`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models import common
from models.common import Interactions
from models.graph import NormalizedGraph, PropagationKernel

__all__ = ["BM3"]


def _cos_loss(a: jax.Array, b: jax.Array) -> jax.Array:
  return 1.0 - jnp.mean(common.cosine_similarity(a, b))


class BM3(nnx.Module):
  """Bootstrapped multimodal recommender (self-supervised, no negative sampling)."""

  name = "bm3"
  requires: tuple[str, ...] = ("text", "image")

  def __init__(
    self,
    interactions: Interactions,
    /,
    *,
    rngs: nnx.Rngs,
    embedding_dim: int = 64,
    n_layers: int = 1,
    reg_weight: float = 0.1,
    dropout: float = 0.3,
    cl_weight: float = 2.0,
    propagation: PropagationKernel = "chunked",
  ):
    """Builds the model from ``interactions`` (training pairs and text/image features)."""
    feats = common.check_interactions("BM3", interactions, self.requires)
    common.check_positive("BM3", embedding_dim=embedding_dim)
    common.check_non_negative("BM3", n_layers=n_layers, reg_weight=reg_weight, cl_weight=cl_weight)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"BM3: dropout must be in [0, 1), got {dropout!r}")
    n_users, n_items = interactions.n_users, interactions.n_items
    u, i = interactions.train_user, interactions.train_item
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim, self.n_layers = int(embedding_dim), int(n_layers)
    self.reg_weight, self.cl_weight = float(reg_weight), float(cl_weight)
    self.dropout = float(dropout)
    d = embedding_dim
    self.user_embedding = nnx.Embed(n_users, d, embedding_init=common.xavier_uniform(), rngs=rngs)
    self.item_id_embedding = nnx.Embed(n_items, d, embedding_init=common.xavier_uniform(), rngs=rngs)
    self.predictor = common.linear(d, d, rngs=rngs, bias="torch")
    self.image_features = common.FeatureTable(jnp.asarray(feats["image"]))
    self.image_trs = common.linear(feats["image"].shape[1], d, rngs=rngs, bias="torch")
    self.text_features = common.FeatureTable(jnp.asarray(feats["text"]))
    self.text_trs = common.linear(feats["text"].shape[1], d, rngs=rngs, bias="torch")
    self.graph = NormalizedGraph(u, i, n_users, n_items, kernel=propagation)

  def online(self) -> tuple[jax.Array, jax.Array]:
    """``(u_on, i_on) = (U_g, I_g + H)`` before the predictor."""
    h = self.item_id_embedding.embedding[...]
    u_g, i_g = self.graph.mean_over_layers(self.user_embedding.embedding[...], h, self.n_layers)
    return u_g, i_g + h

  def embed(self) -> tuple[jax.Array, jax.Array]:
    """``(pred(u_on), pred(i_on))`` as MMRec's ``full_sort_predict``."""
    u_on, i_on = self.online()
    return self.predictor(u_on), self.predictor(i_on)

  def scores(self, user_ids: jax.Array) -> jax.Array:
    """``pred(u_on)[user_ids] @ pred(i_on).T``, shape ``(B, n_items)``."""
    u_on, i_on = self.online()
    return self.predictor(u_on[user_ids]) @ self.predictor(i_on).T

  def dropout_masks(self, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Boolean keep-masks ``(u, i, t, v)`` of the target dropout for ``key`` (see module docstring)."""
    n_u, n_i = self.n_users, self.n_items
    keep = common.dropout_mask(key, self.dropout, (n_u + 3 * n_i, self.embedding_dim))
    return (keep[:n_u], keep[n_u : n_u + n_i], keep[n_u + n_i : n_u + 2 * n_i], keep[n_u + 2 * n_i :])

  def _target(self, x_rows: jax.Array, keep_rows: jax.Array) -> jax.Array:
    """``dropout(stop_gradient(x), p)`` for batch rows ``x_rows`` with their mask rows."""
    return common.apply_dropout_mask(jax.lax.stop_gradient(x_rows), keep_rows, self.dropout)

  def loss(self, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
    """BM3 loss on the batch's (user, pos) pairs; ``key`` draws the target dropout."""
    users, items = batch["user"], batch["pos"]
    keep_u, keep_i, keep_t, keep_v = self.dropout_masks(key)
    u_on, i_on = self.online()
    u_rows, i_rows = u_on[users], i_on[items]
    # Only the batch rows of the feature branches are needed (row-wise linear maps).
    t_rows = common.linear_rows(self.text_trs, self.text_features[...][items])
    v_rows = common.linear_rows(self.image_trs, self.image_features[...][items])

    u_tgt = self._target(u_rows, keep_u[users])
    i_tgt = self._target(i_rows, keep_i[items])
    t_tgt = self._target(t_rows, keep_t[items])
    v_tgt = self._target(v_rows, keep_v[items])

    pred = self.predictor
    u_pred, i_pred, t_pred, v_pred = pred(u_rows), pred(i_rows), pred(t_rows), pred(v_rows)
    loss_ui = _cos_loss(u_pred, i_tgt)
    loss_iu = _cos_loss(i_pred, u_tgt)
    reg = common.emb_loss(u_on, i_on)  # (||U_g||_F + ||i_on||_F) / n_items
    loss_t, loss_tv = _cos_loss(t_pred, i_tgt), _cos_loss(t_pred, t_tgt)
    loss_v, loss_vt = _cos_loss(v_pred, i_tgt), _cos_loss(v_pred, v_tgt)
    return loss_ui + loss_iu + self.reg_weight * reg + self.cl_weight * (loss_t + loss_v + loss_tv + loss_vt)
