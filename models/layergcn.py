"""LayerGCN (Zhou et al., ICDE 2023, "Layer-refined Graph Convolutional Networks for Recommendation") as
a Flax NNX module, following MMRec ``src/models/layergcn.py``.

Math. ``E_0 = [U; I]`` (the ego embeddings: ``n_users + n_items`` rows, ``embedding_dim`` columns,
xavier-uniform). With ``G`` a normalised bipartite graph (the full ``A_hat`` of :mod:`models.graph` at
inference, the epoch's pruned graph in training, see below), each layer is *refined* by its cosine
similarity to the ego embeddings:

    H_l = G E_{l-1},   w_l[n] = cos(H_l[n], E_0[n]),   E_l = diag(w_l) H_l,      l = 1..L
    [U*; I*] = E_1 + ... + E_L                 (a SUM of the layer outputs; layer 0 is NOT included)
    score(u, i) = U*_u . I*_i
    loss = sum_b -log sigmoid(score(u_b, pos_b) - score(u_b, neg_b))                  (BPR as a SUM)
         + reg_weight * L2(U_u, I_pos, I_neg)
    L2(E_1, ..., E_k) = sum_j ||E_j||_F^2 / 2      (MMRec ``L2Loss``, :func:`models.common.l2_loss`)

``cos`` is ``torch.nn.functional.cosine_similarity`` (:func:`models.common.cosine_similarity`, eps
1e-8); the gradient flows through the weights ``w_l`` as in MMRec (nothing is detached). The BPR term
is MMRec LayerGCN's own ``bpr_loss`` (``torch.sum(-LogSigmoid(pos - neg))``, no ``1e-10``), not the
mean-BPR of :func:`models.common.bpr_loss`; ``L2`` acts on the batch's **ego** (layer-0) rows.

Edge dropout (MMRec ``pre_epoch_processing``, run by the trainer before every training epoch through
the model-agnostic hook :meth:`LayerGCN.pre_epoch`). The ``E`` distinct training pairs ``e = (u, i)``
carry their normalised weight in the full graph, ``v_e = (d_u + 1e-7)^-1/2 (d_i + 1e-7)^-1/2``. With
``dropout = p > 0`` an epoch keeps ``K = int(E * (1 - p))`` of them, drawn without replacement

* on even epochs (0, 2, ...) with probability proportional to ``v_e`` (``torch.multinomial`` without
  replacement: sequential draws proportional to the weights of the edges not yet drawn; here the Gumbel
  top-k trick of ``jax.random.choice(..., replace=False, p=...)``, which has the same distribution), so
  edges of high-degree nodes are pruned first ("degree-sensitive");
* on odd epochs uniformly (``random.sample``),

and the kept edges are re-normalised on their own degrees ``d'``: ``v'_e = (d'_u + 1e-7)^-1/2
(d'_i + 1e-7)^-1/2`` in both directions (user->item and item->user); dropped edges weigh 0. With
``p = 0`` training uses the full graph. Inference (:meth:`embed`, :meth:`scores`) always uses the full
graph.

MMRec alternates the two samplers with a flag that starts at "degree-sensitive" and flips on every
call; here the sampler is chosen by the parity of the epoch index, which is the same for a run started
at epoch 0 and lets a run resumed from a checkpoint replay exactly the masks of an uninterrupted run.
The epoch's randomness is the ``key`` the trainer derives from ``(seed, epoch)``
(:func:`benchmarks.training.loop.epoch_constants`).

Implementation notes. The training graph is stored as values (:class:`models.common.GraphConstant`
``train_values``) on the full graph's sorted COO, dropped edges with weight 0, so its shape never
changes and the propagation code is :mod:`models.graph`'s; a training propagation therefore costs as
much as a full one (MMRec builds a smaller sparse matrix; the values are the same). Before the first
:meth:`pre_epoch` call ``train_values`` holds the full graph. Training pairs are made binary
(duplicates collapse) as in :mod:`models.graph`; MMRec's data has no duplicate pairs.

Defaults (MMRec ``LayerGCN.yaml``): ``embedding_dim=64``, ``n_layers=4`` (its only value),
``reg_weight=1e-2`` (grid {1e-2, 1e-3, 1e-4, 1e-5}; the first), ``dropout=0.0`` (grid {0.0, 0.1, 0.2};
the first, i.e. no edge dropout unless asked for). ``propagation``: ``"chunked"`` (default),
``"sparse"`` (BCOO) or ``"segment_sum"`` -- see :mod:`models.graph`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import common
from models.common import Interactions
from models.graph import NormalizedGraph, PropagationKernel

__all__ = ["LayerGCN", "interaction_edges"]


def interaction_edges(
  train_user: np.ndarray, train_item: np.ndarray, n_users: int, n_items: int, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The distinct training pairs and their place in the graph's COO.

  Returns ``(edge_user, edge_item, edge_values, coo_edge)``: the ``E`` distinct pairs sorted by
  ``(user, item)``, their normalised weight ``v_e = (d_u + 1e-7)^-1/2 (d_i + 1e-7)^-1/2`` (float64 then
  float32, as :func:`models.graph.normalized_adjacency`), and for each of the ``2E`` entries
  ``(rows, cols)`` of the symmetric COO (users first, items offset by ``n_users``) the index of its pair.
  """
  pairs = np.unique(np.asarray(train_user, np.int64) * n_items + np.asarray(train_item, np.int64))
  eu, ei = pairs // n_items, pairs % n_items
  du = np.bincount(eu, minlength=n_users).astype(np.float64)
  di = np.bincount(ei, minlength=n_items).astype(np.float64)
  values = np.power(du[eu] + 1e-7, -0.5) * np.power(di[ei] + 1e-7, -0.5)
  rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
  user_side = rows < n_users
  key = np.where(user_side, rows * n_items + (cols - n_users), cols * n_items + (rows - n_users))
  coo_edge = np.searchsorted(pairs, key)
  if not np.array_equal(pairs[coo_edge], key):
    raise AssertionError("graph COO does not match the training pairs")  # internal invariant
  return (eu.astype(np.int32), ei.astype(np.int32), values.astype(np.float32), coo_edge.astype(np.int32))


class LayerGCN(nnx.Module):
  """Layer-refined GCN recommender with per-epoch degree-sensitive edge dropout."""

  name = "layergcn"
  requires: tuple[str, ...] = ()

  def __init__(
    self,
    interactions: Interactions,
    /,
    *,
    rngs: nnx.Rngs,
    embedding_dim: int = 64,
    n_layers: int = 4,
    reg_weight: float = 1e-2,
    dropout: float = 0.0,
    propagation: PropagationKernel = "chunked",
  ):
    """Builds the model from ``interactions`` (its training pairs; features are ignored)."""
    common.check_interactions("LayerGCN", interactions, self.requires)
    common.check_positive("LayerGCN", embedding_dim=embedding_dim, n_layers=n_layers)
    common.check_non_negative("LayerGCN", reg_weight=reg_weight)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"LayerGCN: dropout must be in [0, 1), got {dropout!r}")
    n_users, n_items = interactions.n_users, interactions.n_items
    u, i = interactions.train_user, interactions.train_item
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim, self.n_layers = int(embedding_dim), int(n_layers)
    self.reg_weight, self.dropout = float(reg_weight), float(dropout)
    self.user_embedding = nnx.Embed(n_users, embedding_dim, embedding_init=common.xavier_uniform(), rngs=rngs)
    self.item_embedding = nnx.Embed(n_items, embedding_dim, embedding_init=common.xavier_uniform(), rngs=rngs)
    self.graph = NormalizedGraph(u, i, n_users, n_items, kernel=propagation)
    eu, ei, ev, coo_edge = interaction_edges(
      u, i, n_users, n_items, np.asarray(self.graph.rows[...]), np.asarray(self.graph.cols[...])
    )
    self.n_edges = int(ev.shape[0])
    self.keep_edges = int(self.n_edges * (1.0 - self.dropout))  # MMRec: int(E * (1. - dropout))
    self.edge_user = common.GraphConstant(jnp.asarray(eu))
    self.edge_item = common.GraphConstant(jnp.asarray(ei))
    self.edge_values = common.GraphConstant(jnp.asarray(ev))
    self.coo_edge = common.GraphConstant(jnp.asarray(coo_edge))
    self.train_values = common.GraphConstant(jnp.array(self.graph.values[...]))

  # ------------------------------------------------------------------------------------------------
  # Edge dropout
  # ------------------------------------------------------------------------------------------------
  def edge_keep_mask(self, key: jax.Array, epoch: int | jax.Array) -> jax.Array:
    """Boolean ``(E,)`` mask of the pairs kept in training epoch ``epoch`` (all if ``dropout == 0``).

    ``K = int(E (1 - dropout))`` pairs without replacement: proportional to ``v_e`` on even epochs,
    uniform on odd ones (module docstring), from ``key``.
    """
    if self.dropout == 0.0:
      return jnp.ones((self.n_edges,), bool)
    n, k = self.n_edges, self.keep_edges
    p = self.edge_values[...] / jnp.sum(self.edge_values[...])

    def degree_sensitive(key):
      return jax.random.choice(key, n, (k,), replace=False, p=p)

    def uniform(key):
      return jax.random.choice(key, n, (k,), replace=False)

    idx = jax.lax.cond(jnp.asarray(epoch) % 2 == 0, degree_sensitive, uniform, key)
    return jnp.zeros((n,), bool).at[idx].set(True)

  def masked_values(self, keep: jax.Array) -> jax.Array:
    """Values on the full graph's COO of the graph of the kept pairs ``keep`` (boolean ``(E,)``).

    ``v'_e = (d'_u + 1e-7)^-1/2 (d'_i + 1e-7)^-1/2`` with ``d'`` the degrees counted over the kept pairs,
    0 for dropped pairs; both directions of a pair get the same value.
    """
    kept = keep.astype(jnp.float32)
    du = jax.ops.segment_sum(kept, self.edge_user[...], num_segments=self.n_users)
    di = jax.ops.segment_sum(kept, self.edge_item[...], num_segments=self.n_items)
    v = jax.lax.rsqrt(du[self.edge_user[...]] + 1e-7) * jax.lax.rsqrt(di[self.edge_item[...]] + 1e-7)
    return jnp.where(keep, v, 0.0)[self.coo_edge[...]]

  def pre_epoch(self, key: jax.Array, epoch: int | jax.Array) -> None:
    """The per-epoch hook (MMRec ``pre_epoch_processing``): sets ``train_values`` to epoch ``epoch``'s graph.

    Called by the trainer (:func:`benchmarks.training.loop.epoch_constants`) before each training epoch with a
    key derived from ``(seed, epoch)``. Touches only the :class:`GraphConstant` ``train_values``, never
    a parameter. With ``dropout == 0`` the training graph stays the full graph.
    """
    if self.dropout == 0.0:
      return
    self.train_values[...] = self.masked_values(self.edge_keep_mask(key, epoch))

  # ------------------------------------------------------------------------------------------------
  # Forward
  # ------------------------------------------------------------------------------------------------
  def forward(self, values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(U*, I*) = split(E_1 + ... + E_L)`` on the graph with COO values ``values`` (module docstring)."""
    ego = jnp.concatenate([self.user_embedding.embedding[...], self.item_embedding.embedding[...]])
    e, total = ego, None
    for _ in range(self.n_layers):
      h = self.graph(e, values)
      e = common.cosine_similarity(h, ego)[:, None] * h
      total = e if total is None else total + e
    return total[: self.n_users], total[self.n_users :]

  def embed(self) -> tuple[jax.Array, jax.Array]:
    """``(U*, I*)`` on the full graph (MMRec ``full_sort_predict``)."""
    return self.forward(self.graph.values[...])

  def scores(self, user_ids: jax.Array) -> jax.Array:
    """``U*[user_ids] @ I*.T`` on the full graph, shape ``(B, n_items)``."""
    users, items = self.embed()
    return users[user_ids] @ items.T

  def loss(self, batch: Mapping[str, jax.Array], key: jax.Array | None = None) -> jax.Array:
    """Summed BPR on the training graph's embeddings + ``reg_weight * L2`` of the batch's ego rows.

    ``key`` is unused: the loss is deterministic given the epoch's graph (``train_values``).
    """
    del key
    user, pos, neg = batch["user"], batch["pos"], batch["neg"]
    users, items = self.forward(self.train_values[...])
    u = users[user]
    diff = jnp.sum(u * items[pos], axis=-1) - jnp.sum(u * items[neg], axis=-1)
    bpr = -jnp.sum(jax.nn.log_sigmoid(diff))
    u0 = self.user_embedding.embedding[...][user]
    item0 = self.item_embedding.embedding[...]
    return bpr + self.reg_weight * common.l2_loss(u0, item0[pos], item0[neg])
