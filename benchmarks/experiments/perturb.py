r"""Inference-time perturbations of a trained recommender: embedding noise and information adjustment.

Pure helpers on the split NNX state ``(graphdef, params, rest)`` that :mod:`benchmarks.training.loop` produces
(``params``: the ``nnx.Param`` state, ``rest``: constants such as the graph and frozen features). Every
function returns new arrays or a new state and leaves its inputs untouched; entries that a perturbation
does not target come back bit-identical. Used by :mod:`benchmarks.experiments.robustness` (paper, section 5,
tables 4 and 5; DESIGN.md section 5).

**Noise** (paper table 4). Every *embedding table* :math:`E` gets independent Gaussian noise,

.. math::  E \leftarrow E + \sigma Z, \qquad Z_{ij} \sim \mathcal{N}(0, 1) \text{ i.i.d.},

i.e. :math:`\mathcal{N}(0, \sigma^2)` -- ``sigma`` is the standard deviation; the paper's
:math:`\mathcal{N}(0, 10^{-6})` is ``sigma = 1e-3``. The tables (:func:`noise_table_paths`) are the
``embedding`` of every ``nnx.Embed`` module plus every :class:`models.FeatureTable` (trainable raw
feature tables). For the models of this project:

==========  ==========================================================================================
model       perturbed tables (paths in the params state)
==========  ==========================================================================================
VBPR        ``user_embedding.embedding`` (n_users x 2d), ``item_embedding.embedding`` (n_items x d).
            Not perturbed: ``item_linear`` (kernel, bias) and the frozen inputs ``text_features`` /
            ``image_features`` (``FrozenFeatures``, in ``rest``).
LightGCN    ``user_embedding.embedding``, ``item_embedding.embedding`` (the layer-0 tables; the noise
            is propagated through the graph like the embeddings themselves).
BM3         ``user_embedding.embedding``, ``item_id_embedding.embedding``, and the ``FeatureTable``
            params ``image_features``, ``text_features``. Not perturbed: ``predictor``,
            ``image_trs``, ``text_trs``. BM3 scores with ``pred(LightGCN(U, H) + H)`` only, so noise on
            its feature tables does not reach the ranking (it would change the training loss).
==========  ==========================================================================================

Table ``k`` (in sorted path order) draws its noise from ``jax.random.fold_in(key, k)``, so the same
``key`` gives the same draw for every model with the same table shapes (plain / MG / SAM runs of one
model are compared on the same noise). With ``sigma = 0`` the tables are returned bit-identical.

**Information adjustment** (paper table 5). A fraction :math:`p` of the items -- exactly
``round(p * n_items)`` items (Python ``round``: half to even), drawn without replacement by
:func:`select_items` -- get new multimodal input:

* :func:`swap_rows` (text): item :math:`i` gets the features of a donor item :math:`j \ne i` drawn
  uniformly from the other ``n_items - 1`` items (:func:`pick_donors`), read from the *unmodified*
  table (the paper inserts generated captions into 1 % of the texts; an existing other item's text is
  the closest substitute available as a feature vector);
* :func:`noise_rows` (image): item :math:`i`'s row gets additive Gaussian noise whose standard deviation
  per feature column equals the standard deviation of that column over the whole unmodified table,
  :math:`F_{ic} \leftarrow F_{ic} + s_c z_{ic}`, :math:`s_c = \mathrm{std}_i(F_{ic})` -- a
  corruption as large as the spread of the feature itself.

All other rows are bit-identical. Where the tables live is model-specific
(:func:`feature_table_paths`): VBPR's ``FrozenFeatures`` are in ``rest``, BM3's ``FeatureTable`` params in
``params``; LightGCN has none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.common import FeatureTable, FrozenFeatures

__all__ = [
  "Path",
  "add_gaussian_noise",
  "feature_table_paths",
  "get_leaf",
  "key_path",
  "noise_rows",
  "noise_table_paths",
  "path_name",
  "pick_donors",
  "replace_leaves",
  "select_items",
  "swap_rows",
]

Path = tuple[str, ...]
State = Any  # an nnx.State (or any pytree whose key path entries are DictKeys / GetAttrKeys)

_FEATURE_SUFFIX = "_features"


def path_name(path: Path) -> str:
  """``("user_embedding", "embedding") -> "user_embedding.embedding"``."""
  return ".".join(str(p) for p in path)


def key_path(kp: Sequence[Any]) -> Path:
  """A JAX key path (``DictKey``/``GetAttrKey``/``SequenceKey`` entries) as a tuple of strings."""
  out = []
  for k in kp:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:  # pragma: no cover - unknown key kind
      out.append(str(k))
  return tuple(out)


# --------------------------------------------------------------------------------------------------
# Which tables
# --------------------------------------------------------------------------------------------------


def noise_table_paths(model: nnx.Module) -> list[Path]:
  """Paths (in the model's ``nnx.Param`` state) of the tables that embedding noise perturbs.

  The ``embedding`` of every ``nnx.Embed`` submodule and every :class:`models.FeatureTable`; sorted.
  """
  paths = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Embed):
      paths.append((*map(str, path), "embedding"))
    elif isinstance(node, FeatureTable):
      paths.append(tuple(map(str, path)))
  if not paths:
    raise ValueError(f"{type(model).__name__} has no nnx.Embed or FeatureTable to perturb")
  return sorted(paths)


def feature_table_paths(model: nnx.Module) -> dict[str, tuple[Literal["params", "rest"], Path]]:
  """Modality -> ``(where, path)`` of the item-feature tables a model forwards.

  A feature table is a :class:`models.FrozenFeatures` variable (``where="rest"``: not trained, VBPR)
  or a :class:`models.FeatureTable` param (``where="params"``: trained, BM3) named
  ``<modality>_features``. ``{}`` for a model without features (LightGCN).

  Raises:
    ValueError: a modality in ``model.requires`` has no such table (the model does not follow the
      naming convention of ``models/``).
  """
  out: dict[str, tuple[Literal["params", "rest"], Path]] = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (FrozenFeatures, FeatureTable)):
      name = str(path[-1])
      if not name.endswith(_FEATURE_SUFFIX):
        raise ValueError(
          f"{type(model).__name__}: feature variable {path_name(path)!r} is not named '<modality>{_FEATURE_SUFFIX}'"
        )
      where = "params" if isinstance(node, nnx.Param) else "rest"
      out[name[: -len(_FEATURE_SUFFIX)]] = (where, tuple(map(str, path)))
  missing = [m for m in getattr(model, "requires", ()) if m not in out]
  if missing:
    raise ValueError(
      f"{type(model).__name__} requires modalities {missing} but has no "
      f"{', '.join(m + _FEATURE_SUFFIX for m in missing)} FrozenFeatures/FeatureTable variable"
    )
  return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------------
# State access
# --------------------------------------------------------------------------------------------------


def get_leaf(state: State, path: Path) -> jax.Array:
  """The leaf of ``state`` at ``path``; ``KeyError`` listing the available paths if absent."""
  for kp, leaf in jax.tree_util.tree_leaves_with_path(state):
    if key_path(kp) == tuple(path):
      return leaf
  available = [path_name(key_path(kp)) for kp, _ in jax.tree_util.tree_leaves_with_path(state)]
  raise KeyError(f"no leaf {path_name(path)!r} in the state; available: {', '.join(available)}")


def replace_leaves(state: State, updates: Mapping[Path, Any]) -> State:
  """A copy of ``state`` with the leaves at the paths of ``updates`` replaced (shapes must match).

  The other leaves are the same array objects as in ``state``.

  Raises:
    KeyError: a path of ``updates`` is not a leaf of ``state``.
    ValueError: a replacement has another shape than the leaf it replaces.
  """
  updates = {tuple(p): v for p, v in updates.items()}
  found = set()

  def swap(kp, leaf):
    path = key_path(kp)
    if path not in updates:
      return leaf
    new = updates[path]
    if jnp.shape(new) != jnp.shape(leaf):
      raise ValueError(
        f"replacement for {path_name(path)!r} has shape {jnp.shape(new)}, the leaf has {jnp.shape(leaf)}"
      )
    found.add(path)
    return new

  out = jax.tree_util.tree_map_with_path(swap, state)
  missing = set(updates) - found
  if missing:
    available = [path_name(key_path(kp)) for kp, _ in jax.tree_util.tree_leaves_with_path(state)]
    raise KeyError(
      f"no leaf {', '.join(sorted(map(path_name, missing)))} in the state; available: {', '.join(available)}"
    )
  return out


# --------------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------------


def add_gaussian_noise(params: State, paths: Iterable[Path], sigma: float | jax.Array, key: jax.Array) -> State:
  r"""``params`` with :math:`\mathcal{N}(0, \sigma^2)` noise added to the leaves at ``paths``.

  Table ``k`` of ``sorted(paths)`` uses ``jax.random.fold_in(key, k)``. ``sigma`` may be a traced
  scalar (one compilation serves every sigma under ``jax.jit``). The other leaves are untouched; with
  ``sigma = 0`` the perturbed leaves equal the originals bit for bit.

  Raises:
    ValueError: ``sigma`` is a negative number (checked when it is concrete).
  """
  if isinstance(sigma, (int, float)) and not sigma >= 0:
    raise ValueError(f"noise sigma must be >= 0 (a standard deviation), got {sigma!r}")
  paths = sorted(tuple(p) for p in paths)
  updates = {}
  for k, path in enumerate(paths):
    x = get_leaf(params, path)
    z = jax.random.normal(jax.random.fold_in(key, k), jnp.shape(x), jnp.result_type(x))
    updates[path] = x + jnp.asarray(sigma, jnp.result_type(x)) * z
  return replace_leaves(params, updates)


# --------------------------------------------------------------------------------------------------
# Information adjustment
# --------------------------------------------------------------------------------------------------


def select_items(n_items: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
  """Exactly ``round(fraction * n_items)`` distinct items, drawn uniformly; sorted int64 array.

  Raises:
    ValueError: ``fraction`` outside ``[0, 1]`` or ``n_items < 1``.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"adjustment fraction must lie in [0, 1], got {fraction!r}")
  if n_items < 1:
    raise ValueError(f"n_items must be >= 1, got {n_items}")
  count = round(fraction * n_items)
  return np.sort(rng.choice(n_items, size=count, replace=False)).astype(np.int64)


def pick_donors(items: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
  """For each item, a donor drawn uniformly from the *other* ``n_items - 1`` items.

  Raises:
    ValueError: there is an item to adjust but ``n_items < 2`` (no other item exists).
  """
  items = np.asarray(items, dtype=np.int64)
  if items.size and n_items < 2:
    raise ValueError(f"swapping features needs at least 2 items, got n_items={n_items}")
  if not items.size:
    return items.copy()
  return (items + rng.integers(1, n_items, size=items.size)) % n_items


def swap_rows(table: Any, items: np.ndarray, donors: np.ndarray) -> np.ndarray:
  """A copy of ``table`` whose rows ``items`` hold the (original) rows ``donors``."""
  table = np.asarray(table)
  items, donors = np.asarray(items, np.int64), np.asarray(donors, np.int64)
  if items.shape != donors.shape:
    raise ValueError(f"items and donors differ in length: {items.shape} vs {donors.shape}")
  out = table.copy()
  out[items] = table[donors]
  return out


def noise_rows(table: Any, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A copy of ``table`` whose rows ``items`` get Gaussian noise of per-column std = the column's std.

  ``out[i, c] = table[i, c] + std(table[:, c]) * z``, ``z ~ N(0, 1)``; the std is taken over all
  rows of the unmodified table (float64, then cast back to the table's dtype).
  """
  table = np.asarray(table)
  items = np.asarray(items, np.int64)
  out = table.copy()
  if items.size:
    scale = table.astype(np.float64).std(axis=0)
    noise = rng.standard_normal((items.size, table.shape[1])) * scale
    out[items] = (table[items].astype(np.float64) + noise).astype(table.dtype)
  return out
