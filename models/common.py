"""Shared pieces of the recommenders: losses, variable kinds, initialisers, input checks.

Losses (MMRec ``src/common/loss.py``):

* BPR:      ``L = -mean(log(gamma + sigmoid(s_pos - s_neg)))`` with ``gamma = 1e-10``.
* EmbLoss:  ``L = (sum_j ||E_j||_F) / E_k.shape[0]`` -- plain (not squared) Frobenius norms, divided by
  the number of rows of the *last* argument (the batch size for batch rows, ``n_items`` for BM3's
  full item table).

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
  "bpr_loss",
  "check_features",
  "check_interactions",
  "apply_dropout_mask",
  "cosine_similarity",
  "dropout",
  "dropout_mask",
  "emb_loss",
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
def check_features(
  model: str, features: Mapping[str, Any] | None, requires: Iterable[str], n_items: int
) -> dict[str, np.ndarray]:
  """Return the required modalities as float32 ``(n_items, dim)`` arrays, or raise ``ValueError``.

  The error names the model and each missing modality, and lists the modalities that were given.
  """
  features = dict(features or {})
  requires = tuple(requires)
  missing = [m for m in requires if m not in features or features[m] is None]
  if missing:
    have = sorted(k for k, v in features.items() if v is not None)
    raise ValueError(
      f"{model} needs item features for modalit{'y' if len(missing) == 1 else 'ies'} "
      f"{', '.join(repr(m) for m in missing)}, but the data set provides "
      f"{have if have else 'no features'}; use a data set with "
      f"{' and '.join(f'{m}_feat.npy' for m in missing)} or an ID-only model such as 'lightgcn'."
    )
  out = {}
  for m in requires:
    arr = np.asarray(features[m], dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n_items:
      raise ValueError(f"{model}: features[{m!r}] must have shape (n_items={n_items}, dim), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"{model}: features[{m!r}] contains NaN or inf")
    out[m] = arr
  return out


def check_interactions(
  model: str, n_users: int, n_items: int, train_user: Any, train_item: Any
) -> tuple[np.ndarray, np.ndarray]:
  """Validate training pairs (equal lengths, ids in range) and return them as int32 arrays."""
  if n_users <= 0 or n_items <= 0:
    raise ValueError(f"{model}: n_users and n_items must be positive, got {n_users}, {n_items}")
  if train_user is None or train_item is None:
    raise ValueError(f"{model} needs the training interactions (train_user, train_item)")
  u = np.asarray(train_user).astype(np.int64).reshape(-1)
  i = np.asarray(train_item).astype(np.int64).reshape(-1)
  if u.shape != i.shape:
    raise ValueError(f"{model}: train_user and train_item differ in length ({u.size} vs {i.size})")
  if u.size and (u.min() < 0 or u.max() >= n_users):
    raise ValueError(f"{model}: train_user ids must lie in [0, n_users={n_users}), got range [{u.min()}, {u.max()}]")
  if i.size and (i.min() < 0 or i.max() >= n_items):
    raise ValueError(f"{model}: train_item ids must lie in [0, n_items={n_items}), got range [{i.min()}, {i.max()}]")
  return u.astype(np.int32), i.astype(np.int32)


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
