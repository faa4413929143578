r"""Uniform negative sampling for BPR-style training, exact and vectorised.

Each epoch visits every training pair :math:`(u, i^+)` once in a fresh random order and pairs it with one
negative :math:`i^-` drawn uniformly from the items the user has *not* interacted with in training,
:math:`\mathcal{I} \setminus \mathcal{I}^{train}_u` (MMRec's protocol; Rendle et al., "BPR: Bayesian
Personalized Ranking from Implicit Feedback", UAI 2009).

Instead of rejection sampling, the negative is drawn by rank: with the user's training items sorted,
:math:`t_0 < t_1 < \dots < t_{d-1}`, draw :math:`r \sim \mathcal{U}\{0, \dots, n_i - d - 1\}`; the
:math:`r`-th (0-based) item not in the set is

.. math:: i^- = r + \#\{\, j : t_j - j \le r \,\}

because :math:`t_j - j` counts the non-members below :math:`t_j`. All users are handled at once by one
``np.searchsorted`` over the globally sorted keys :math:`u\, n_i + (t_j - j)`: an epoch costs
:math:`O(n \log n)` with no redraw loop, and is exactly uniform over the complement.
"""

from __future__ import annotations

import numpy as np

from benchmarks.data.dataset import Dataset

__all__ = ["NegativeSampler"]


class NegativeSampler:
  """Shuffled training pairs with one uniform negative per pair, outside the user's training items.

  Args:
    ds: the data set; only its training split is used.

  Raises:
    ValueError: if the training split is empty or some user has every item in training (no negative exists).
  """

  def __init__(self, ds: Dataset) -> None:
    if len(ds.train) == 0:
      raise ValueError(f"{ds.name}: the training split is empty; nothing to sample")
    indptr, items = ds.csr("train")
    degree = np.diff(indptr)
    full = np.flatnonzero(degree >= ds.n_items)
    if full.size:
      raise ValueError(
        f"{ds.name}: {full.size} user(s) have all {ds.n_items} items in training (e.g. user {full[0]}), "
        "so no negative item exists for them"
      )
    self.n_items = ds.n_items
    self._user = ds.train.user
    self._item = ds.train.item
    self._n_free = (ds.n_items - degree).astype(np.int64)  # non-training items per user
    self._indptr = indptr
    owner = np.repeat(np.arange(ds.n_users, dtype=np.int64), degree)
    # u * n_items + (t_j - j): sorted, since t_j - j is non-decreasing within a user and < n_items
    self._keys = owner * ds.n_items + (items - (np.arange(items.size) - indptr[owner]))

  def __len__(self) -> int:
    return int(self._user.shape[0])

  def negatives(self, user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uniform non-training item per entry of ``user`` (int32)."""
    user = np.asarray(user, dtype=np.int64)
    rank = rng.integers(0, self._n_free[user])
    below = np.searchsorted(self._keys, user * self.n_items + rank, side="right") - self._indptr[user]
    return (rank + below).astype(np.int32)

  def epoch(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every training pair once, shuffled, with a fresh negative each.

    Returns:
      ``{"user", "pos", "neg"}``: int32 arrays of length ``len(ds.train)``.
    """
    order = rng.permutation(len(self))
    user = self._user[order]
    return {"user": user, "pos": self._item[order], "neg": self.negatives(user, rng)}
