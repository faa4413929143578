"""Shared pieces of the recommenders: their input, losses, variable kinds, initialisers, input checks.

Input: :class:`Interactions`, the one thing every model is built from --
``Model(interactions, *, rngs=nnx.Rngs(seed), **hparams)``: the sizes, the training pairs and the item
feature tables, validated once on construction.

Losses (MMRec ``src/common/loss.py``):

* BPR:      ``L = -mean(log(gamma + sigmoid(s_pos - s_neg)))`` with ``gamma = 1e-10``.
* EmbLoss:  ``L = (sum_j ||E_j||_F) / E_k.shape[0]`` -- plain (not squared) Frobenius norms, divided by
  the number of rows of the *last* argument (the batch size for batch rows, ``n_items`` for BM3's
  full item table).
* L2Loss:   ``L = sum_j ||E_j||_F^2 / 2`` -- squared norms, halved, not averaged (LayerGCN, SelfCF).

Variable kinds (the contract of ``.notes/INTERFACES.md``):

* :class:`GraphConstant` -- the normalised user-item graph; a constant, not a parameter.
* :class:`FrozenFeatures` -- multimodal inputs that a model reads but never trains (VBPR).
  Robustness code may overwrite rows at inference to simulate information adjustment.
* :class:`FeatureTable` -- multimodal tables that *are* trained (BM3 initialises an embedding table from
  the features with ``freeze=False``). Subclass of :class:`flax.nnx.Param`, so
  ``nnx.split(model, nnx.Param, ...)`` puts it with the other parameters.

Initialisers follow PyTorch's definitions (``torch.nn.init``), which MMRec uses:

* ``xavier_uniform_``: ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``;
* ``xavier_normal_``: ``N(0, 2 / (fan_in + fan_out))`` -- an untruncated normal (``jax``'s
  ``glorot_normal`` is truncated, so it is *not* used here);
* ``nn.Linear``'s default bias: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

For a 2-D table ``fan_in + fan_out`` is the sum of both dimensions, so the layout (PyTorch's
``(out, in)`` weight versus Flax's ``(in, out)`` kernel) does not change the distribution.
"""

from __future__ import annotations

import dataclasses
import operator
import types
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
  "FeatureTable",
  "FrozenFeatures",
  "GraphConstant",
  "Interactions",
  "apply_dropout_mask",
  "bpr_loss",
  "check_interactions",
  "check_non_negative",
  "check_positive",
  "cosine_similarity",
  "dropout",
  "dropout_mask",
  "emb_loss",
  "l2_loss",
  "linear",
  "linear_rows",
  "rows_matmul",
  "torch_linear_bias_init",
  "xavier_normal",
  "xavier_uniform",
]


# --------------------------------------------------------------------------------------------------
# Variable kinds
# --------------------------------------------------------------------------------------------------
class GraphConstant(nnx.Variable):
  """A constant describing the interaction graph (edge lists, normalised weights). Not trained."""


class FrozenFeatures(nnx.Variable):
  """Multimodal item features read by the model but not trained (e.g. VBPR's inputs)."""


class FeatureTable(nnx.Param):
  """A trainable table initialised from multimodal item features (BM3's raw feature tables)."""


# --------------------------------------------------------------------------------------------------
# The models' input
# --------------------------------------------------------------------------------------------------
def _size(name: str, value: Any) -> int:
  """``value`` as a positive int, or ``ValueError`` naming the field ``name``."""
  try:
    if isinstance(value, (bool, np.bool_)):
      raise TypeError
    size = operator.index(value)
  except TypeError:
    raise ValueError(f"Interactions.{name} must be an integer, got {value!r}") from None
  if size <= 0:
    raise ValueError(f"Interactions.{name} must be positive, got {size}")
  return int(size)


def _ids(name: str, value: Any, size_name: str, size: int) -> np.ndarray:
  """``value`` as a read-only 1-D int32 view of ids in ``[0, size)``, or ``ValueError`` naming ``name``."""
  arr = np.asarray(value)
  if arr.ndim != 1:
    raise ValueError(f"Interactions.{name} must be 1-D, got shape {arr.shape}")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"Interactions.{name} must hold integer ids, got dtype {arr.dtype}")
  if arr.size and (arr.min() < 0 or arr.max() >= size):
    raise ValueError(
      f"Interactions.{name} ids must lie in [0, {size_name}={size}), got range [{arr.min()}, {arr.max()}]"
    )
  out = arr.astype(np.int32, copy=False).view()
  out.flags.writeable = False
  return out


def _table(modality: Any, value: Any, n_items: int) -> np.ndarray:
  """``value`` as a read-only float32 ``(n_items, dim)`` view, or ``ValueError`` naming ``features[modality]``."""
  field = f"Interactions.features[{modality!r}]"
  if not isinstance(modality, str):
    raise ValueError(f"Interactions.features keys must be modality names (str), got {modality!r}")
  if value is None:
    raise ValueError(f"{field} is None; leave the modality out instead")
  arr = np.asarray(value)
  if arr.ndim != 2 or arr.shape[0] != n_items:
    raise ValueError(f"{field} must have shape (n_items={n_items}, dim), got {arr.shape}")
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"{field} must hold real numbers, got dtype {arr.dtype}")
  with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, reported next
    out = arr.astype(np.float32, copy=False).view()
  if not np.all(np.isfinite(out)):
    raise ValueError(f"{field} contains NaN or inf")
  out.flags.writeable = False
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Interactions:
  """What a recommender is built from: the sizes, the training pairs and the item feature tables.

  Every model takes one as its only positional argument, ``Model(interactions, *, rngs=..., **hparams)``.
  Immutable: the fields cannot be reassigned and the arrays are read-only views (not copies) of the
  arrays given, in the dtypes below.

  Attributes:
    n_users, n_items: numbers of user and item ids (positive ints; ids are 0-based).
    train_user, train_item: the training pairs, as parallel 1-D int32 arrays of ids in ``[0, n_users)``
      and ``[0, n_items)`` (any integer dtype is accepted and converted; a pair given twice counts once
      in the graph models).
    features: modality (``"text"``, ``"image"``) -> float32 ``(n_items, dim)`` table of finite values,
      item ``i`` in row ``i``; empty for ID-only data. A model takes the modalities in its ``requires``
      and ignores the others.

  Raises:
    ValueError: naming the field (``Interactions.<field>``) that is not as above.
  """

  n_users: int
  n_items: int
  train_user: np.ndarray
  train_item: np.ndarray
  features: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self) -> None:
    n_users, n_items = _size("n_users", self.n_users), _size("n_items", self.n_items)
    user = _ids("train_user", self.train_user, "n_users", n_users)
    item = _ids("train_item", self.train_item, "n_items", n_items)
    if user.shape != item.shape:
      raise ValueError(
        f"Interactions.train_user and Interactions.train_item differ in length ({user.size} vs {item.size})"
      )
    if not isinstance(self.features, Mapping):
      raise ValueError(
        f"Interactions.features must be a mapping of modality -> (n_items, dim) table, "
        f"got {type(self.features).__name__}"
      )
    features = {m: _table(m, t, n_items) for m, t in self.features.items()}
    for name, value in (
      ("n_users", n_users),
      ("n_items", n_items),
      ("train_user", user),
      ("train_item", item),
      ("features", types.MappingProxyType(features)),
    ):
      object.__setattr__(self, name, value)

  def __len__(self) -> int:
    """The number of training pairs (duplicates included)."""
    return int(self.train_user.shape[0])

  def __repr__(self) -> str:
    feats = ", ".join(f"{m}: {t.shape[0]}x{t.shape[1]}" for m, t in self.features.items())
    return f"Interactions(n_users={self.n_users}, n_items={self.n_items}, train={len(self)}, features={{{feats}}})"


# --------------------------------------------------------------------------------------------------
# Initialisers (PyTorch semantics)
# --------------------------------------------------------------------------------------------------
def xavier_uniform() -> nnx.Initializer:
  """``torch.nn.init.xavier_uniform_``: ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
  return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def xavier_normal() -> nnx.Initializer:
  """``torch.nn.init.xavier_normal_``: ``N(0, 2 / (fan_in + fan_out))``, not truncated."""
  return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def torch_linear_bias_init(fan_in: int) -> nnx.Initializer:
  """PyTorch ``nn.Linear``'s default bias: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / np.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, bias: str = "zeros") -> nnx.Linear:
  """An ``nnx.Linear`` with a xavier-normal kernel.

  Args:
    bias: ``"zeros"`` (MMRec's ``xavier_normal_initialization``: bias set to 0) or ``"torch"``
      (PyTorch's default ``nn.Linear`` bias, used where MMRec only re-initialises the weight).
  """
  if bias == "zeros":
    bias_init = jax.nn.initializers.zeros
  elif bias == "torch":
    bias_init = torch_linear_bias_init(in_features)
  else:
    raise ValueError(f"bias must be 'zeros' or 'torch', got {bias!r}")
  return nnx.Linear(in_features, out_features, kernel_init=xavier_normal(), bias_init=bias_init, rngs=rngs)


def rows_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel`` for a tall ``x`` (many rows, e.g. a batch of feature rows) and a small kernel.

  Same value as ``x @ kernel``, arranged for XLA:CPU's fast matrix-multiply path in both
  directions. Autodiff of ``x @ kernel`` gives the kernel gradient as ``x^T dy`` -- a dot whose big
  operand is contracted over its leading axis, which XLA:CPU runs on a generic path 2-3x slower
  than its fast kernel. Computing ``x @ (kernel^T)^T`` with the small transpose pinned by
  ``lax.optimization_barrier`` makes the gradient ``(dy^T x)^T`` instead, which takes the fast path
  (measured 1.6x faster value-and-gradient for a 4096 x 4096 by 4096 x 64 product). Reverse and
  forward mode both work.
  """
  kernel_t = jax.lax.optimization_barrier(kernel.T)
  return jax.lax.dot_general(x, kernel_t, (((x.ndim - 1,), (1,)), ((), ())))


def linear_rows(layer: nnx.Linear, x: jax.Array) -> jax.Array:
  """``layer(x)`` computed with :func:`rows_matmul` (same value; faster gradients on CPU)."""
  y = rows_matmul(x, layer.kernel[...])
  return y if layer.bias is None else y + layer.bias[...]


# --------------------------------------------------------------------------------------------------
# Losses and small functions
# --------------------------------------------------------------------------------------------------
def bpr_loss(pos_scores: jax.Array, neg_scores: jax.Array, gamma: float = 1e-10) -> jax.Array:
  """Bayesian personalised ranking loss, ``-mean(log(gamma + sigmoid(pos - neg)))`` (MMRec)."""
  return -jnp.mean(jnp.log(gamma + jax.nn.sigmoid(pos_scores - neg_scores)))


def _frobenius(x: jax.Array) -> jax.Array:
  """``||x||_F`` with a zero (not NaN) gradient at ``x = 0``."""
  sq = jnp.sum(jnp.square(x))
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def emb_loss(*embeddings: jax.Array) -> jax.Array:
  """MMRec's ``EmbLoss``: ``sum_j ||E_j||_F / E_last.shape[0]`` (plain, not squared, norms)."""
  if not embeddings:
    raise ValueError("emb_loss needs at least one embedding array")
  total = sum(_frobenius(e) for e in embeddings)
  return total / embeddings[-1].shape[0]


def l2_loss(*embeddings: jax.Array) -> jax.Array:
  """MMRec's ``L2Loss``: ``sum_j sum(E_j ** 2) / 2`` (squared Frobenius norms, halved, not averaged)."""
  if not embeddings:
    raise ValueError("l2_loss needs at least one embedding array")
  return sum(0.5 * jnp.sum(jnp.square(e)) for e in embeddings)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Row-wise cosine similarity ``a.b / (max(|a|, eps) max(|b|, eps))`` (``torch.cosine_similarity``).

  The norms are clamped before the square root so the gradient stays finite at a zero row.
  """
  dot = jnp.sum(a * b, axis=-1)
  na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), eps * eps))
  nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), eps * eps))
  return dot / (na * nb)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout as ``torch.nn.functional.dropout`` in training mode.

  Each entry is kept with probability ``1 - rate`` (``jax.random.bernoulli(key, 1 - rate, x.shape)``)
  and scaled by ``1 / (1 - rate)``; dropped entries are 0.
  """
  if rate == 0.0:
    return x
  return apply_dropout_mask(x, dropout_mask(key, rate, x.shape), rate)


def dropout_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """Boolean keep-mask of :func:`dropout`: ``jax.random.bernoulli(key, 1 - rate, shape)``."""
  return jax.random.bernoulli(key, 1.0 - rate, shape)


def apply_dropout_mask(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
  """``where(keep, x / (1 - rate), 0)``."""
  if rate == 0.0:
    return x
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def check_interactions(model: str, interactions: Any, requires: Iterable[str] = ()) -> dict[str, np.ndarray]:
  """Check that ``model`` is built from an :class:`Interactions` that has the modalities ``requires``.

  Returns the required feature tables (modality -> float32 ``(n_items, dim)``, already validated by
  :class:`Interactions`). Raises ``TypeError`` if ``interactions`` is not an :class:`Interactions`, and
  ``ValueError`` naming the model and each missing modality, listing the modalities that were given.
  """
  if not isinstance(interactions, Interactions):
    raise TypeError(
      f"{model} is built from a models.Interactions (the training pairs and item features), "
      f"got {type(interactions).__name__}"
    )
  features = interactions.features
  requires = tuple(requires)
  missing = [m for m in requires if m not in features]
  if missing:
    have = sorted(features)
    raise ValueError(
      f"{model} needs item features for modalit{'y' if len(missing) == 1 else 'ies'} "
      f"{', '.join(repr(m) for m in missing)}, but the data set provides "
      f"{have if have else 'no features'}; use a data set with "
      f"{' and '.join(f'{m}_feat.npy' for m in missing)} or an ID-only model such as 'lightgcn'."
    )
  return {m: features[m] for m in requires}


def check_positive(model: str, **values: float) -> None:
  """Raise ``ValueError`` naming the first hyper-parameter that is not > 0."""
  for name, v in values.items():
    if not v > 0:
      raise ValueError(f"{model}: {name} must be > 0, got {v!r}")


def check_non_negative(model: str, **values: float) -> None:
  """Raise ``ValueError`` naming the first hyper-parameter that is negative."""
  for name, v in values.items():
    if not v >= 0:
      raise ValueError(f"{model}: {name} must be >= 0, got {v!r}")
