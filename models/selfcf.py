"""SelfCF_ed (Zhou et al., "SelfCF: A Simple Framework for Self-supervised Collaborative Filtering",
ACM TORS 2023) with the LightGCN encoder, as a Flax NNX module, following MMRec
``src/models/selfcfed_lgn.py`` (``SELFCFED_LGN``) and its encoder ``src/common/encoders.py``
(``LightGCN_Encoder``).

Math. ``d = embedding_dim``; ID tables ``U`` (users) and ``I`` (items), xavier-uniform,
``E_0 = [U; I]``; ``A_hat`` the normalised bipartite graph of :mod:`models.graph`.

Encoder (LightGCN, mean over layers 0..L)::

    E_l = G E_{l-1},  l = 1..L;       [U_o; I_o] = mean(E_0, ..., E_L)

with ``G = A_hat`` at inference. In training MMRec's encoder applies *sparse edge dropout* to
``A_hat`` on every forward pass (``drop_flag = True``, ``drop_ratio = 1.0`` hard-coded in
``LightGCN_Encoder``): a rate ``r = edge_drop_ratio * U[0, 1)`` is drawn per call, every stored entry
``a_e`` of ``A_hat`` (the two directions of a pair independently) is kept iff ``x_e >= r`` with
``x_e ~ U[0, 1)`` (probability ``1 - r``), and kept entries are scaled by ``1 / (1 - r)``::

    G~_e = a_e [x_e >= r] / (1 - r)

For a batch of positive pairs ``(u_b, i_b)`` (no negatives; MMRec ``use_neg_sampling: False``, so the
batch's ``"neg"`` is ignored, as BM3 does) with ``u = U_o[u_b]``, ``i = I_o[i_b]`` (``B x d``), a linear
predictor ``pred = Linear(d, d)`` and targets that are dropped-out, gradient-stopped copies of the
batch rows, ``u~ = dropout(sg(u), p)``, ``i~ = dropout(sg(i), p)`` (inverted dropout as ``F.dropout``
on the gathered rows, so a user repeated in the batch gets an independent mask per row)::

    loss = -1/2 mean_b cos(pred(u), i~) - 1/2 mean_b cos(pred(i), u~)
           + reg_weight * L2(u, i),       L2(u, i) = (||u||_F^2 + ||i||_F^2) / 2   (MMRec ``L2Loss``)

The regulariser acts on the encoder's (propagated, training-graph) batch rows, as MMRec's
``reg_loss(u_online, i_online)``. At inference (MMRec ``full_sort_predict``; no dropout, full graph)::

    score(u, i) = pred(U_o)_u . I_o_i + U_o_u . pred(I_o)_i

:meth:`embed` returns ``([pred(U_o), U_o], [I_o, pred(I_o)])`` (``2d`` columns), whose product
``users[u] @ items.T`` is exactly that score.

Randomness: ``key`` (a fresh one for each gradient, e.g. Mirror Gradient's second gradient) is split
as ``k_rate, k_edge, k_target = jax.random.split(key, 3)``; ``r = edge_drop_ratio *
jax.random.uniform(k_rate)``; ``x = jax.random.uniform(k_edge, (n_entries,))`` over the entries of
``A_hat``'s COO (sorted by ``(row, col)``); the target keep-mask is ``jax.random.bernoulli(k_target,
1 - p, (2B, d))`` (:func:`models.common.dropout_mask`), rows ``0..B-1`` for ``u~`` and ``B..2B-1`` for
``i~``.

Initialisation as MMRec: both ID tables xavier-uniform; the predictor is PyTorch's default
``nn.Linear`` (MMRec does not re-initialise it): kernel and bias ``U(-1/sqrt(d), 1/sqrt(d))``.

Notes on fidelity. The edge dropout is not in the SelfCF paper's description of SELFCF_ed; it is in
MMRec's ``LightGCN_Encoder`` as read (``drop_flag = True``, ``drop_ratio = 1.0``), so it is on by
default here; ``edge_drop_ratio=0`` gives the plain encoder. Because ``r`` can come close to 1, the
kept entries can be scaled by a large ``1 / (1 - r)``: harmless for the (scale-invariant) cosine terms,
but it makes the ``L2`` term noisy when ``reg_weight > 0`` -- MMRec behaves the same way.

Defaults (MMRec ``SELFCFED_LGN.yaml``): ``embedding_dim=64``, ``n_layers=2``, ``dropout=0.5``,
``reg_weight=0.0``; ``edge_drop_ratio=1.0`` (MMRec's hard-coded ``drop_ratio``; 0 disables the edge
dropout). ``propagation``: ``"chunked"`` (default), ``"sparse"`` (BCOO) or ``"segment_sum"`` -- see
:mod:`models.graph`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models import common
from models.common import Interactions
from models.graph import NormalizedGraph, PropagationKernel, layer_mean

__all__ = ["SelfCF"]


def _neg_cos(a: jax.Array, b: jax.Array) -> jax.Array:
  """MMRec's ``loss_fn``: ``-mean cos(a, b)`` over the rows."""
  return -jnp.mean(common.cosine_similarity(a, b))


class SelfCF(nnx.Module):
  """Self-supervised CF with embedding dropout targets and a LightGCN encoder (MMRec SELFCFED_LGN)."""

  name = "selfcf"
  requires: tuple[str, ...] = ()

  def __init__(
    self,
    interactions: Interactions,
    /,
    *,
    rngs: nnx.Rngs,
    embedding_dim: int = 64,
    n_layers: int = 2,
    dropout: float = 0.5,
    reg_weight: float = 0.0,
    edge_drop_ratio: float = 1.0,
    propagation: PropagationKernel = "chunked",
  ):
    """Builds the model from ``interactions`` (its training pairs; features are ignored)."""
    common.check_interactions("SelfCF", interactions, self.requires)
    common.check_positive("SelfCF", embedding_dim=embedding_dim)
    common.check_non_negative("SelfCF", n_layers=n_layers, reg_weight=reg_weight)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"SelfCF: dropout must be in [0, 1), got {dropout!r}")
    if not 0.0 <= edge_drop_ratio <= 1.0:
      raise ValueError(f"SelfCF: edge_drop_ratio must be in [0, 1], got {edge_drop_ratio!r}")
    n_users, n_items = interactions.n_users, interactions.n_items
    u, i = interactions.train_user, interactions.train_item
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim, self.n_layers = int(embedding_dim), int(n_layers)
    self.dropout, self.reg_weight = float(dropout), float(reg_weight)
    self.edge_drop_ratio = float(edge_drop_ratio)
    d = embedding_dim
    self.user_embedding = nnx.Embed(n_users, d, embedding_init=common.xavier_uniform(), rngs=rngs)
    self.item_embedding = nnx.Embed(n_items, d, embedding_init=common.xavier_uniform(), rngs=rngs)
    torch_default = common.torch_linear_bias_init(d)  # U(+-1/sqrt(fan_in)): nn.Linear's weight and bias
    self.predictor = nnx.Linear(d, d, kernel_init=torch_default, bias_init=torch_default, rngs=rngs)
    self.graph = NormalizedGraph(u, i, n_users, n_items, kernel=propagation)

  def encode(self, values: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(U_o, I_o) = mean(E_0..E_L)`` on the graph with COO values ``values`` (``A_hat`` if ``None``)."""
    e0 = jnp.concatenate([self.user_embedding.embedding[...], self.item_embedding.embedding[...]])
    out = layer_mean(e0, self.n_layers, lambda x: self.graph(x, values))
    return out[: self.n_users], out[self.n_users :]

  def dropped_edge_values(self, k_rate: jax.Array, k_edge: jax.Array) -> jax.Array:
    """``A_hat``'s COO values after the encoder's sparse edge dropout (module docstring).

    ``r = edge_drop_ratio * uniform(k_rate)``; entry ``e`` kept iff ``uniform(k_edge, (n_entries,))[e] >= r``,
    kept values scaled by ``1 / (1 - r)``. Unchanged values if ``edge_drop_ratio == 0``.
    """
    values = self.graph.values[...]
    if self.edge_drop_ratio == 0.0:
      return values
    rate = self.edge_drop_ratio * jax.random.uniform(k_rate)
    keep = jax.random.uniform(k_edge, values.shape) >= rate
    return jnp.where(keep, values / (1.0 - rate), 0.0)

  def embed(self) -> tuple[jax.Array, jax.Array]:
    """``([pred(U_o), U_o], [I_o, pred(I_o)])`` on the full graph, so ``U I^T`` is MMRec's score."""
    u, i = self.encode()
    return (jnp.concatenate([self.predictor(u), u], axis=-1), jnp.concatenate([i, self.predictor(i)], axis=-1))

  def scores(self, user_ids: jax.Array) -> jax.Array:
    """``pred(U_o)[user_ids] @ I_o.T + U_o[user_ids] @ pred(I_o).T``, shape ``(B, n_items)``."""
    u, i = self.encode()
    u = u[user_ids]
    return self.predictor(u) @ i.T + u @ self.predictor(i).T

  def loss(self, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
    """SelfCF_ed loss on the batch's (user, pos) pairs; ``key`` draws the edge and target dropout."""
    users, items = batch["user"], batch["pos"]
    k_rate, k_edge, k_target = jax.random.split(key, 3)
    u_all, i_all = self.encode(self.dropped_edge_values(k_rate, k_edge))
    u, i = u_all[users], i_all[items]
    b = users.shape[0]
    keep = common.dropout_mask(k_target, self.dropout, (2 * b, self.embedding_dim))
    u_tgt = common.apply_dropout_mask(jax.lax.stop_gradient(u), keep[:b], self.dropout)
    i_tgt = common.apply_dropout_mask(jax.lax.stop_gradient(i), keep[b:], self.dropout)
    loss_ui = _neg_cos(self.predictor(u), i_tgt) / 2
    loss_iu = _neg_cos(self.predictor(i), u_tgt) / 2
    return loss_ui + loss_iu + self.reg_weight * common.l2_loss(u, i)
