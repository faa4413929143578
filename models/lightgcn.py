"""LightGCN (He et al., SIGIR 2020) as a Flax NNX module, following MMRec ``src/models/lightgcn.py``.

Math. ``E_0 = [U; I]`` (``n_users + n_items`` rows, ``embedding_dim`` columns, xavier-uniform), with
``A_hat`` the normalised bipartite graph of :mod:`models.graph`:

    E_l = A_hat E_{l-1},   l = 1..L;          [U*; I*] = mean(E_0, ..., E_L)
    score(u, i) = U*_u . I*_i
    loss = BPR(score(u, pos), score(u, neg)) + reg_weight * EmbLoss(U_u, I_pos, I_neg)

where ``EmbLoss`` (:func:`models.common.emb_loss`) sums the plain Frobenius norms of the batch's
**layer-0** rows and divides by the batch size. ID-only: features are ignored.

Defaults: ``embedding_dim=64`` (MMRec ``overall.yaml``), ``n_layers=2`` and ``reg_weight=1e-4`` (inside
MMRec's grids n_layers {1,2,3,4}, reg_weight {1e-2..1e-6}).
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

__all__ = ["LightGCN"]


class LightGCN(nnx.Module):
  """LightGCN recommender (ID embeddings propagated on the normalised user-item graph)."""

  name = "lightgcn"
  requires: tuple[str, ...] = ()

  def __init__(
    self,
    interactions: Interactions,
    /,
    *,
    rngs: nnx.Rngs,
    embedding_dim: int = 64,
    n_layers: int = 2,
    reg_weight: float = 1e-4,
    propagation: PropagationKernel = "chunked",
  ):
    """Builds the model from ``interactions`` (its training pairs; features are ignored)."""
    common.check_interactions("LightGCN", interactions, self.requires)
    common.check_positive("LightGCN", embedding_dim=embedding_dim)
    common.check_non_negative("LightGCN", n_layers=n_layers, reg_weight=reg_weight)
    n_users, n_items = interactions.n_users, interactions.n_items
    u, i = interactions.train_user, interactions.train_item
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim, self.n_layers = int(embedding_dim), int(n_layers)
    self.reg_weight = float(reg_weight)
    self.user_embedding = nnx.Embed(n_users, embedding_dim, embedding_init=common.xavier_uniform(), rngs=rngs)
    self.item_embedding = nnx.Embed(n_items, embedding_dim, embedding_init=common.xavier_uniform(), rngs=rngs)
    self.graph = NormalizedGraph(u, i, n_users, n_items, kernel=propagation)

  def embed(self) -> tuple[jax.Array, jax.Array]:
    """Propagated ``(U*, I*)``: the mean of layers ``0..n_layers``."""
    return self.graph.mean_over_layers(
      self.user_embedding.embedding[...], self.item_embedding.embedding[...], self.n_layers
    )

  def scores(self, user_ids: jax.Array) -> jax.Array:
    """``U*[user_ids] @ I*.T``, shape ``(B, n_items)``."""
    users, items = self.embed()
    return users[user_ids] @ items.T

  def loss(self, batch: Mapping[str, jax.Array], key: jax.Array | None = None) -> jax.Array:
    """BPR on propagated embeddings + ``reg_weight * EmbLoss`` of the layer-0 batch rows."""
    del key  # deterministic
    user, pos, neg = batch["user"], batch["pos"], batch["neg"]
    users, items = self.embed()
    u, p, n = users[user], items[pos], items[neg]
    mf = common.bpr_loss(jnp.sum(u * p, axis=-1), jnp.sum(u * n, axis=-1))
    u0 = self.user_embedding.embedding[...][user]
    item0 = self.item_embedding.embedding[...]
    reg = common.emb_loss(u0, item0[pos], item0[neg])
    return mf + self.reg_weight * reg
