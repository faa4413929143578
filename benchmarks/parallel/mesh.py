r"""Training over several devices with JAX's own sharding (``jax.sharding.Mesh`` / ``NamedSharding``).

A one-axis mesh ``("data",)`` over ``N`` devices (``jax.make_mesh`` with an ``Auto`` axis, so XLA's
sharding propagation partitions the compiled train step and inserts the collectives):

* **batches** are data-parallel: a scanned ``(n_batches, batch_size)`` array is split over the batch
  axis, ``P(None, "data")``; a batch whose size the device count does not divide (the epoch's
  remainder batch) is placed replicated;
* **parameters, optimizer state and constants** (graph, frozen features) are replicated, ``P()``;
* with ``shard_tables=True`` the embedding tables (the ``embedding`` of every ``nnx.Embed``) and
  their optimizer moments are **row-sharded**, ``P("data", None)``. ``NamedSharding`` needs the
  device count to divide the sharded dimension, so a table whose row count it does not divide is
  sharded over its embedding columns instead, ``P(None, "data")``, or else replicated (a warning
  names each such table).

Data parallelism changes no formula: the loss is a mean over the whole batch whichever device holds
which rows, so XLA reduces the per-device partial gradients across the mesh and every device applies
the same update. Results agree with one device up to floating-point summation order
(``tests/test_sharding.py``: metrics and parameters within ``1e-5`` after a few epochs on 4 host CPU
devices). ``benchmarks.training.loop`` uses these helpers when ``TrainConfig.devices`` is set
(``python -m benchmarks.compare --devices N [--shard-tables]``).

On a CPU-only machine, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX starts)
exposes ``N`` host devices for trying this out.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
  "AXIS",
  "batch_sharding",
  "make_mesh",
  "place_batches",
  "place_state",
  "replicated",
  "state_shardings",
  "table_paths",
]

#: Name of the mesh axis that batches (and, on request, table rows) are split over.
AXIS = "data"

KeyPath = tuple[Any, ...]


def make_mesh(n_devices: Optional[int] = None, *, axis: str = AXIS) -> Mesh:
  """A one-axis mesh over the first ``n_devices`` devices (all of them if ``None``).

  The axis type is ``Auto`` (JAX 0.10 defaults to ``Explicit``), so jit's sharding propagation
  partitions the train step without sharding annotations in the model code.

  Raises:
    ValueError: ``n_devices`` is < 1 or exceeds the available devices (the message says how to get
      host CPU devices).
  """
  available = jax.devices()
  n = len(available) if n_devices is None else int(n_devices)
  if jax.process_count() > 1 and n != len(available):  # multi-process (benchmarks.parallel.distributed): all devices
    raise ValueError(
      f"devices={n_devices!r}: a {jax.process_count()}-process run trains on all {len(available)} devices of "
      "all processes; drop --devices or pass the total"
    )
  if n < 1 or n > len(available):
    raise ValueError(
      f"devices={n_devices!r}: need 1 <= devices <= {len(available)} (the {jax.default_backend()} devices "
      "available); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python"
    )
  return jax.make_mesh((n,), (axis,), axis_types=(jax.sharding.AxisType.Auto,), devices=available[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def _axis_size(mesh: Mesh, axis: str) -> int:
  return int(mesh.shape[axis])


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], *, batch_axis: int = 1, axis: str = AXIS) -> NamedSharding:
  """Data-parallel sharding of an array whose ``batch_axis`` is the batch; replicated if not divisible."""
  if len(shape) <= batch_axis or shape[batch_axis] % _axis_size(mesh, axis):
    return replicated(mesh)
  spec = [None] * len(shape)
  spec[batch_axis] = axis
  return NamedSharding(mesh, P(*spec))


def place_batches(mesh: Mesh, batches: Mapping[str, Any], *, axis: str = AXIS) -> dict[str, jax.Array]:
  """Puts ``(n_batches, batch_size)`` arrays on the mesh, split over the batch axis where divisible."""
  if jax.process_count() > 1:  # every process holds the same sample and hands over only its own rows
    from benchmarks.parallel.distributed import put_global

    return {k: put_global(v, batch_sharding(mesh, np.shape(v), axis=axis)) for k, v in batches.items()}
  return {k: jax.device_put(v, batch_sharding(mesh, np.shape(v), axis=axis)) for k, v in batches.items()}


def table_paths(graphdef: nnx.GraphDef, params: Any, rest: Any) -> set[KeyPath]:
  """Key paths (as in ``jax.tree_util.tree_flatten_with_path(params)``) of the embedding tables.

  An embedding table is the ``embedding`` parameter of an ``nnx.Embed`` (the ID tables of every model,
  ``.notes/INTERFACES.md``).
  """
  model = nnx.merge(graphdef, params, rest)
  embed_modules = {tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Embed)}
  out = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(_key_name(k) for k in path)
    if names and names[-1] == "embedding" and names[:-1] in embed_modules:
      out.add(tuple(path))
  return out


def _key_name(key: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _table_sharding(mesh: Mesh, shape: tuple[int, ...], name: str, axis: str) -> NamedSharding:
  size = _axis_size(mesh, axis)
  if shape[0] % size == 0:
    return NamedSharding(mesh, P(axis, None))
  if len(shape) > 1 and shape[1] % size == 0:
    warnings.warn(
      f"shard_tables: {name} has {shape[0]} rows, not divisible by {size} devices; "
      f"sharding its {shape[1]} columns instead",
      stacklevel=3,
    )
    return NamedSharding(mesh, P(None, axis))
  warnings.warn(
    f"shard_tables: {name} of shape {shape} is not divisible by {size} devices; keeping it replicated", stacklevel=3
  )
  return replicated(mesh)


def state_shardings(mesh: Mesh, tree: Any, tables: Mapping[KeyPath, tuple[int, ...]], *, axis: str = AXIS) -> Any:
  """Shardings for ``tree`` (parameters or an optimizer state): tables sharded, the rest replicated.

  A leaf counts as a table (or a table's optimizer moment) when its key path ends with the key path
  of a table in ``tables`` (path -> shape) and its shape is that table's: optax states hold their
  moments in trees shaped like the parameters, so ``mu``/``nu`` of a table follow the table.
  """

  def pick(path, leaf):
    shape = tuple(np.shape(leaf))
    for table, table_shape in tables.items():
      if len(path) >= len(table) and tuple(path[-len(table) :]) == table and shape == table_shape:
        name = "/".join(str(_key_name(k)) for k in table)
        return _table_sharding(mesh, shape, name, axis)
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def place_state(
  mesh: Mesh,
  graphdef: nnx.GraphDef,
  params: Any,
  opt_state: Any,
  rest: Any,
  *,
  shard_tables: bool = False,
  axis: str = AXIS,
) -> tuple[Any, Any, Any]:
  """Puts ``params``, ``opt_state`` and ``rest`` on the mesh: replicated, or tables row-sharded.

  Returns fresh arrays (``jax.device_put``); the inputs are left as they were.
  """
  tables: dict[KeyPath, tuple[int, ...]] = {}
  if shard_tables:
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    tables = {path: tuple(np.shape(flat[path])) for path in table_paths(graphdef, params, rest)}
  with warnings.catch_warnings():
    warnings.simplefilter("once")  # a fallback table is named once, not once per moment
    p_shard = state_shardings(mesh, params, tables, axis=axis)
    s_shard = state_shardings(mesh, opt_state, tables, axis=axis)
  rep = replicated(mesh)
  return (
    jax.device_put(params, p_shard),
    jax.device_put(opt_state, s_shard),
    jax.device_put(rest, jax.tree.map(lambda _: rep, rest)),
  )
