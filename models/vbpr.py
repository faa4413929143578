"""VBPR (He & McAuley, AAAI 2016) as a Flax NNX module, following MMRec ``src/models/vbpr.py``.

Math. With ``d = embedding_dim``, a user table ``P`` (``n_users x 2d``), an item-ID table ``Q``
(``n_items x d``), a linear layer ``W, b`` (``text_dim + image_dim -> d``) and the frozen item
features ``F = concat(text, image)`` (text first):

    item_i = concat(Q_i, W F_i + b)          (ID part first; 2d columns)
    score(u, i) = P_u . item_i
    loss = BPR(score(u, pos), score(u, neg)) + reg_weight * EmbLoss(P_u, item_pos, item_neg)

``EmbLoss`` (:func:`models.common.emb_loss`) is the sum of the plain Frobenius norms of the batch rows
divided by the batch size, taken on the *full* item vectors, so the linear layer is regularised too.

Initialisation as MMRec: ``P`` and ``Q`` xavier-uniform (they are ``nn.Parameter`` in MMRec, which its
``xavier_normal_initialization`` pass does not visit); the linear kernel xavier-normal, bias 0.

The features are :class:`models.common.FrozenFeatures` variables ``text_features`` and
``image_features`` (not parameters), so robustness code can overwrite rows at inference.

Defaults: ``embedding_dim=64`` (MMRec ``overall.yaml``); ``reg_weight=1e-4`` (MMRec tunes
{2.0, 1.0, 0.1, 1e-2, 1e-3, 1e-4, 1e-5}).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models import common
from models.common import Interactions

__all__ = ["VBPR"]


class VBPR(nnx.Module):
  """Visual (here: visual + textual) Bayesian personalised ranking."""

  name = "vbpr"
  requires: tuple[str, ...] = ("text", "image")

  def __init__(
    self,
    interactions: Interactions,
    /,
    *,
    rngs: nnx.Rngs,
    embedding_dim: int = 64,
    reg_weight: float = 1e-4,
  ):
    """Builds the model from ``interactions`` (its sizes and text/image features; no graph)."""
    feats = common.check_interactions("VBPR", interactions, self.requires)
    common.check_positive("VBPR", embedding_dim=embedding_dim)
    common.check_non_negative("VBPR", reg_weight=reg_weight)
    n_users, n_items = interactions.n_users, interactions.n_items
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim, self.reg_weight = int(embedding_dim), float(reg_weight)
    self.user_embedding = nnx.Embed(n_users, 2 * embedding_dim, embedding_init=common.xavier_uniform(), rngs=rngs)
    self.item_embedding = nnx.Embed(n_items, embedding_dim, embedding_init=common.xavier_uniform(), rngs=rngs)
    self.text_features = common.FrozenFeatures(jnp.asarray(feats["text"]))
    self.image_features = common.FrozenFeatures(jnp.asarray(feats["image"]))
    in_dim = feats["text"].shape[1] + feats["image"].shape[1]
    self.item_linear = common.linear(in_dim, embedding_dim, rngs=rngs, bias="zeros")

  def _visual(self, ids: jax.Array | None = None) -> jax.Array:
    """``linear(concat(text, image))`` for the items ``ids`` (all items if ``None``).

    Computed as ``text @ W_text + image @ W_image + b`` with the kernel split by rows (text
    first), so the ``(n_items, text_dim + image_dim)`` concatenation is never materialised.
    """
    text, image = self.text_features[...], self.image_features[...]
    if ids is not None:
      text, image = text[ids], image[ids]
    kernel = self.item_linear.kernel[...]
    n_text = text.shape[-1]
    return (
      common.rows_matmul(text, kernel[:n_text])
      + common.rows_matmul(image, kernel[n_text:])
      + self.item_linear.bias[...]
    )

  def item_vectors(self, ids: jax.Array | None = None) -> jax.Array:
    """``concat(Q, linear(concat(text, image)))`` of the items ``ids`` (all if ``None``): ``(., 2d)``."""
    q = self.item_embedding.embedding[...]
    return jnp.concatenate([q if ids is None else q[ids], self._visual(ids)], axis=-1)

  def embed(self) -> tuple[jax.Array, jax.Array]:
    """``(P, item vectors)``: ``(n_users, 2d)`` and ``(n_items, 2d)``."""
    return self.user_embedding.embedding[...], self.item_vectors()

  def scores(self, user_ids: jax.Array) -> jax.Array:
    """``P[user_ids] @ items.T``, shape ``(B, n_items)``."""
    users, items = self.embed()
    return users[user_ids] @ items.T

  def loss(self, batch: Mapping[str, jax.Array], key: jax.Array | None = None) -> jax.Array:
    """BPR + ``reg_weight * EmbLoss(P_u, item_pos, item_neg)``.

    Only the batch's item rows are computed (one ``(2B, text_dim + image_dim)`` matmul for the
    positives and negatives together), not the whole item table: the loss depends on no other
    row, and at the Baby shape this is ~1.7x less work per step than the full table.
    """
    del key  # deterministic
    pos, neg = batch["pos"], batch["neg"]
    items = self.item_vectors(jnp.concatenate([pos, neg]))
    p, n = items[: pos.shape[0]], items[pos.shape[0] :]
    u = self.user_embedding.embedding[...][batch["user"]]
    mf = common.bpr_loss(jnp.sum(u * p, axis=-1), jnp.sum(u * n, axis=-1))
    return mf + self.reg_weight * common.emb_loss(u, p, n)
