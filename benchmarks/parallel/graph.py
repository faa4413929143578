r"""Sharded propagation of the user-item graph over a one-axis mesh (issue 27, parts 1 and 2).

:class:`models.graph.NormalizedGraph` keeps the whole edge list, the whole activations and one all-edge
scatter on every device, so adding devices does not let a graph model grow. :class:`ShardedGraph` splits
them over the ``N`` devices of a mesh axis (``"data"``, :mod:`benchmarks.parallel.mesh`) and computes the
same ``A_hat @ X`` and LightGCN ``mean(E_0..E_L)`` (``A_hat = D^-1/2 A D^-1/2`` of :mod:`models.graph`,
users first) inside ``jax.shard_map``.

Partition (host side, :func:`partition_graph`). The ``E`` distinct training pairs, sorted by
``(user, item)``, are cut into ``N`` contiguous user blocks ``[start_p, start_{p+1})`` that minimise the
largest block cost ``sum(deg_u + 1)`` (edges plus one per row, so runs of users without pairs spread
too; :func:`balanced_blocks`, optimal for contiguous blocks). Device ``p`` owns its users' pairs, stored
once as two int32 columns sorted by user -- ``edge_user`` (row inside the block) and ``edge_item``
(item id) -- plus ``item_order``, the permutation that sorts them by item for the reverse pass. Every
device's list is padded to the same ``E_pad`` (the largest block's edge count rounded up to a
multiple of the chunk budget ``C``); padding edges point at a sentinel user row whose ``deg^-1/2`` is
0, so they weigh exactly 0. The weights are recomputed on the device from the *global* degrees,
``w = (d_u + 1e-7)^-1/2 (d_i + 1e-7)^-1/2`` (``deg^-1/2`` stored per user row and per item row as
float32), so the result is the unsharded graph's up to float32 rounding (measured <= 2.3e-7 relative).

Layout. User rows are held in blocks of ``U_b = max_p |block_p|`` rows (block ``p``: users
``start_p..``, zero rows after), ``(N U_b, d)``; items in equal row shards of ``I_b = ceil(I / N)`` rows,
``(N I_b, d)`` (zero rows after ``I``). Both are sharded ``P("data", None)``.

One layer on device ``p`` (``E_l = A_hat E_{l-1}``)::

    I_full = all_gather(I_shard)                          (N I_b, d): every item row
    U_new  = sum over own edges  w * I_full[item]   -> own user rows      (local, no communication)
    Z      = sum over own edges  w * U_old[user]    -> partial item rows  (N I_b, d)
    I_new  = psum_scatter(Z)                              (I_b, d): the device's item shard

The layers run in a ``lax.scan`` (one layer's buffers live at a time, whatever ``L``); messages go
through a ``lax.scan`` over chunks of ``C`` edges (or one chunk); with ``remat=True`` each layer is
wrapped in ``jax.checkpoint`` -- which measurably changes nothing for this linear propagation (its
backward needs only the weights and indices, which do not depend on the layer and are hoisted out of
the scan), but is there for layers that save activations.

Communication per device (``s`` bytes per value, ring collectives): each layer sends and receives
``(N - 1) I_b d s`` bytes for the all-gather and as much for the reduce-scatter, i.e. ``2 (N - 1) I_b d s``
each way, forward, and the same again backward (the transpose of an all-gather is a reduce-scatter and
vice versa); user rows never travel inside the layers. Per call, the item ``deg^-1/2`` all-gather
(``4 (N - 1) I_b``) and, for a global result (:meth:`ShardedGraph.from_layout`), one all-gather of the
output layout (``(N - 1) (U_b + I_b) d s``). :func:`memory_bytes` is the memory model per device.

The class is a drop-in for ``NormalizedGraph`` on a model built as usual (``model.graph =
ShardedGraph(interactions, mesh)``): ``__call__(x, values=None)``, ``layer_mean``, ``mean_over_layers``
and, with ``coo_values=True``, ``values`` (the COO values, for LayerGCN's and SelfCF's re-weighted
training graphs) behave as ``NormalizedGraph``'s, gradients included.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks.parallel.mesh import AXIS
from models.common import GraphConstant, Interactions
from models.graph import CHUNK_BYTES, normalized_adjacency

__all__ = [
  "GraphPartition",
  "ShardedGraph",
  "balanced_blocks",
  "default_chunk_edges",
  "memory_bytes",
  "partition_graph",
]


# --------------------------------------------------------------------------------------------------
# Partition (numpy, host side)
# --------------------------------------------------------------------------------------------------
def balanced_blocks(cost: np.ndarray, n_blocks: int) -> np.ndarray:
  """Starts ``(n_blocks + 1,)`` of contiguous blocks of ``cost`` (non-negative ints) minimising the largest sum.

  Binary search on the capacity ``T`` with greedy packing (exact for contiguous blocks); the optimum is at
  most ``mean + max(cost)``. Blocks after the last non-empty one are empty (start = ``len(cost)``).
  """
  cost = np.asarray(cost, np.int64)
  n = cost.shape[0]
  cs = np.concatenate([[0], np.cumsum(cost)])

  def pack(cap: int) -> Optional[np.ndarray]:
    starts = [0]
    for _ in range(n_blocks):
      a = starts[-1]
      starts.append(max(a, int(np.searchsorted(cs, cs[a] + cap, side="right")) - 1))
    return np.asarray(starts) if starts[-1] >= n else None

  lo, hi = int(cost.max(initial=0)), int(cs[-1])
  while lo < hi:
    mid = (lo + hi) // 2
    if pack(mid) is None:
      lo = mid + 1
    else:
      hi = mid
  starts = pack(lo)
  starts[-1] = n
  return starts


def default_chunk_edges(dim: int = 64, backend: Optional[str] = None) -> Optional[int]:
  """The default chunk budget: :data:`models.graph.CHUNK_BYTES` of ``dim``-wide float32 messages on CPU,
  ``None`` (one chunk per device) elsewhere -- as :func:`models.graph.propagate_chunked`."""
  backend = jax.default_backend() if backend is None else backend
  return max(1024, CHUNK_BYTES // (4 * dim)) if backend == "cpu" else None


@dataclasses.dataclass(frozen=True, eq=False)
class GraphPartition:
  """The 1D partition of the bipartite graph over ``devices`` (numpy arrays; see module docstring).

  Attributes:
    n_users, n_items, devices: sizes.
    n_edges: ``E``, the distinct training pairs.
    user_start: ``(devices + 1,)`` block starts; device ``p`` owns users ``user_start[p]:user_start[p+1]``.
    users_per_device: ``U_b``, the rows of a user block (the largest block, at least 1).
    items_per_device: ``I_b = ceil(n_items / devices)``.
    chunk_edges, n_chunks: ``C`` and ``E_pad / C``.
    edges_per_device: ``E_pad`` (a multiple of ``C``).
    edge_count: ``(devices,)`` real edges per device.
    edge_offset: ``(devices,)`` index of the device's first pair in ``(user, item)`` order (= its first
      user-side entry in the COO of :func:`models.graph.normalized_adjacency`).
    edge_user: ``(devices, E_pad)`` int32 row inside the block, sorted; padding ``U_b`` (the sentinel).
    edge_item: ``(devices, E_pad)`` int32 item id; padding ``N I_b - 1``.
    item_order: ``(devices, E_pad)`` int32 stable argsort of ``edge_item`` (padding last).
    item_coo: ``(devices, E_pad)`` int32 COO index of the (item, user) entry of each edge; padding 0.
    user_dinv: ``(devices, U_b + 1)`` float32 ``(deg + 1e-7)^-1/2`` of the block's users (global degree),
      0 for padding rows and for the sentinel row ``U_b``.
    item_dinv: ``(devices, I_b)`` float32 ``(deg + 1e-7)^-1/2`` of the item shard, 0 for padding rows.
    values: ``(2E,)`` float32 COO values of ``A_hat`` (``normalized_adjacency``'s order).
  """

  n_users: int
  n_items: int
  devices: int
  n_edges: int
  user_start: np.ndarray
  users_per_device: int
  items_per_device: int
  chunk_edges: int
  n_chunks: int
  edges_per_device: int
  edge_count: np.ndarray
  edge_offset: np.ndarray
  edge_user: np.ndarray
  edge_item: np.ndarray
  item_order: np.ndarray
  item_coo: np.ndarray
  user_dinv: np.ndarray
  item_dinv: np.ndarray
  values: np.ndarray

  def edge_weights(self) -> np.ndarray:
    """``(devices, E_pad)`` float32 weight of each edge slot as the device computes it (padding: 0)."""
    i_dinv = self.item_dinv.reshape(-1)
    return np.stack(
      [self.user_dinv[p][self.edge_user[p]] * i_dinv[self.edge_item[p]] for p in range(self.devices)]
    ).astype(np.float32)


def partition_graph(
  train_user: np.ndarray,
  train_item: np.ndarray,
  n_users: int,
  n_items: int,
  devices: int,
  chunk_edges: Optional[int] = None,
) -> GraphPartition:
  """The 1D partition of the graph of the training pairs over ``devices`` (module docstring).

  ``chunk_edges`` is the chunk budget ``C`` (edges per scan step); ``None`` means one chunk (``C = E_pad``).
  """
  if devices < 1:
    raise ValueError(f"devices must be >= 1, got {devices}")
  if chunk_edges is not None and chunk_edges < 1:
    raise ValueError(f"chunk_edges must be >= 1 or None, got {chunk_edges}")
  rows, cols, values = normalized_adjacency(train_user, train_item, n_users, n_items)
  n_edges = rows.shape[0] // 2
  # COO sorted by (row, col): the first E entries are (user, item node), the pairs in (user, item) order;
  # the last E are (item node, user), the pairs in (item, user) order.
  pair_user = rows[:n_edges].astype(np.int64)
  pair_item = cols[:n_edges].astype(np.int64) - n_users
  key_iu = (rows[n_edges:].astype(np.int64) - n_users) * n_users + cols[n_edges:]
  rank_iu = np.empty(n_edges, np.int64)  # pair k (in (u, i) order) is entry E + rank_iu[k]
  rank_iu[np.argsort(pair_item * n_users + pair_user, kind="stable")] = np.arange(n_edges)
  assert np.array_equal(key_iu[rank_iu], pair_item * n_users + pair_user)  # internal invariant

  deg_u = np.bincount(pair_user, minlength=n_users).astype(np.float64)
  deg_i = np.bincount(pair_item, minlength=n_items).astype(np.float64)
  starts = balanced_blocks(deg_u.astype(np.int64) + 1, devices)
  sizes = np.diff(starts)
  u_b = max(1, int(sizes.max()))
  i_b = -(-n_items // devices)
  offsets = np.searchsorted(pair_user, starts)  # first pair of each block
  counts = np.diff(offsets)
  e_max = max(1, int(counts.max()))
  c = e_max if chunk_edges is None else min(int(chunk_edges), e_max)
  n_chunks = -(-e_max // c)
  e_pad = n_chunks * c

  edge_user = np.full((devices, e_pad), u_b, np.int32)
  edge_item = np.full((devices, e_pad), devices * i_b - 1, np.int32)
  item_coo = np.zeros((devices, e_pad), np.int32)
  item_order = np.empty((devices, e_pad), np.int32)
  user_dinv = np.zeros((devices, u_b + 1), np.float32)
  d_u = np.power(deg_u + 1e-7, -0.5)
  for p in range(devices):
    a, b = offsets[p], offsets[p + 1]
    edge_user[p, : b - a] = pair_user[a:b] - starts[p]
    edge_item[p, : b - a] = pair_item[a:b]
    item_coo[p, : b - a] = n_edges + rank_iu[a:b]
    item_order[p] = np.argsort(edge_item[p], kind="stable")
    user_dinv[p, : sizes[p]] = d_u[starts[p] : starts[p + 1]]
  item_dinv = np.zeros(devices * i_b, np.float32)
  item_dinv[:n_items] = np.power(deg_i + 1e-7, -0.5)
  return GraphPartition(
    n_users=int(n_users),
    n_items=int(n_items),
    devices=int(devices),
    n_edges=int(n_edges),
    user_start=starts,
    users_per_device=u_b,
    items_per_device=i_b,
    chunk_edges=int(c),
    n_chunks=int(n_chunks),
    edges_per_device=int(e_pad),
    edge_count=counts.astype(np.int32),
    edge_offset=offsets[:-1].astype(np.int32),
    edge_user=edge_user,
    edge_item=edge_item,
    item_order=item_order,
    item_coo=item_coo,
    user_dinv=user_dinv,
    item_dinv=item_dinv.reshape(devices, i_b),
    values=values,
  )


# --------------------------------------------------------------------------------------------------
# Memory model
# --------------------------------------------------------------------------------------------------
def memory_bytes(
  n_users: int,
  n_items: int,
  n_edges: int,
  dim: int,
  n_layers: int,
  devices: int,
  chunk_edges: Optional[int],
  *,
  train: bool = True,
  itemsize: int = 4,
  users_per_device: Optional[int] = None,
  edges_per_device: Optional[int] = None,
  coo_values: bool = False,
) -> dict[str, int]:
  """Peak bytes per device of :class:`ShardedGraph`'s ``L``-layer mean, by term (the memory model).

  Counts what one device holds while it propagates: the graph, ``E_0``, the output and the buffers of one
  layer; with ``train=True`` (the default) also the cotangents of a gradient through it. It leaves out
  the model's own parameters, optimizer state and loss, and the global <-> layout copies
  (:meth:`ShardedGraph.to_layout`).

  ``n_edges`` is ``E``, the distinct training pairs; ``dim`` the width ``d``; ``chunk_edges`` the chunk
  budget ``C`` (``None``: one chunk). ``users_per_device`` (``U_b``) and ``edges_per_device`` (``E_b``, the
  largest device's edge count before rounding to ``C``) default to a perfect balance, ``ceil(U / N)`` and
  ``ceil(E / N)``; :meth:`ShardedGraph.memory_bytes` passes its partition's. With ``N`` devices,
  ``I_b = ceil(I / N)``, ``E_pad = ceil(E_b / C) C`` and ``s = itemsize``:

  * ``edges``: ``12 E_pad`` -- ``edge_user``, ``edge_item``, ``item_order`` (int32);
  * ``degrees``: ``4 (U_b + 1 + I_b)`` -- ``deg^-1/2`` of the block's users (and the sentinel) and items;
  * ``coo_values`` (only with ``coo_values=True``): ``4 E_pad + 8 E`` -- ``item_coo`` and the replicated
    COO values;
  * ``tables``: ``2 s d (U_b + I_b)`` -- the input ``E_0`` and the output mean (user block, item shard);
  * ``edge_weights``: ``4 (N I_b + E_pad)`` -- the all-gathered item ``deg^-1/2`` and the per-edge weights
    (with ``values=``, ``8 E_pad``: one weight per direction);
  * ``layer_state``: ``2 s d (U_b + I_b)`` -- ``E_{l-1}`` and ``E_l`` (the layers run in a ``lax.scan``, so
    this does not grow with ``L``; the running sum lives in the output buffer);
  * ``cotangents`` (``train`` only): ``2 s d (U_b + I_b)`` -- the cotangent carried back through the layers
    and that of the mean. No activation is saved per layer: ``A_hat @ X`` is linear in ``X``, so the
    backward needs only the weights and indices, which do not depend on the layer (hoisted out of the
    scan); ``remat`` changes nothing here;
  * ``gathered_items``: ``s d N I_b`` -- the layer's all-gathered item table;
  * ``item_partials``: ``s d N I_b`` -- the partial item sums before the reduce-scatter;
  * ``chunk_buffers``: ``s d C`` with several chunks (the two passes are loops that run one after the
    other, one chunk's messages live at a time), ``2 s d E_pad`` with one chunk (the two passes' message
    arrays are independent and may be live together).

  ``total`` is their sum. ``n_layers`` only matters through ``L = 0`` (no propagation: graph and tables).
  """
  n = int(devices)
  u_b = -(-n_users // n) if users_per_device is None else int(users_per_device)
  e_b = max(1, -(-n_edges // n) if edges_per_device is None else int(edges_per_device))
  c = e_b if chunk_edges is None else min(int(chunk_edges), e_b)
  e_pad = -(-e_b // c) * c
  i_b = -(-n_items // n)
  s, d = int(itemsize), int(dim)
  rows = u_b + i_b
  terms = {
    "edges": 12 * e_pad,
    "degrees": 4 * (u_b + 1 + i_b),
    "coo_values": (4 * e_pad + 8 * n_edges) if coo_values else 0,
    "tables": 2 * s * d * rows,
  }
  if n_layers > 0:
    terms.update(
      edge_weights=4 * (n * i_b + e_pad),
      layer_state=2 * s * d * rows,
      cotangents=2 * s * d * rows if train else 0,
      gathered_items=s * d * n * i_b,
      item_partials=s * d * n * i_b,
      chunk_buffers=s * d * (c if e_pad > c else 2 * e_pad),
    )
  terms["total"] = sum(terms.values())
  return terms


# --------------------------------------------------------------------------------------------------
# The propagation inside shard_map
# --------------------------------------------------------------------------------------------------
def _scan_chunks(body, init, xs, n_chunks: int):
  """``lax.scan(body, init, xs)`` over ``n_chunks`` chunks, or the body once for a single chunk."""
  if n_chunks == 1:
    return body(init, jax.tree.map(lambda a: a[0], xs))[0]
  return jax.lax.scan(body, init, xs)[0]


def _layer(xu, xi, wu, wi, edges, axis: str, n_chunks: int):
  """One layer on a device: ``(B xi, B^T xu)`` over its edges, ``B`` the block of the biadjacency.

  ``edges = (edge_user, edge_item, item_order)`` (the device's rows); ``wu`` weighs the messages to users
  (item -> user), ``wi`` those to items (user -> item), per edge slot.
  """
  eu, ei, order = edges
  chunk = eu.shape[0] // n_chunks
  xi_full = jax.lax.all_gather(xi, axis, tiled=True)

  def to_users(out, c):
    u, i, w = c
    msgs = w[:, None] * jnp.take(xi_full, i, axis=0)
    return out.at[u].add(msgs, mode="drop", indices_are_sorted=True), None

  def to_items(out, o):
    msgs = wi[o][:, None] * jnp.take(xu, eu[o], axis=0, mode="clip")
    return out.at[ei[o]].add(msgs, mode="drop", indices_are_sorted=True), None

  chunks = (eu.reshape(n_chunks, chunk), ei.reshape(n_chunks, chunk), wu.reshape(n_chunks, chunk))
  # zero carries computed from the layer's data (not constants): each is allocated when its pass runs
  yu = _scan_chunks(to_users, xu * 0, chunks, n_chunks)
  z = _scan_chunks(to_items, xi_full * 0, order.reshape(n_chunks, chunk), n_chunks)
  return yu, jax.lax.psum_scatter(z, axis, scatter_dimension=0, tiled=True)


def _shard_body(
  consts: dict[str, jax.Array],
  xu: jax.Array,
  xi: jax.Array,
  *,
  axis: str,
  n_layers: int,
  n_chunks: int,
  mean: bool,
  remat: bool,
):
  """One device's part: ``L`` layers on its user block ``xu`` and item shard ``xi``; the mean or the last."""
  edges = (consts["edge_user"][0], consts["edge_item"][0], consts["item_order"][0])
  eu, ei = edges[0], edges[1]
  user_dinv = consts["user_dinv"][0]
  dtype = xu.dtype
  if "values" not in consts:  # A_hat from the global degrees
    i_dinv = jax.lax.all_gather(consts["item_dinv"][0], axis, tiled=True)
    w_user = (user_dinv[eu] * i_dinv[ei]).astype(dtype)
    w_item = w_user
  else:  # the COO values given: user side entries are edge_offset + slot, item side ones item_coo
    values = consts["values"]
    real = user_dinv[eu] > 0  # padding edges point at the sentinel row (deg^-1/2 = 0)
    slot = jnp.arange(eu.shape[0], dtype=jnp.int32) + consts["edge_offset"][0]
    w_user = jnp.where(real, jnp.take(values, slot, mode="clip"), 0).astype(dtype)
    w_item = jnp.where(real, jnp.take(values, consts["item_coo"][0], mode="clip"), 0).astype(dtype)

  def layer(xu, xi):
    return _layer(xu, xi, w_user, w_item, edges, axis, n_chunks)

  if remat:
    layer = jax.checkpoint(layer)

  def step(carry, _):  # a scan over the layers: one layer's buffers live at a time, whatever L is
    xu, xi, tu, ti = carry
    xu, xi = layer(xu, xi)
    return (xu, xi, tu + xu, ti + xi), None

  xu, xi, tu, ti = jax.lax.scan(step, (xu, xi, xu, xi), length=n_layers)[0]
  if not mean:
    return xu, xi
  return tu / (n_layers + 1), ti / (n_layers + 1)


class ShardedGraph(nnx.Module):
  """The normalised bipartite graph partitioned over a mesh axis, with sharded propagation.

  A drop-in for :class:`models.graph.NormalizedGraph` (same results up to float32 summation order):
  ``graph(x, values=None)`` is ``A_hat @ x`` and ``mean_over_layers(U, I, L)`` LightGCN's output, for
  global ``(n_users + n_items, d)`` / ``(n, d)`` arrays; the work and the edge arrays are split over
  the mesh's ``axis`` (module docstring). The constants are :class:`models.common.GraphConstant`
  variables placed ``P(axis)`` (each device holds its own block).

  Args:
    interactions: the training pairs and sizes (features are ignored).
    mesh: the mesh; ``axis`` names the axis the graph is split over (the others replicate it).
    chunk_edges: the chunk budget ``C`` (edges per scan step); ``"auto"`` (default) is
      :func:`default_chunk_edges` (4 MiB of 64-wide messages on CPU, one chunk elsewhere), ``None`` one chunk.
    remat: ``jax.checkpoint`` each propagated layer (recomputed in the backward pass; no memory change for
      the linear propagation itself, see the module docstring).
    coo_values: keep ``values`` (the ``2E`` COO values of ``A_hat``, replicated) and ``item_coo`` so that
      ``values=`` (LayerGCN's and SelfCF's training graphs, in ``NormalizedGraph``'s COO order) works.
  """

  def __init__(
    self,
    interactions: Interactions,
    mesh: Mesh,
    *,
    axis: str = AXIS,
    chunk_edges: Optional[int] | str = "auto",
    remat: bool = False,
    coo_values: bool = False,
  ):
    if axis not in mesh.shape:
      raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    devices = int(mesh.shape[axis])
    if chunk_edges == "auto":
      chunk_edges = default_chunk_edges()
    part = partition_graph(
      interactions.train_user, interactions.train_item, interactions.n_users, interactions.n_items, devices, chunk_edges
    )
    self.mesh, self.axis, self.remat, self.coo_values = mesh, axis, bool(remat), bool(coo_values)
    self.n_users, self.n_items = part.n_users, part.n_items
    self.n_nodes = self.n_users + self.n_items
    self.devices, self.n_edges, self.max_edge_count = devices, part.n_edges, int(part.edge_count.max())
    self.user_start = tuple(int(s) for s in part.user_start)
    self.users_per_device, self.items_per_device = part.users_per_device, part.items_per_device
    self.chunk_edges, self.n_chunks, self.edges_per_device = part.chunk_edges, part.n_chunks, part.edges_per_device
    sharded = NamedSharding(mesh, P(axis))
    put = lambda a: GraphConstant(jax.device_put(a, sharded))
    self.edge_user, self.edge_item, self.item_order = put(part.edge_user), put(part.edge_item), put(part.item_order)
    self.user_dinv, self.item_dinv = put(part.user_dinv), put(part.item_dinv)
    if self.coo_values:
      self.edge_offset, self.item_coo = put(part.edge_offset), put(part.item_coo)
      self.values = GraphConstant(jax.device_put(part.values, NamedSharding(mesh, P())))

  # ------------------------------------------------------------------------------------------------
  # Layout
  # ------------------------------------------------------------------------------------------------
  def _slot_of_user(self) -> jax.Array:
    """``(U,)`` row of each user in the layout's user blocks, ``p U_b + (u - start_p)`` (computed, not stored)."""
    u = jnp.arange(self.n_users, dtype=jnp.int32)
    block = jnp.searchsorted(jnp.asarray(self.user_start[1:-1], jnp.int32), u, side="right").astype(jnp.int32)
    return block * self.users_per_device + u - jnp.asarray(self.user_start[:-1], jnp.int32)[block]

  def to_layout(self, users: jax.Array, items: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(N U_b, d)`` user blocks and ``(N I_b, d)`` item shards of global ``(U, d)``, ``(I, d)`` tables."""
    slot = jnp.arange(self.devices * self.users_per_device, dtype=jnp.int32)
    block, row = slot // self.users_per_device, slot % self.users_per_device
    size = jnp.asarray(np.diff(self.user_start), jnp.int32)[block]
    user = jnp.where(row < size, jnp.asarray(self.user_start[:-1], jnp.int32)[block] + row, self.n_users)
    xu = jnp.take(users, user, axis=0, mode="fill", fill_value=0)  # padding rows (user = U): zeros
    return xu, jnp.pad(items, ((0, self.devices * self.items_per_device - self.n_items), (0, 0)))

  def from_layout(self, xu: jax.Array, xi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Global ``(U, d)``, ``(I, d)`` tables of the layout (inverse of :meth:`to_layout`), replicated.

    The user blocks are all-gathered (``(N - 1) U_b d`` values received per device) and reordered
    locally; left to itself XLA would gather from the sharded blocks with an all-reduce of ``(U, d)``.
    """
    replicated = NamedSharding(self.mesh, P())
    xu, xi = jax.lax.with_sharding_constraint((xu, xi), (replicated, replicated))
    return jnp.take(xu, self._slot_of_user(), axis=0, mode="clip"), xi[: self.n_items]

  def propagate_layout(
    self, xu: jax.Array, xi: jax.Array, n_layers: int, *, mean: bool = True, values: Optional[jax.Array] = None
  ) -> tuple[jax.Array, jax.Array]:
    """``L`` layers on the layout: ``mean(E_0..E_L)`` (``mean=True``) or ``E_L``, as ``(user blocks, item shards)``."""
    if values is not None and not self.coo_values:
      raise ValueError("ShardedGraph(coo_values=False) cannot take values=; build it with coo_values=True")
    if n_layers == 0:
      return xu, xi
    spec = P(self.axis)
    names = ("edge_user", "edge_item", "item_order", "user_dinv")
    names += ("edge_offset", "item_coo") if values is not None else ("item_dinv",)
    consts = {name: getattr(self, name)[...] for name in names}
    specs = {name: spec for name in names}
    if values is not None:
      consts["values"], specs["values"] = values, P()
    body = functools.partial(
      _shard_body,
      axis=self.axis,
      n_layers=int(n_layers),
      n_chunks=self.n_chunks,
      mean=mean,
      remat=self.remat,
    )
    fn = jax.shard_map(
      body,
      mesh=self.mesh,
      in_specs=(specs, spec, spec),
      out_specs=(spec, spec),
    )
    return fn(consts, xu, xi)

  # ------------------------------------------------------------------------------------------------
  # NormalizedGraph's interface
  # ------------------------------------------------------------------------------------------------
  def __call__(self, x: jax.Array, values: Optional[jax.Array] = None) -> jax.Array:
    """``A_hat @ x`` for ``x`` of shape ``(n_nodes, d)`` (``values``: ``NormalizedGraph``'s COO values)."""
    if x.shape[0] != self.n_nodes:
      raise ValueError(f"expected {self.n_nodes} rows (n_users + n_items), got {x.shape[0]}")
    xu, xi = self.to_layout(x[: self.n_users], x[self.n_users :])
    users, items = self.from_layout(*self.propagate_layout(xu, xi, 1, mean=False, values=values))
    return jnp.concatenate([users, items], axis=0)

  def layer_mean(self, x: jax.Array, n_layers: int, values: Optional[jax.Array] = None) -> jax.Array:
    """``models.graph.layer_mean(x, n_layers, graph)`` in one sharded call."""
    users, items = self.mean_over_layers(x[: self.n_users], x[self.n_users :], n_layers, values)
    return jnp.concatenate([users, items], axis=0)

  def mean_over_layers(
    self, user_emb: jax.Array, item_emb: jax.Array, n_layers: int, values: Optional[jax.Array] = None
  ) -> tuple[jax.Array, jax.Array]:
    """LightGCN: ``mean(E_0..E_L)`` for ``E_0 = [user_emb; item_emb]``, as ``(users, items)``."""
    xu, xi = self.to_layout(user_emb, item_emb)
    return self.from_layout(*self.propagate_layout(xu, xi, n_layers, values=values))

  def layout_shardings(self) -> tuple[NamedSharding, NamedSharding]:
    """Shardings of the layout's user blocks and item shards, ``P(axis, None)`` each."""
    s = NamedSharding(self.mesh, P(self.axis, None))
    return s, s

  def memory_bytes(self, dim: int, n_layers: int, *, train: bool = True, itemsize: int = 4) -> dict[str, int]:
    """:func:`memory_bytes` of this partition (its actual ``U_b`` and largest edge count)."""
    return memory_bytes(
      self.n_users,
      self.n_items,
      self.n_edges,
      dim,
      n_layers,
      self.devices,
      self.chunk_edges,
      train=train,
      itemsize=itemsize,
      users_per_device=self.users_per_device,
      edges_per_device=self.max_edge_count,
      coo_values=self.coo_values,
    )
